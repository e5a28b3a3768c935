"""Cross-validated sweeps (`launch.ablate --folds=K`): choose a recipe by K-fold
cross-validation on the training pool, report it on test, and build its final model.

Every row of the grid (a combination of the swept values other than the seed) runs on
each of the K folds (`--folds=K --fold=I`: research/data/layout.py) for every seed, and,
for the comparison, once per `split_seeds` on the single carved split the sweep would
use without folds. Rows are scored on validation only:

- **CV score**: the validation accuracy of the weights each fold run kept, averaged over
  folds and seeds, with the corrected resampled t-interval (`stats.cv_interval`); the
  paired difference against the baseline row pairs equal (seed, fold).
- **Selection** (`select="cv"`): the highest CV score, ties to the lower validation
  loss. `select="split"` chooses by the single split instead.

The chosen row's final model, for each of `final_seeds`, built only after the choice:

- **ensemble**: the K fold models of the seed, their class probabilities averaged
  (research/serve/ensemble.py), exported to `ROOT/final/<row>__seed-S/export/` and
  scored once on test;
- **refit**: one run on the whole pool (`--refit`: no validation, no early stopping),
  each stage trained for the median over the seed's folds of the epochs the kept weights
  went through (`kept_epochs`: every epoch run, or the stage's best epoch when it
  restored its best weights).

Everything that trains is a trial (research/studies/trials.py): a killed sweep resumes,
finished trials are reused under the same config checks, `--parallel` runs several.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from research.config import UserError
from research.studies import stats
from research.studies.tables import code_lines, collect, write_csv, write_hparams
from research.studies.trials import (SEED_KEY, MakeConfig, Trial, parse_sweep, prepare, run_all, trial_dir,
                                     trial_name)

FOLD_KEY, FINAL_KEY = "fold", "final"
FINALS = ("ensemble", "refit")
SELECTIONS = ("cv", "split")
METRIC, LOSS = "val/accuracy", "val/loss"


@dataclass
class Plan:
    """What a cross-validated sweep runs: the rows, on which folds and seeds."""

    base: list[str]
    keys: list[str]
    rows: list[dict[str, str]]
    folds: int
    seeds: list[str | None]
    split_seeds: list[str | None]
    final_seeds: list[str | None]
    finals: list[str] = field(default_factory=lambda: list(FINALS))

    def values(self, row: dict, seed: str | None, **extra) -> dict[str, str]:
        return {**row, **({SEED_KEY: seed} if seed is not None else {}), **extra}

    def _flags(self, row: dict, seed: str | None, *extra: str) -> list[str]:
        return [*self.base, *(f"--{k}={v}" for k, v in row.items()),
                *([f"--seed={seed}"] if seed is not None else []), *extra]

    def fold_trial(self, row: dict, seed: str | None, fold: int) -> Trial:
        values = self.values(row, seed, **{FOLD_KEY: str(fold)})
        return Trial(trial_name(values), values,
                     self._flags(row, seed, f"--folds={self.folds}", f"--fold={fold}"), trial_name(row))

    def split_trial(self, row: dict, seed: str | None) -> Trial:
        values = self.values(row, seed)
        return Trial(trial_name(values), values, self._flags(row, seed), trial_name(row))

    def refit_trial(self, row: dict, seed: str | None, stage_epochs: tuple[int, ...]) -> Trial:
        values = self.values(row, seed, **{FINAL_KEY: "refit"})
        # Its epochs are fixed: nothing to stop early or restore (and no validation to read).
        return Trial(trial_name(values), values,
                     self._flags(row, seed, f"--folds={self.folds}", "--refit", "--noearly_stopping",
                                 "--norestore_best_weights"), trial_name(row), stage_epochs=stage_epochs)

    def selection_trials(self) -> list[Trial]:
        return ([self.fold_trial(r, s, i) for r in self.rows for s in self.seeds for i in range(self.folds)]
                + [self.split_trial(r, s) for r in self.rows for s in self.split_seeds])


def plan(sweep_items: list[str], train_flags: list[str], *, folds: int, split_seeds: list[str] | None = None,
         final_seeds: list[str] | None = None, finals: list[str] | None = None) -> Plan:
    """The rows and seeds of `--sweep` items run on `folds` folds.

    Args:
      split_seeds / final_seeds: seeds of the single-split trials and of the final
        models (None: the swept seeds; an empty list: none).

    Raises:
      UserError: fewer than 2 folds, a swept or passed fold flag, an unknown final model.
    """
    if folds < 2:
        raise UserError(f"--folds={folds} must be at least 2")
    sweep = parse_sweep(sweep_items)
    keys = [k for k, _ in sweep]
    clash = [k for k in keys if k in (FOLD_KEY, "folds", "refit")]
    clash += [f for f in train_flags if f.split("=")[0].lstrip("-") in (FOLD_KEY, "folds", "refit")]
    if clash:
        raise UserError(f"--folds={folds} runs every fold itself: do not sweep or pass {clash[0]!r}")
    finals = list(FINALS) if finals is None else finals
    bad = [f for f in finals if f not in FINALS]
    if bad:
        raise UserError(f"--final={','.join(finals)}: {bad[0]!r} is not a final model; allowed values: "
                        f"{', '.join(FINALS)}")
    seeds: list[str | None] = next((list(v) for k, v in sweep if k == SEED_KEY), [None])
    grid = [(k, v) for k, v in sweep if k != SEED_KEY]
    rows = [dict(zip([k for k, _ in grid], combo)) for combo in itertools.product(*[v for _, v in grid])]
    return Plan(list(train_flags), keys, rows, folds, seeds, seeds if split_seeds is None else split_seeds,
                seeds if final_seeds is None else final_seeds, finals)


# --- scores ------------------------------------------------------------------------------

def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else math.nan


def score_rows(p: Plan, results: dict[str, dict], baseline: dict | None) -> list[dict]:
    """Per row: its CV score (interval), validation loss, the fold models' mean test
    accuracy, the single split's validation and test, every model's mean test accuracy,
    and the paired CV difference against `baseline` (a row)."""

    def done(trials):
        return [results[t.name] for t in trials if results[t.name]["status"] == "done"]

    def folds_of(row):
        return {(s, i): results[p.fold_trial(row, s, i).name] for s in p.seeds for i in range(p.folds)}

    base = folds_of(baseline) if baseline is not None else None
    out = []
    for row in p.rows:
        fold_rows = done([p.fold_trial(row, s, i) for s in p.seeds for i in range(p.folds)])
        split_rows = done([p.split_trial(row, s) for s in p.split_seeds])
        cv = stats.cv_interval([r.get(METRIC) for r in fold_rows], p.folds, within=stats.bounds(METRIC))
        diff = None
        if base is not None and row != baseline:
            mine = {k: r.get(METRIC) for k, r in folds_of(row).items() if r["status"] == "done"}
            theirs = {k: r.get(METRIC) for k, r in base.items() if r["status"] == "done"}
            common = [k for k in mine if k in theirs and mine[k] is not None and theirs[k] is not None]
            diff = stats.cv_interval([mine[k] - theirs[k] for k in common], p.folds,
                                     within=stats.difference_bounds(METRIC))
        out.append({"row": row, "group": trial_name(row), "n": len(fold_rows),
                    "complete": len(fold_rows) == p.folds * len(p.seeds) and len(split_rows) == len(p.split_seeds),
                    "cv": cv,
                    "cv_loss": _mean(r.get(LOSS) for r in fold_rows),
                    "fold_test": _mean(r.get("test/accuracy") for r in fold_rows),
                    "split_n": len(split_rows),
                    "split_val": stats.t_interval([r.get(METRIC) for r in split_rows], within=stats.bounds(METRIC)),
                    "split_loss": _mean(r.get(LOSS) for r in split_rows),
                    "split_test": stats.t_interval([r.get("test/accuracy") for r in split_rows],
                                                   within=stats.bounds("test/accuracy")),
                    "all_test": _mean(r.get("test/accuracy") for r in fold_rows + split_rows),
                    "diff": diff, "is_baseline": row == baseline})
    return out


def choose(scored: list[dict], method: str) -> dict | None:
    """The row with the highest score of `method` (`cv` or `split`), ties to the lower
    validation loss, among the rows with every trial done (a row missing a fold is scored
    on other images); None when no row qualifies."""
    score, loss = ("cv", "cv_loss") if method == "cv" else ("split_val", "split_loss")
    ok = [r for r in scored if math.isfinite(r[score].mean) and r.get("complete", True)]
    if not ok:
        return None
    return max(ok, key=lambda r: (r[score].mean, -(r[loss] if math.isfinite(r[loss]) else math.inf)))


def kept_epochs(stage: dict) -> int:
    """The epochs of a stage (a `results.json` record) that the weights it handed on went
    through: its best epoch when it ended by restoring its own best weights
    (`--restore_best_weights`), else every epoch it ran (early stopping included)."""
    restored = re.fullmatch(r"best/\S+ \(stage (\S+), epoch (\d+)\)", stage.get("weights_from", ""))
    if restored and restored.group(1) == stage["name"]:
        return int(restored.group(2))
    return stage["epochs_run"]


def median_kept_epochs(root: str, trials: list[Trial]) -> tuple[int, ...]:
    """Per stage, the median over `trials` (the folds of one seed) of `kept_epochs`, halves
    rounded up: the refit trains what the fold models that CV scored trained."""
    per_trial = []
    for t in trials:
        with open(os.path.join(trial_dir(root, t), "results.json")) as f:
            per_trial.append([kept_epochs(s) for s in json.load(f)["stages"]])
    return tuple(int(math.floor(np.median(col) + 0.5)) for col in zip(*per_trial))


# --- the sweep ---------------------------------------------------------------------------

def run_cv_sweep(root: str, sweep_items: list[str], train_flags: list[str], make_config: MakeConfig, *,
                 folds: int, select: str = "cv", finals: list[str] | None = None,
                 split_seeds: list[str] | None = None, final_seeds: list[str] | None = None,
                 baseline: str | None = None, parallel: int = 1, rerun: bool = False, log=print,
                 ready=lambda: None) -> list[dict]:
    """Runs the rows on every fold (and the single split), chooses one, builds its final
    models, and writes `results.md` and `results.csv` in `root`.

    Args:
      baseline: `KEY:VALUE`: the row the others are compared with on the CV score
        (default: the first value of the first swept key).
      ready: called once every trial is checked (a launcher starts TensorFlow there).

    Returns:
      One row per trial (`collect`), the final ones included.

    Raises:
      UserError: a malformed sweep, an invalid trial, stale trials without `rerun`.
    """
    if select not in SELECTIONS:
        raise UserError(f"--select={select!r} is not valid; allowed values: {', '.join(SELECTIONS)}")
    p = plan(sweep_items, train_flags, folds=folds, split_seeds=split_seeds, final_seeds=final_seeds,
             finals=finals)
    if select == "split" and not p.split_seeds:
        raise UserError("--select=split chooses by the single split, but --split_seeds is empty")
    base_row = _baseline_row(p, baseline)
    trials = p.selection_trials()
    prepare(root, trials, make_config, rerun=rerun, log=log)
    check_finals(p, trials, make_config)
    ready()
    run_all(root, trials, parallel=parallel, log=log)
    results = {r["trial"]: r for r in collect(root, trials)}
    scored = score_rows(p, results, base_row)
    chosen = choose(scored, select)
    finals_out: list[dict] = []
    extra: list[Trial] = []
    final_trials: list[Trial] = []
    if chosen is not None and p.finals and p.final_seeds:
        log(f"[ablate] chosen by {select}: {chosen['group']}; its final models: {', '.join(p.finals)}")
        folds_needed = [p.fold_trial(chosen["row"], s, i) for s in p.final_seeds for i in range(p.folds)]
        extra = [t for t in folds_needed if t.name not in results]
        prepare(root, extra, make_config, rerun=rerun, log=log)
        run_all(root, extra, parallel=parallel, log=log)
        results.update({r["trial"]: r for r in collect(root, extra)})
        if "refit" in p.finals:
            final_trials = [p.refit_trial(chosen["row"], s, median_kept_epochs(
                root, [p.fold_trial(chosen["row"], s, i) for i in range(p.folds)])) for s in p.final_seeds
                            if all(results[p.fold_trial(chosen["row"], s, i).name]["status"] == "done"
                                   for i in range(p.folds))]
            prepare(root, final_trials, make_config, rerun=rerun, log=log)
            run_all(root, final_trials, parallel=parallel, log=log)
            results.update({r["trial"]: r for r in collect(root, final_trials)})
        finals_out = final_models(root, p, chosen["row"], results, final_trials, log=log)
    every = [*trials, *extra, *final_trials]
    rows = [results[t.name] for t in every]
    write_csv(root, rows, [*p.keys, FOLD_KEY, FINAL_KEY])
    write_report(root, p, scored, chosen, select, finals_out, rows)
    write_hparams(root, every)
    return rows


def check_finals(p: Plan, trials: list[Trial], make_config: MakeConfig) -> None:
    """Refuses, before anything runs, final models that could not be built after the choice:
    a refit or a final seed whose flags are invalid, an ensemble scored on no test split.

    Raises:
      UserError: naming the row and what is wrong.
    """
    if "ensemble" in p.finals and p.final_seeds and any(t.config.data.test == "none" for t in trials):
        raise UserError("--final=ensemble scores the fold ensemble once on test, and --test=none leaves no test "
                        "split; pass --final=refit, or give the data a test split")
    for row in p.rows:
        for s in p.final_seeds:
            checks = [p.fold_trial(row, s, 0)] + ([p.refit_trial(row, s, None)] if "refit" in p.finals else [])
            for t in checks:
                try:
                    make_config(t.flags)
                except UserError as e:
                    raise UserError(f"the final models of {trial_name(row)}, seed {s}: {e}") from None


def _baseline_row(p: Plan, spec: str | None) -> dict | None:
    swept = [k for k in p.keys if k != SEED_KEY]
    if not swept:
        return None
    if not spec:
        return p.rows[0]
    key, sep, value = spec.partition(":")
    if not sep or key not in swept:
        raise UserError(f"--baseline={spec!r} is not KEY:VALUE of a swept key; swept keys: {', '.join(swept)}")
    first = next(r for r in p.rows if r[key] == value) if any(r[key] == value for r in p.rows) else None
    if first is None:
        raise UserError(f"--baseline={spec!r}: {key} takes the values "
                        f"{', '.join(dict.fromkeys(r[key] for r in p.rows))}")
    return {k: (value if k == key else p.rows[0][k]) for k in swept}


def final_models(root: str, p: Plan, row: dict, results: dict, refits: list[Trial], *, log=print) -> list[dict]:
    """The chosen row's fold ensembles (scored on test, exported) and refits, per seed."""
    out = []
    for s in p.final_seeds:
        members = [p.fold_trial(row, s, i) for i in range(p.folds)]
        if "ensemble" in p.finals and all(results[t.name]["status"] == "done" for t in members):
            out.append(ensemble(root, [trial_dir(root, t) for t in members],
                                os.path.join(root, "final", trial_name(p.values(row, s))), s, log=log))
    for t in refits:
        r = results[t.name]
        out.append({"final": "refit", "seed": t.values.get(SEED_KEY), "test/accuracy": r.get("test/accuracy"),
                    "status": r["status"], "epochs": list(t.stage_epochs or ()), "where": trial_dir(root, t)})
    return out


