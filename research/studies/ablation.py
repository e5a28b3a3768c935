"""Sweeps and studies: expand trials, run them resumably, tabulate, plot, HParams.

A sweep root holds one workdir per trial under `trials/`, and at the top
`results.csv`, `results.md`, `results.png` and the TensorBoard HParams
experiment, so `tensorboard --logdir ROOT` compares every trial.

Every trial's config is built and validated before the first one runs (a bad
sweep value is a user error, not a failed trial 90 s later). A trial is
finished when its `results.json` exists and its `config.json` equals the config
its flags give now: re-running a sweep skips it. A trial run before with other
settings is refused, naming the difference, unless `rerun` (then it starts
again from scratch). An unfinished trial is simply launched again, and
`launch/train.py` resumes it from its checkpoint. A failed trial leaves
`error.txt` and a row marked failed; the others still run.

Trials are `launch.train` flag lists run as subprocesses (each a normal
workdir, resumable and killable on its own); `make_config` turns a flag list
into its validated `ExperimentConfig` (the launcher passes
`launch.train.config_from_args`).
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from research.studies import stats
from research.config import ExperimentConfig, UserError, config_diff

SEED_KEY = "seed"
MakeConfig = Callable[[list[str]], ExperimentConfig]


@dataclass
class Trial:
    """One run of `launch/train.py`.

    Attributes:
      name: directory name under `trials/` (stable: derived from the values).
      values: the swept values, `{flag: value}` (shown in tables and HParams).
      flags: every `--flag=value` passed to the run (base flags, then values).
      group: rows with the same group are aggregated over seeds.
      module: what runs it: `launch.train`, or `launch.guide_recipe` (the Keras
        guide's `model.fit` recipe, research/studies/guide.py), with the same flags.
    """

    name: str
    values: dict[str, str]
    flags: list[str]
    group: str = ""
    module: str = "launch.train"


def parse_sweep(items: list[str]) -> list[tuple[str, list[str]]]:
    """Parses `--sweep=key:v1,v2` items (`;` separates values that contain commas).

    Raises:
      UserError: malformed item or an empty value list.
    """
    out = []
    for item in items:
        key, sep, values = item.partition(":")
        key = key.strip().lstrip("-")
        if not sep or not re.fullmatch(r"[a-z_0-9]+", key):
            raise UserError(f"--sweep={item!r} is not KEY:V1,V2,... (for example unfreeze:none,top:1,all)")
        parts = values.split(";") if ";" in values else values.split(",")
        parts = [p.strip() for p in parts if p.strip()]
        if not parts:
            raise UserError(f"--sweep={item!r} lists no values")
        out.append((key, parts))
    keys = [k for k, _ in out]
    if len(set(keys)) != len(keys):
        raise UserError(f"--sweep names a flag twice: {keys}")
    return out


def trial_name(values: dict[str, str]) -> str:
    return "__".join(f"{k}-{re.sub(r'[^A-Za-z0-9.+-]', '_', v)}" for k, v in values.items()) or "trial"


def expand(sweep: list[tuple[str, list[str]]], base_flags: list[str]) -> list[Trial]:
    """The cartesian product of the swept values, in the order given."""
    keys = [k for k, _ in sweep]
    trials = []
    for combo in itertools.product(*[v for _, v in sweep]):
        values = dict(zip(keys, combo))
        group = trial_name({k: v for k, v in values.items() if k != SEED_KEY})
        trials.append(Trial(trial_name(values), values, list(base_flags) + [f"--{k}={v}" for k, v in values.items()],
                            group))
    return trials


# --- running --------------------------------------------------------------------------

def trial_dir(root: str, trial: Trial) -> str:
    return os.path.join(root, "trials", trial.name)


def is_finished(root: str, trial: Trial) -> bool:
    return os.path.exists(os.path.join(trial_dir(root, trial), "results.json"))


def check_specs(configs: list[ExperimentConfig]) -> None:
    """Resolves every stage's block-based unfreeze spec against its backbone's blocks.

    Raises:
      UserError: naming the spec and the backbone's valid blocks.
    """
    from research.model import backbones, unfreeze

    names: dict[tuple, list[str]] = {}
    for c in configs:
        key = (c.model.backbone, c.model.alpha)
        if key not in names:
            entry = backbones.get(c.model.backbone)
            base = backbones.build_base(c.model.backbone, image_size=max(entry.min_size, 32), alpha=c.model.alpha)
            names[key] = backbones.blocks(base, c.model.backbone)
        for s in c.stages:
            unfreeze.resolve_blocks(s.unfreeze, names[key], backbone=c.model.backbone)


def prepare(root: str, trials: list[Trial], make_config: MakeConfig, *, rerun: bool = False, log=print) -> None:
    """Validates every trial before any runs, and refuses (or clears, with `rerun`) stale ones.

    Raises:
      UserError: a trial whose flags are invalid, or one that ran before with a
        config other than what its flags give now (without `rerun`).
    """
    from research.studies import guide

    configs = {}
    for t in trials:
        try:
            configs[t.name] = make_config(t.flags)
            if t.module == "launch.guide_recipe":
                guide.check(configs[t.name])
        except UserError as e:
            raise UserError(f"trial {t.name}: {e}") from None
    check_specs(list(configs.values()))
    stale = []
    for t in trials:
        path = os.path.join(trial_dir(root, t), "config.json")
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            diff = config_diff(old, configs[t.name].to_dict())
            if "test" not in old.get("data", {}):
                # Its splits differ (no test slice was carved) though no field reads differently.
                diff.append("data.test: ran before runs had a test split")
            if diff:
                stale.append((t, diff))
    if stale and not rerun:
        shown = "; ".join(f"{t.name}: {', '.join(d)}" for t, d in stale[:4])
        raise UserError(f"{len(stale)} trial(s) in {root} ran with other settings than these flags give now "
                        f"({shown}); use another --root, or pass --rerun to run them again from scratch")
    for t, _ in stale:
        log(f"[ablate] {t.name}: settings changed, running it again from scratch")
        shutil.rmtree(trial_dir(root, t))


def run_trial(root: str, trial: Trial, *, log=print) -> dict:
    """Runs (or resumes, or skips) one trial in a subprocess.

    Returns:
      `{"status": "done"|"skipped"|"failed", ...}`.
    """
    wd = trial_dir(root, trial)
    if is_finished(root, trial):
        return {"status": "skipped"}
    os.makedirs(wd, exist_ok=True)
    err_path = os.path.join(wd, "error.txt")
    if os.path.exists(err_path):
        os.remove(err_path)
    flags_ = list(trial.flags)
    if not any(f.startswith("--cache_dir=") for f in flags_):
        # One image check and one disk cache for the whole sweep, not one per trial.
        flags_.append(f"--cache_dir={os.path.join(os.path.abspath(root), 'cache')}")
    cmd = [sys.executable, "-m", trial.module, f"--workdir={wd}", *flags_]
    log(f"[ablate] running {trial.name}")
    t0 = time.time()
    with open(os.path.join(wd, "stdout.log"), "a") as out, open(os.path.join(wd, "stderr.log"), "a") as err:
        rc = subprocess.call(cmd, stdout=out, stderr=err, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    if rc != 0 or not is_finished(root, trial):
        tail = ""
        with open(os.path.join(wd, "stderr.log")) as f:
            lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error:")]
        tail = (errors or lines or ["(no output)"])[-1]
        with open(err_path, "w") as f:
            f.write(f"exit status {rc}\n{tail}\n")
        log(f"[ablate] {trial.name} FAILED (exit {rc}): {tail}")
        return {"status": "failed", "returncode": rc, "error": tail}
    log(f"[ablate] {trial.name} done in {time.time() - t0:.0f}s")
    return {"status": "done"}


def run_all(root: str, trials: list[Trial], *, parallel: int = 1, log=print) -> dict[str, dict]:
    """Runs every trial (`parallel` subprocesses at a time); failures do not stop the others."""
    os.makedirs(os.path.join(root, "trials"), exist_ok=True)
    if parallel <= 1:
        return {t.name: run_trial(root, t, log=log) for t in trials}
    with ThreadPoolExecutor(parallel) as pool:
        futures = {t.name: pool.submit(run_trial, root, t, log=log) for t in trials}
        return {name: f.result() for name, f in futures.items()}


# --- results ----------------------------------------------------------------------------

# The run's metric vocabulary: test/... and val/... are the final weights', best/... the
# run's best epoch (chosen on validation).
COLUMNS = ["test/accuracy", "val/accuracy", "test/loss", "val/loss", "best/test/accuracy", "best/val/accuracy",
           "test_ema/accuracy", "best_epoch", "epochs", "early_stopped", "trainable_params", "wall_time_s", "images_per_second"]
SUMMARY_METRICS = ("test/accuracy", "val/accuracy", "best/test/accuracy", "best/val/accuracy", "wall_time_s")


def collect(root: str, trials: list[Trial]) -> list[dict]:
    """One row per trial: its swept values and metrics (or its error)."""
    rows = []
    for t in trials:
        wd = trial_dir(root, t)
        row = {"trial": t.name, **t.values, "group": t.group}
        path = os.path.join(wd, "results.json")
        if os.path.exists(path):
            with open(path) as f:
                r = json.load(f)
            final, best = r["final"], r["best"] or {}
            trainable = [s.get("trainable_params") for s in r["stages"] if s.get("trainable_params") is not None]
            row.update({"status": "done", **{k: final.get(k) for k in ("test/accuracy", "val/accuracy", "test/loss",
                                                                       "val/loss", "test_ema/accuracy")},
                        "best/test/accuracy": best.get("test/accuracy"),
                        "best/val/accuracy": best.get("val/accuracy"),
                        "best_epoch": r["best_epoch"], "epochs": r["epochs_run"],
                        "early_stopped": r["early_stopping_fired"],
                        "trainable_params": trainable[-1] if trainable else None,
                        "wall_time_s": round(r["wall_time_s"], 1),
                        "images_per_second": round(r["images_per_second"], 1),
                        "test_from": r.get("test_from", "none")})
        else:
            err = os.path.join(wd, "error.txt")
            row.update(status="failed" if os.path.exists(err) else "missing",
                       error=open(err).read().strip().replace("\n", ": ") if os.path.exists(err) else "")
        rows.append(row)
    return rows


def headline_metric(rows: list[dict]) -> str:
    """`test/accuracy`, or `val/accuracy` for runs without a test split."""
    done = [r for r in rows if r["status"] == "done"]
    return "test/accuracy" if done and all(r.get("test/accuracy") is not None for r in done) else "val/accuracy"


def parse_baseline(spec: str | None, keys: list[str], rows: list[dict]) -> tuple[str, str] | None:
    """`--baseline=KEY:VALUE` (default: the first value of the first swept key).

    Raises:
      UserError: a key that is not swept, or a value it does not take.
    """
    swept = [k for k in keys if k != SEED_KEY]
    if not swept:
        return None
    if not spec:
        return swept[0], rows[0][swept[0]]
    key, sep, value = spec.partition(":")
    if not sep or key not in swept:
        raise UserError(f"--baseline={spec!r} is not KEY:VALUE of a swept key; swept keys: {', '.join(swept)}")
    values = list(dict.fromkeys(r[key] for r in rows))
    if value not in values:
        raise UserError(f"--baseline={spec!r}: {key} takes the values {', '.join(values)}")
    return key, value


def aggregate(rows: list[dict], keys: list[str], baseline: tuple[str, str] | None = None) -> list[dict]:
    """Per group (rows that differ only by seed): the metrics' means with 95 % t-intervals,
    and the paired difference of the headline metric against the baseline row.

    The baseline row of a group has the same values except `baseline[0]`, which
    takes `baseline[1]`; differences pair the trials of equal seed.
    """
    metric = headline_metric(rows)
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    swept = [k for k in keys if k != SEED_KEY]
    by_values = {tuple(rs[0].get(k) for k in swept): rs for rs in groups.values()}
    out = []
    for g, rs in groups.items():
        done = [r for r in rs if r["status"] == "done"]
        agg = {k: rs[0].get(k) for k in swept}
        agg.update(group=g, n=len(done), failed=len(rs) - len(done), metric=metric)
        for m in SUMMARY_METRICS:
            agg[m] = stats.t_interval([r.get(m) for r in done])
        agg["diff"] = agg["is_baseline"] = None
        if baseline is not None:
            key, value = baseline
            agg["is_baseline"] = agg[key] == value
            ref = by_values.get(tuple(value if k == key else agg[k] for k in swept))
            if ref is not None and not agg["is_baseline"]:
                agg["diff"] = stats.paired_difference(
                    {r.get(SEED_KEY, ""): r.get(metric) for r in done},
                    {r.get(SEED_KEY, ""): r.get(metric) for r in ref if r["status"] == "done"})
        out.append(agg)
    return out


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, stats.Interval):
        return v.format()
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def _verdict(diff: stats.Interval | None) -> str:
    if diff is None or diff.n == 0:
        return ""
    if not diff.has_interval:
        return "n/a (one seed)"
    return "yes" if diff.excludes_zero() else "no"


def protocol_lines(rows: list[dict], metric: str) -> list[str]:
    """What the numbers are: which split, what it is, what chose the weights."""
    done = [r for r in rows if r["status"] == "done"]
    sources = sorted({r.get("test_from", "none") for r in done})
    if metric == "test/accuracy":
        return [f"Test split: {'; '.join(sources)}. Early stopping and `best/` saw validation only; "
                "test was scored once, at the end of each run, with the final weights."]
    return ["No test split (`--test=none`): these are validation numbers, and validation also chose the "
            "epochs and `best/`, so they are optimistic."]


def write_tables(root: str, rows: list[dict], keys: list[str], *, title: str = "Sweep results",
                 baseline: tuple[str, str] | None = None) -> list[dict]:
    """`results.csv` (every trial), `summary.csv` and `results.md` (trials, then per row of
    seeds: mean, 95 % t-interval, n and the paired difference against the baseline).

    Returns:
      `aggregate`'s rows.
    """
    cols = ["trial", *keys, "status", *COLUMNS, "error"]
    with open(os.path.join(root, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in cols})
    lines = [f"# {title}", "", "| " + " | ".join(cols[1:-1]) + " |", "|" + "---|" * (len(cols) - 2)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols[1:-1]) + " |")
    failed = [r for r in rows if r["status"] != "done"]
    if failed:
        lines += ["", "Failed or missing trials:", ""] + [f"- `{r['trial']}`: {r.get('error') or r['status']}" for r in failed]
    agg = aggregate(rows, keys, baseline)
    ks = [k for k in keys if k != SEED_KEY]
    if ks and any(r["status"] == "done" for r in rows):
        metric = headline_metric(rows)
        other = "val/accuracy" if metric == "test/accuracy" else "best/val/accuracy"
        base = f"{baseline[0]}={baseline[1]}" if baseline else ""
        lines += ["", f"## {metric}: mean and 95 % t-interval over seeds", "", *protocol_lines(rows, metric), "",
                  *([f"Δ is the paired difference in {metric} against the baseline row ({base}) on the same "
                     "seeds, with its 95 % t-interval; \"excludes 0\" says whether the interval leaves out zero.",
                     ""] if baseline else []),
                  "| " + " | ".join(ks + ["n", metric, other] + ([f"Δ vs {base}", "excludes 0"] if baseline else []))
                  + " |", "|" + "---|" * (len(ks) + 3 + 2 * bool(baseline))]
        for a in agg:
            cells = [_fmt(a.get(k)) for k in ks] + [str(a["n"]), a[metric].format(), a[other].format()]
            if baseline:
                cells += ["(baseline)" if a["is_baseline"] else a["diff"].format(signed=True) if a["diff"] else "",
                          _verdict(a["diff"])]
            lines.append("| " + " | ".join(cells) + " |")
        _write_summary_csv(root, agg, ks)
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return agg


def _write_summary_csv(root: str, agg: list[dict], keys: list[str]) -> None:
    cols = [*keys, "n", "failed"]
    for m in SUMMARY_METRICS:
        cols += [f"{m}_mean", f"{m}_lo", f"{m}_hi"]
    cols += ["diff_mean", "diff_lo", "diff_hi", "diff_n", "diff_excludes_zero"]
    with open(os.path.join(root, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for a in agg:
            row = {k: a.get(k) for k in keys}
            row.update(n=a["n"], failed=a["failed"])
            for m in SUMMARY_METRICS:
                iv = a[m]
                row.update({f"{m}_mean": iv.mean, f"{m}_lo": iv.lo, f"{m}_hi": iv.hi})
            d = a["diff"]
            if d is not None:
                row.update(diff_mean=d.mean, diff_lo=d.lo, diff_hi=d.hi, diff_n=d.n,
                           diff_excludes_zero=d.excludes_zero())
            w.writerow(row)


def plot(root: str, rows: list[dict], keys: list[str], *, metric: str | None = None,
         filename: str = "results.png", baseline: tuple[str, stats.Interval] | None = None,
         title: str = "") -> str | None:
    """Metric (default: the headline metric) vs the first swept key, one line per
    combination of the other keys; error bars are 95 % t-intervals over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric or headline_metric(rows)
    xs_key = next((k for k in keys if k != SEED_KEY), None)
    if xs_key is None:
        return None
    others = [k for k in keys if k not in (xs_key, SEED_KEY)]
    xs = list(dict.fromkeys(r[xs_key] for r in rows))
    lines: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        if r["status"] != "done" or r.get(metric) is None:
            continue
        label = ", ".join(f"{k}={r[k]}" for k in others) or metric
        lines.setdefault(label, {}).setdefault(r[xs_key], []).append(r[metric])
    if not lines:
        return None
    # Numbers along the x axis (n blocks, a learning rate) are joined by lines;
    # categories (unfreeze specs, backbones) are not, and each line is nudged
    # sideways so that error bars do not overlap.
    ordered = all(_is_number(x) for x in xs)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for j, (label, pts) in enumerate(lines.items()):
        shift = 0.0 if ordered else 0.08 * (j - (len(lines) - 1) / 2)
        px = [i for i, x in enumerate(xs) if x in pts]
        ivs = [stats.t_interval(pts[xs[i]]) for i in px]
        half = [(iv.hi - iv.mean) if iv.has_interval else 0.0 for iv in ivs]
        ax.errorbar([p + shift for p in px], [iv.mean for iv in ivs], yerr=half, marker="o", capsize=3,
                    label=label, ls="-" if ordered else "none")
    if baseline is not None:
        label, iv = baseline
        ax.axhline(iv.mean, color="k", ls="--", lw=1, label=label)
        if iv.has_interval:
            ax.axhspan(iv.lo, iv.hi, color="k", alpha=0.08)
    ax.set_title((title + "\n" if title else "") + "mean and 95 % t-interval over seeds", fontsize=9)
    ax.set_xticks(range(len(xs)), xs)
    ax.set_xlabel(xs_key)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(root, filename)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def write_hparams(root: str, trials: list[Trial]) -> None:
    """TensorBoard HParams: the experiment at the root, one session per finished trial.

    Metrics point at the trial's own `val/` and `train/` scalars, so the
    dashboard shows each trial's last values.
    """
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    keys = list(dict.fromkeys(k for t in trials for k in t.values))
    hparams = {k: hp.HParam(k, hp.Discrete(sorted({str(t.values.get(k, "")) for t in trials}))) for k in keys}
    metrics = [hp.Metric("accuracy", group="test", display_name="test accuracy"),
               hp.Metric("accuracy", group="val", display_name="val accuracy"),
               hp.Metric("loss", group="val", display_name="val loss"),
               hp.Metric("loss", group="train", display_name="train loss"),
               hp.Metric("accuracy", group="train", display_name="train accuracy")]
    with tf.summary.create_file_writer(os.path.join(root, "trials")).as_default():
        hp.hparams_config(hparams=list(hparams.values()), metrics=metrics)
    for t in trials:
        wd = trial_dir(root, t)
        marker = os.path.join(wd, ".hparams_written")
        if not is_finished(root, t) or os.path.exists(marker):
            continue
        with tf.summary.create_file_writer(wd).as_default():
            hp.hparams({hparams[k]: str(v) for k, v in t.values.items()}, trial_id=t.name)
        open(marker, "w").close()


def run_sweep(root: str, sweep_items: list[str], train_flags: list[str], make_config: MakeConfig, *,
              parallel: int = 1, rerun: bool = False, baseline: str | None = None, log=print) -> list[dict]:
    """A grid of `--sweep=KEY:V1,V2` items over `launch.train` flags: runs, tabulates, plots.

    Args:
      baseline: `KEY:VALUE`, the row the others are compared with (default: the
        first value of the first swept key).

    Returns:
      One row per trial (`collect`).

    Raises:
      UserError: a malformed sweep or baseline, an invalid trial, or stale trials without `rerun`.
    """
    sweep = parse_sweep(sweep_items)
    trials = expand(sweep, train_flags)
    keys = [k for k, _ in sweep]
    base = parse_baseline(baseline, keys, [t.values for t in trials])
    prepare(root, trials, make_config, rerun=rerun, log=log)
    run_all(root, trials, parallel=parallel, log=log)
    rows = collect(root, trials)
    write_tables(root, rows, keys, baseline=base)
    plot(root, rows, keys)
    write_hparams(root, trials)
    return rows


# The guide's `model.fit` recipe (the baseline) and this codebase's defaults, on the same flags.
RECIPES_BUILTIN = ("guide", "default")


def parse_recipes(items: list[str]) -> list[tuple[str, list[str]]]:
    """`--recipe=NAME:FLAGS` items -> (name, flags), e.g. `adapt:--bn=adapt --schedule=constant`.

    Raises:
      UserError: a malformed item, a reserved or repeated name.
    """
    out = []
    for item in items:
        name, sep, rest = item.partition(":")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
            raise UserError(f"--recipe={item!r} is not NAME:FLAGS (for example 'adapt:--bn=adapt --schedule=constant')")
        if name in RECIPES_BUILTIN or name in [n for n, _ in out]:
            raise UserError(f"--recipe name {name!r} is taken; the study always runs {', '.join(RECIPES_BUILTIN)}")
        try:
            flags_ = shlex.split(rest)
        except ValueError as e:
            raise UserError(f"--recipe={item!r}: {e}") from None
        bad = [f for f in flags_ if not f.startswith("--") or f.startswith("--workdir")]
        if bad:
            raise UserError(f"--recipe={item!r}: {bad[0]!r} is not a launch.train --flag (each trial gets its own "
                            "--workdir)")
        out.append((name, flags_))
    return out


def recipe_trials(base_flags: list[str], recipes: list[tuple[str, list[str]]], seeds: list[str]) -> list[Trial]:
    """Per seed: the guide's recipe, the defaults, then each named recipe (its flags
    after the shared ones, so they override them)."""
    trials = []
    for name, extra in [("guide", []), ("default", []), *recipes]:
        for seed in seeds:
            values = {"recipe": name, SEED_KEY: seed}
            trials.append(Trial(trial_name(values), values, [*base_flags, *extra, f"--seed={seed}"],
                                trial_name({"recipe": name}),
                                "launch.guide_recipe" if name == "guide" else "launch.train"))
    return trials


def run_recipe_study(root: str, train_flags: list[str], make_config: MakeConfig, *, seeds: list[str],
                     recipes: list[str], parallel: int = 1, rerun: bool = False, log=print) -> list[dict]:
    """The Keras guide's `model.fit` recipe against this codebase's defaults and any
    `--recipe=NAME:FLAGS`, on the same data, weights, stages and seeds: one table
    (mean, 95 % t-interval, paired difference against the guide) and one plot.

    Raises:
      UserError: invalid flags or recipes, stages the guide cannot run, or stale trials.
    """
    trials = recipe_trials(train_flags, parse_recipes(recipes), seeds)
    prepare(root, trials, make_config, rerun=rerun, log=log)
    run_all(root, trials, parallel=parallel, log=log)
    rows = collect(root, trials)
    keys = ["recipe", SEED_KEY]
    write_tables(root, rows, keys, title="Recipes: the Keras guide's model.fit recipe and this codebase's",
                 baseline=("recipe", "guide"))
    plot(root, rows, keys)
    write_hparams(root, trials)
    return rows


def transfer_plan(train_flags: list[str], make_config: MakeConfig) -> tuple[ExperimentConfig, int]:
    """The config the study's flags give, and its backbone's number of blocks.

    The backbone is read from the config `launch.train` would build, whatever
    the flag syntax (`--backbone=X` or `--backbone X`).
    """
    from research.model import backbones

    cfg = make_config(train_flags)
    entry = backbones.get(cfg.model.backbone)
    base = backbones.build_base(cfg.model.backbone, image_size=max(entry.min_size, 16), alpha=cfg.model.alpha)
    return cfg, len(backbones.blocks(base, cfg.model.backbone))


def run_transfer_study(root: str, train_flags: list[str], make_config: MakeConfig, *, seeds: list[str],
                       classes_a: str, classes_b: str, epochs: int, parallel: int = 1, rerun: bool = False,
                       log=print) -> tuple[list[dict], dict]:
    """Yosinski et al. (2014) on any dataset and backbone given by `train_flags`.

    Returns:
      (one row per trial, `transfer_report`'s summary).

    Raises:
      UserError: invalid flags, or stale trials without `rerun`.
    """
    flags_ = [f"--finetune_epochs={epochs}", *train_flags]
    cfg, num_blocks = transfer_plan(flags_, make_config)
    bases, transfers = transfer_trials(root, num_blocks=num_blocks, classes_a=classes_a, classes_b=classes_b,
                                       seeds=seeds, base_flags=flags_)
    trials = bases + transfers
    prepare(root, trials, make_config, rerun=rerun, log=log)
    run_all(root, bases, parallel=parallel, log=log)
    run_all(root, transfers, parallel=parallel, log=log)
    rows = collect(root, trials)
    write_tables(root, rows, ["n", "condition", SEED_KEY], title="Transfer study: every trial")
    write_hparams(root, trials)
    summary = transfer_report(root, rows, title=f"Transfer study ({cfg.model.backbone}, A={classes_a}, B={classes_b})")
    return rows, summary


# --- the transfer study (Yosinski et al., 2014) -------------------------------------------

TRANSFER_CONDITIONS = ("AnB", "AnB+", "BnB", "BnB+")


def transfer_trials(root: str, *, num_blocks: int, classes_a: str, classes_b: str, seeds: list[str],
                    base_flags: list[str]) -> tuple[list[Trial], list[Trial]]:
    """The two phases of "How transferable are features in deep neural networks?".

    Phase 1 trains a base on each half of the classes (baseA, baseB; baseB is
    also the control: B trained from scratch). Phase 2, for n = 1..num_blocks,
    copies the first n blocks of baseA (AnB) or baseB (BnB, the selffer) into a
    fresh network for B and either freezes them (AnB, BnB) or fine-tunes
    everything (AnB+, BnB+). BatchNorm keeps the default policy (frozen, inference
    mode): with ~200 steps per run, Keras's moving averages (momentum 0.99) would
    not converge and validation would collapse; the paper's networks had no BN.

    Returns:
      (phase-1 trials, phase-2 trials).
    """
    bases, transfers = [], []
    common = list(base_flags)
    for seed in seeds:
        for half, classes in (("A", classes_a), ("B", classes_b)):
            values = {"n": "0", "condition": f"base{half}", "seed": seed}
            bases.append(Trial(f"base{half}__seed-{seed}", values,
                               common + [f"--classes={classes}", "--unfreeze=all", f"--seed={seed}"],
                               group=f"base{half}"))
    for seed in seeds:
        for n in range(1, num_blocks + 1):
            for cond in TRANSFER_CONDITIONS:
                src = cond[0]
                frozen = not cond.endswith("+")
                spec = ("none" if n == num_blocks else f"top:{num_blocks - n}") if frozen else "all"
                values = {"n": str(n), "condition": cond, "seed": seed}
                transfers.append(Trial(
                    f"{cond.replace('+', 'plus')}__n-{n}__seed-{seed}", values,
                    common + [f"--classes={classes_b}", f"--weights=ckpt:{os.path.join(root, 'trials', f'base{src}__seed-{seed}')}",
                              f"--init_blocks={n}", f"--unfreeze={spec}", f"--seed={seed}"],
                    group=f"{cond}__n-{n}"))
    return bases, transfers


def transfer_report(root: str, rows: list[dict], *, title: str) -> dict:
    """Writes `transfer.md` and `transfer.png`: accuracy on B per condition and n, with
    95 % t-intervals over seeds, and each condition's paired difference against baseB
    (B trained from scratch with the same seed).

    Returns:
      `{"accuracy": {condition: {n: Interval}}, "vs_baseB": {condition: {n: Interval}},
      "baseB": Interval, "metric": the metric}`.
    """
    metric = headline_metric(rows)
    done = [r for r in rows if r["status"] == "done"]
    by_seed: dict = {}
    for r in done:
        by_seed.setdefault(r["condition"], {}).setdefault(int(r["n"]), {})[r[SEED_KEY]] = r[metric]
    accuracy = {c: {n: stats.t_interval(list(v.values())) for n, v in sorted(d.items())} for c, d in by_seed.items()}
    control = by_seed.get("baseB", {}).get(0, {})
    base_b = stats.t_interval(list(control.values()))
    vs_base = {c: {n: stats.paired_difference(v, control) for n, v in sorted(d.items())}
               for c, d in by_seed.items() if c in TRANSFER_CONDITIONS}
    ns = sorted({int(r["n"]) for r in done if r["condition"] in TRANSFER_CONDITIONS})
    header = ["| condition | " + " | ".join(f"n={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    lines = [f"# {title}", "", *protocol_lines(rows, metric), "",
             f"## {metric} on the B classes: mean and 95 % t-interval over seeds", "",
             f"Control, B trained from scratch (baseB): {base_b.format()}.", "", *header]
    for c in TRANSFER_CONDITIONS:
        if c in accuracy:
            lines.append(f"| {c} | " + " | ".join(accuracy[c][n].format() if n in accuracy[c] else "" for n in ns)
                         + " |")
    lines += ["", "## Paired difference against baseB (same seed), 95 % t-interval", "",
              "`*` marks an interval that excludes zero.", "", *header]
    for c in TRANSFER_CONDITIONS:
        if c in vs_base:
            cells = [vs_base[c][n].format(signed=True) + (" *" if vs_base[c][n].excludes_zero() else "")
                     if n in vs_base[c] else "" for n in ns]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    with open(os.path.join(root, "transfer.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_rows = [r for r in rows if r.get("condition") in TRANSFER_CONDITIONS]
    plot(root, plot_rows, ["n", "condition", SEED_KEY], metric=metric, filename="transfer.png",
         baseline=("baseB (B from scratch)", base_b), title=title)
    return {"accuracy": accuracy, "vs_baseB": vs_base, "baseB": base_b, "metric": metric}


# --- the probe study: which blocks, predicted, against the sweep ------------------------------

def run_probe_study(root: str, train_flags: list[str], make_config: MakeConfig, *, seeds: list[str],
                    specs: list[str], autos: list[str], parallel: int = 1, rerun: bool = False,
                    log=print) -> tuple[list[dict], dict]:
    """The probe curve (`launch.probe`), the `auto:` specs' choices, and the brute-force
    sweep over fixed specs, on the same data and seeds: `probe_study.md`, `probe_study.png`.

    Raises:
      UserError: invalid flags or specs, or stale trials without `rerun`.
    """
    from research.model import unfreeze

    bad = [a for a in autos if unfreeze.parse_auto(a) is None]
    if bad or not specs:
        raise UserError(f"--auto takes auto:K, auto:rgn:K or auto:probe:K specs (got {bad}); --specs the fixed "
                        "specs to sweep (e.g. none,top:1,top:2,all)" if bad else "--specs lists no fixed spec")
    trials = expand([("unfreeze", [*specs, *autos]), (SEED_KEY, seeds)], train_flags)
    prepare(root, trials, make_config, rerun=rerun, log=log)
    probe_dir = os.path.join(root, "probe")
    probe_json = os.path.join(probe_dir, "probe.json")
    if os.path.exists(probe_json):
        with open(probe_json) as f:
            if json.load(f).get("train_flags") != train_flags or rerun:  # stale: probe again
                shutil.rmtree(probe_dir)
    if not os.path.exists(probe_json):
        log("[ablate] running the linear probes")
        cmd = [sys.executable, "-m", "launch.probe", f"--out={probe_dir}", "--", *train_flags]
        os.makedirs(probe_dir, exist_ok=True)
        with open(os.path.join(probe_dir, "stdout.log"), "w") as out, \
                open(os.path.join(probe_dir, "stderr.log"), "w") as err:
            rc = subprocess.call(cmd, stdout=out, stderr=err, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        if rc != 0:
            raise UserError(f"launch.probe failed (exit {rc}); see {probe_dir}/stderr.log")
        with open(probe_json) as f:
            probe = json.load(f)
        with open(probe_json, "w") as f:
            json.dump(dict(probe, train_flags=train_flags), f, indent=2)
    run_all(root, trials, parallel=parallel, log=log)
    rows = collect(root, trials)
    for r in rows:
        if r["status"] == "done" and unfreeze.parse_auto(r["unfreeze"]):
            with open(os.path.join(trial_dir(root, next(t for t in trials if t.name == r["trial"])),
                                   "results.json")) as f:
                auto = json.load(f)["auto_unfreeze"][-1]
            r["auto_blocks"], r["auto_seconds"] = ",".join(auto["blocks"]), auto["seconds"]
    keys = ["unfreeze", SEED_KEY]
    write_tables(root, rows, keys, title="Unfreeze specs: fixed and auto", baseline=("unfreeze", specs[0]))
    plot(root, rows, keys)
    write_hparams(root, trials)
    with open(os.path.join(probe_dir, "probe.json")) as f:
        probe = json.load(f)
    summary = probe_report(root, rows, probe, specs=specs, autos=autos)
    return rows, summary


def probe_report(root: str, rows: list[dict], probe: dict, *, specs: list[str], autos: list[str]) -> dict:
    """`probe_study.md` and `probe_study.png`: the probe curve, then each auto spec against
    the best and the worst fixed spec (paired by seed) and the cost of predicting."""
    metric = headline_metric(rows)
    done = [r for r in rows if r["status"] == "done"]
    by = {s: {r[SEED_KEY]: r[metric] for r in done if r["unfreeze"] == s} for s in [*specs, *autos]}
    means = {s: stats.t_interval(list(v.values())) for s, v in by.items() if v}
    fixed = [s for s in specs if s in means]
    if not fixed:
        raise UserError(f"no fixed-spec trial finished in {root}; see results.md for their errors")
    best = max(fixed, key=lambda s: means[s].mean)
    worst = min(fixed, key=lambda s: means[s].mean)
    # The sweep's cost for one seed: every fixed spec's run of that seed, averaged over seeds.
    seeds = sorted({r[SEED_KEY] for r in done if r["unfreeze"] in specs})
    sweep_s = sum(r["wall_time_s"] for r in done if r["unfreeze"] in specs) / max(len(seeds), 1)
    lines = [f"# Which blocks to unfreeze: the prediction against the sweep", "", *protocol_lines(rows, metric), "",
             "## Linear probes per block (the backbone frozen)", "",
             "| depth | block | val | test [95 % Wilson] |", "|---|---|---|---|"]
    for p in probe["rows"]:
        test = f"{p['test_accuracy']:.4f} [{p['test_lo']:.4f}, {p['test_hi']:.4f}]" if "test_accuracy" in p else ""
        lines.append(f"| {p['depth']} | {p['block']} | {p['val_accuracy']:.4f} | {test} |")
    lines += ["", f"Probes: {probe['seconds']['total']:.0f}s. The sweep over {len(fixed)} fixed specs: "
              f"{sweep_s:.0f}s of training per seed.", "",
              f"## {metric}: fixed specs and auto specs, mean and 95 % t-interval over seeds", "",
              f"| spec | n | {metric} | blocks chosen (per seed) | Δ vs best ({best}) | Δ vs worst ({worst}) "
              "| in best's interval | measuring s | run s (mean) | run s / sweep s |", "|---|---|---|---|---|---|---|---|---|---|"]
    out = {"best": best, "worst": worst, "sweep_seconds": sweep_s, "auto": {}}
    for s in [*fixed, *[a for a in autos if a in means]]:
        rs = [r for r in done if r["unfreeze"] == s]
        run_s = float(np.mean([r["wall_time_s"] for r in rs]))
        cells = [f"`{s}`", str(means[s].n), means[s].format()]
        if s in autos:
            vs_best, vs_worst = stats.paired_difference(by[s], by[best]), stats.paired_difference(by[s], by[worst])
            inside = means[best].has_interval and means[best].lo <= means[s].mean <= means[best].hi
            measuring = float(np.mean([r.get("auto_seconds", 0.0) for r in rs]))
            chosen = "; ".join(f"{r[SEED_KEY]}: {r.get('auto_blocks', '')}" for r in rs)
            cells += [chosen, vs_best.format(signed=True) + (" *" if vs_best.excludes_zero() else ""),
                      vs_worst.format(signed=True) + (" *" if vs_worst.excludes_zero() else ""),
                      "yes" if inside else "no", f"{measuring:.1f}", f"{run_s:.0f}", f"{run_s / max(sweep_s, 1e-9):.2f}"]
            out["auto"][s] = {"mean": means[s], "vs_best": vs_best, "vs_worst": vs_worst, "inside_best": inside,
                              "run_fraction_of_sweep": run_s / max(sweep_s, 1e-9)}
        else:
            cells += ["", "", "", "", "", f"{run_s:.0f}", ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "`*`: the paired interval excludes zero. *run s / sweep s*: one auto run (measurement "
              "included) against the sweep's training time for one seed (every fixed spec once)."]
    with open(os.path.join(root, "probe_study.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot_probe_study(root, probe, means, fixed, [a for a in autos if a in means], metric)
    return out


def _plot_probe_study(root: str, probe: dict, means: dict, fixed: list[str], autos: list[str], metric: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    rows = probe["rows"]
    x = [r["depth"] for r in rows]
    a.plot(x, [r["val_accuracy"] for r in rows], "o-", label="probe, validation")
    if all("test_accuracy" in r for r in rows):
        a.plot(x, [r["test_accuracy"] for r in rows], "s-", label="probe, test")
    a.set_xticks(x, [r["block"] for r in rows], rotation=60, ha="right", fontsize=7)
    a.set_ylabel("linear probe accuracy")
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    names = [*fixed, *autos]
    for i, s in enumerate(names):
        iv = means[s]
        half = (iv.hi - iv.mean) if iv.has_interval else 0.0
        b.errorbar([i], [iv.mean], yerr=[half], fmt="o" if s in fixed else "D", capsize=3,
                   color="C0" if s in fixed else "C3")
    b.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    b.set_ylabel(f"fine-tuned {metric}")
    b.grid(alpha=0.3)
    b.set_title("fixed specs (blue), auto (red): mean, 95 % t-interval", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(root, "probe_study.png"), dpi=120)
    plt.close(fig)
