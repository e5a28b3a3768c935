"""The transfer study (Yosinski et al., 2014, "How transferable are features in deep
neural networks?") on any dataset and backbone: bases on each half of the classes,
then their first n blocks copied into a network for the other half, frozen or
fine-tuned; `transfer.md` and `transfer.png`."""

from __future__ import annotations

import os

from research.config import ExperimentConfig
from research.studies import stats
from research.studies.tables import collect, headline_metric, plot, protocol_lines, write_hparams, write_tables
from research.studies.trials import SEED_KEY, MakeConfig, Trial, prepare, run_all

def transfer_plan(train_flags: list[str], make_config: MakeConfig) -> tuple[ExperimentConfig, int]:
    """The config the study's flags give, and its backbone's number of blocks.

    The backbone is read from the config the flags give, whatever the flag syntax (`--backbone=X` or `--backbone X`).
    """
    from research.model import backbones

    cfg = make_config(train_flags)
    return cfg, len(backbones.get(cfg.model.backbone).block_names)


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
    accuracy = {c: {n: stats.t_interval(list(v.values()), within=stats.bounds(metric)) for n, v in sorted(d.items())}
                for c, d in by_seed.items()}
    control = by_seed.get("baseB", {}).get(0, {})
    base_b = stats.t_interval(list(control.values()), within=stats.bounds(metric))
    vs_base = {c: {n: stats.paired_difference(v, control, metric=metric) for n, v in sorted(d.items())}
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