def ensemble(root: str, workdirs: list[str], out_dir: str, seed: str | None, *, log=print) -> dict:
    """Scores (once, on test) and exports one fold ensemble; reused when its report is
    newer than every member's results."""
    from research.serve.ensemble import evaluate_ensemble, export_ensemble

    report_path = os.path.join(out_dir, "eval", "own_test.json")
    newest = max(os.path.getmtime(os.path.join(w, "results.json")) for w in workdirs)
    if os.path.exists(report_path) and os.path.getmtime(report_path) > newest \
            and os.path.exists(os.path.join(out_dir, "export", "labels.json")):
        with open(report_path) as f:
            report = json.load(f)
    else:
        log(f"[ablate] fold ensemble of {len(workdirs)} runs: scoring on test and exporting to {out_dir}/export")
        export_ensemble(workdirs, os.path.join(out_dir, "export"))
        report = evaluate_ensemble(workdirs, out_dir, split="test")
    return {"final": "ensemble", "seed": seed, "test/accuracy": report["accuracy"], "test/loss": report["loss"],
            "status": "done", "where": out_dir}


# --- the report --------------------------------------------------------------------------

def _f(x: float) -> str:
    return f"{x:.4f}" if isinstance(x, float) and math.isfinite(x) else ""


def write_report(root: str, p: Plan, scored: list[dict], chosen: dict | None, select: str,
                 finals: list[dict], rows: list[dict]) -> None:
    """`results.md`: the CV table, the final models, and whether CV chose better than the split."""
    swept = [k for k in p.keys if k != SEED_KEY]
    seeds = ", ".join(s for s in p.seeds if s is not None) or "the flags' seed"
    lines = [f"# Cross-validated sweep: {p.folds} folds", "",
             f"Rows chosen by {'the CV score' if select == 'cv' else 'the single split'} on validation only; "
             f"each row ran on {p.folds} folds × seeds {seeds}. CV score: validation accuracy of the weights each "
             "fold run kept, mean over folds and seeds, with the corrected resampled 95 % t-interval (Nadeau and "
             "Bengio 2003: fold scores share training images, so the plain interval is too narrow). Δ pairs equal "
             "(seed, fold) against the baseline row, with the same correction. Test columns are reported only.", "",
             "| " + " | ".join([*(swept or ["row"]), "n", "CV val/accuracy", "CV val/loss", "Δ CV vs baseline",
                               "fold models' test/accuracy", "split val/accuracy", "split test/accuracy",
                               "chosen"]) + " |",
             "|" + "---|" * (len(swept or [0]) + 8)]
    for r in scored:
        cells = [r["row"][k] for k in swept] or ["all"]
        cells += [str(r["n"]), r["cv"].format(), _f(r["cv_loss"]),
                  "(baseline)" if r["is_baseline"] else r["diff"].format(signed=True) if r["diff"] else "",
                  _f(r["fold_test"]), r["split_val"].format(), r["split_test"].format(),
                  "**chosen**" if chosen is not None and r["row"] == chosen["row"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    if finals:
        lines += ["", f"## The final model of {chosen['group']}, scored once on test", "",
                  "| final model | seed | test/accuracy | trained | where |", "|---|---|---|---|---|"]
        for f in finals:
            trained = (f"{p.folds} fold models, probabilities averaged" if f["final"] == "ensemble"
                       else f"the whole pool, epochs per stage {f['epochs']} (the folds' median)")
            lines.append(f"| {f['final']} | {f['seed'] if f['seed'] is not None else ''} | "
                         f"{_f(f.get('test/accuracy'))} | {trained} | `{f['where']}` |")
        lines += ["", "| final model | test/accuracy, mean over seeds [95 % t-interval] |", "|---|---|"]
        for kind in p.finals:
            vals = [f.get("test/accuracy") for f in finals if f["final"] == kind and f["status"] == "done"]
            if vals:
                lines.append(f"| {kind} | {stats.t_interval(vals, within=stats.bounds('test/accuracy')).format()} |")
    lines += agreement_lines(scored)
    lines += code_lines(rows)
    failed = [r for r in rows if r["status"] != "done"]
    if failed:
        lines += ["", "Failed or missing trials:", ""] + [f"- `{r['trial']}`: {r.get('error') or r['status']}"
                                                          for r in failed]
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def agreement_lines(scored: list[dict]) -> list[str]:
    """Does CV choose better? Kendall's tau between each method's selection score and the
    rows' test accuracy (the mean over every model the row trained), and each pick's test."""
    rows = [r for r in scored if math.isfinite(r["all_test"])]
    if len(rows) < 2:
        return []
    truth = [r["all_test"] for r in rows]
    lines = ["", "## Does cross-validation choose better than the single split?", "",
             "Kendall's tau between each method's selection score and the rows' test accuracy (the mean over "
             "every model the row trained, on the split and on the folds); 1: the same order.", "",
             "| method | tau vs test | pick | the pick's test/accuracy (every model) |", "|---|---|---|---|"]
    for method, key, label in (("split", "split_val", "single split (validation)"),
                               ("cv", "cv", "K-fold CV")):
        have = [r for r in rows if math.isfinite(r[key].mean)]
        if len(have) < 2:
            continue
        tau = stats.kendall_tau([r[key].mean for r in have], [r["all_test"] for r in have])
        pick = choose(have, method)
        if pick is None:
            continue
        shown = f"{tau:+.3f}" if math.isfinite(tau) else "n/a (a constant score)"
        lines.append(f"| {label} | {shown} | {pick['group']} | {_f(pick['all_test'])} |")
    best = max(rows, key=lambda r: r["all_test"])
    lines += ["", f"The row with the highest test accuracy, {best['group']} ({_f(best['all_test'])}), is named "
              f"here after the choice, never to make it ({len(truth)} rows)."]
    return lines
