"""The start of fine-tuning, step by step (`launch.ablate --study=dip`): does the first
fine-tuning epoch lose what the head learned, and which change keeps it?

Each recipe (`default` and every `--recipe=NAME:FLAGS`, e.g. a warmup, a base/head rate
ratio, zero-LR steps for Adam's moments) runs on every seed with `--unfreeze=all`; the
defaults also run every other `--specs` value (e.g. `top:2`). Every trial checkpoints each
`--checkpoint_every_steps` steps (and logs `--log_block_grads`), and afterwards each
checkpoint of the first fine-tuning epoch is scored on validation: the curve that the
per-epoch history hides. Written to `dip.md` and `dip.png`:

- per row: the head's last validation accuracy, the lowest point of the first fine-tuning
  epoch's curve (the dip), the first and the last fine-tuning epoch's validation accuracy
  (mean and 95 % t-interval over seeds), the paired difference against `default` on the
  same seeds, how far the base moved in that epoch (`train/block_change`, mean over
  blocks), and whether any fine-tuning epoch's mean falls below the head's last.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from research.config import UserError
from research.studies import stats
from research.studies.ablation import parse_recipes
from research.studies.tables import code_lines, collect
from research.studies.trials import SEED_KEY, MakeConfig, Trial, prepare, run_all, trial_dir, trial_name

SPECS = ("all", "top:2")
EVERY = 10  # steps between checkpoints when the flags give none


def dip_trials(base_flags: list[str], recipes: list[tuple[str, list[str]]], specs: list[str],
               seeds: list[str]) -> list[Trial]:
    """`default` on every spec; each recipe on the first spec (`all`)."""
    every = [] if any(f.startswith("--checkpoint_every_steps") for f in base_flags) else [
        f"--checkpoint_every_steps={EVERY}"]
    base = [*base_flags, *every, "--checkpoint_keep=100000", "--log_block_grads"]
    out = []
    for name, extra in [("default", []), *recipes]:
        for spec in specs if name == "default" else specs[:1]:
            for seed in seeds:
                values = {"recipe": name, "unfreeze": spec, SEED_KEY: seed}
                out.append(Trial(trial_name(values), values, [*base, f"--unfreeze={spec}", *extra,
                                                              f"--seed={seed}"],
                                 trial_name({"recipe": name, "unfreeze": spec})))
    return out


def run_dip_study(root: str, train_flags: list[str], make_config: MakeConfig, *, seeds: list[str],
                  recipes: list[str], specs: list[str] | tuple[str, ...] = SPECS, parallel: int = 1,
                  rerun: bool = False, log=print, ready=lambda: None) -> list[dict]:
    """Runs the trials (resumable, as any sweep), scores their first fine-tuning epoch's
    checkpoints on validation, and writes `dip.md` and `dip.png`.

    Raises:
      UserError: invalid flags or recipes, or stale trials without `rerun`.
    """
    trials = dip_trials(train_flags, parse_recipes(recipes), list(specs), seeds)
    prepare(root, trials, make_config, rerun=rerun, log=log)
    for t in trials:
        if len(t.config.stages) < 2 or t.config.data.refit:
            refit = " and no validation (--refit)" if t.config.data.refit else ""
            raise UserError(f"trial {t.name}: the dip study scores the fine-tuning stage that follows a first "
                            f"stage (e.g. --head_epochs=8) on validation; it has {len(t.config.stages)} stage(s)"
                            f"{refit}")
    ready()
    run_all(root, trials, parallel=parallel, log=log)
    rows = collect(root, trials)
    for row, t in zip(rows, trials):
        if row["status"] == "done":
            row.update(first_epoch(trial_dir(root, t), log=log))
    summary = summarize(rows)
    write_report(root, summary, rows)
    plot(root, summary)
    return rows


def first_epoch(workdir: str, *, log=print) -> dict:
    """The head's last epoch and the first fine-tuning epoch of a finished two-stage run,
    step by step on validation (cached in `dip.json`)."""
    cache = os.path.join(workdir, "dip.json")
    if os.path.exists(cache):
        with open(cache) as f:
            return json.load(f)
    with open(os.path.join(workdir, "results.json")) as f:
        r = json.load(f)
    history = r["history"]
    stages = list(dict.fromkeys(h["stage"] for h in history))  # the first stage, then the one studied
    head = [h for h in history if h["stage"] == stages[0]]
    ft = [h for h in history if h["stage"] == stages[1]]
    start, end = head[-1]["step"], ft[0]["step"]
    import tensorflow as tf

    from research.run.checkpoints import load_run, restore, saved_step
    from research.serve.evaluate import log_softmax, loss_and_accuracy, predict_dataset, split_data

    paths = tf.train.get_checkpoint_state(os.path.join(workdir, "ckpt")).all_model_checkpoint_paths
    # One checkpoint per step: the epoch's own save may fall on a step a periodic one took.
    # The head's last checkpoint (step 0), then the first fine-tuning epoch's.
    inside = sorted({s: p for p in paths if start <= (s := saved_step(p)) <= end}.items())
    config, model, names, _ = load_run(workdir, checkpoint=inside[0][1])
    val = split_data(config, model.input_shape[1], names, dataset=None, split="val").batches()
    curve = []
    log(f"[ablate] {os.path.basename(workdir)}: scoring {len(inside)} checkpoints of the first fine-tuning epoch")
    for step, path in inside:
        restore(workdir, path, model=model)
        logits, labels = predict_dataset(model, val)
        loss, accuracy = loss_and_accuracy(log_softmax(logits), labels)
        curve.append({"step": step - start, "val/accuracy": accuracy, "val/loss": loss})
    moved = [v for k, v in ft[0].items() if k.startswith("train/block_change/")]
    out = {"curve": curve, "head_last": head[-1]["val/accuracy"], "ft_first": ft[0]["val/accuracy"],
           "ft_epochs": [h["val/accuracy"] for h in ft], "ft_last": ft[-1]["val/accuracy"],
           "dip_low": min(c["val/accuracy"] for c in curve[1:]),
           "block_change": float(np.mean(moved)) if moved else None, "steps_per_epoch": end - start}
    with open(cache, "w") as f:
        json.dump(out, f, indent=1)
    return out


def _iv(values):
    return stats.t_interval(values, within=(0.0, 1.0))


def _loss_iv(values):
    return stats.t_interval(values, within=(0.0, math.inf))


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per (recipe, spec), in the order run, with paired differences against
    `default` on the same spec and seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == "done" and "curve" in r:
            groups.setdefault((r["recipe"], r["unfreeze"]), []).append(r)
    out = []
    for (recipe, spec), rs in groups.items():
        ref = {r[SEED_KEY]: r for r in groups.get(("default", spec), [])}

        def diff(key, rs=rs, ref=ref):
            return stats.paired_difference({r[SEED_KEY]: r[key] for r in rs},
                                           {s: r[key] for s, r in ref.items()}, metric="val/accuracy")

        steps = sorted({c["step"] for r in rs for c in r["curve"]})

        def mean_curve(key, rs=rs, steps=steps):
            return [float(np.mean([next((c[key] for c in r["curve"] if c["step"] == s), math.nan) for r in rs]))
                    for s in steps]

        epochs = np.mean([r["ft_epochs"] for r in rs], axis=0)
        head = float(np.mean([r["head_last"] for r in rs]))
        out.append({"recipe": recipe, "unfreeze": spec, "n": len(rs), "head_last": _iv([r["head_last"] for r in rs]),
                    "dip_low": _iv([r["dip_low"] for r in rs]), "ft_first": _iv([r["ft_first"] for r in rs]),
                    "head_loss": _loss_iv([r["curve"][0]["val/loss"] for r in rs]),
                    "loss_high": _loss_iv([max(c["val/loss"] for c in r["curve"][1:]) for r in rs]),
                    "ft_last": _iv([r["ft_last"] for r in rs]),
                    "d_first": None if recipe == "default" else diff("ft_first"),
                    "d_last": None if recipe == "default" else diff("ft_last"),
                    "block_change": float(np.mean([r["block_change"] for r in rs if r["block_change"] is not None]
                                                  or [math.nan])),
                    "below_head": bool(min(epochs) < head), "steps": steps, "curve": mean_curve("val/accuracy"),
                    "loss_curve": mean_curve("val/loss")})
    return out


def write_report(root: str, summary: list[dict], rows: list[dict]) -> None:
    lines = ["# The start of fine-tuning, step by step", "",
             "Validation accuracy: the head's last epoch, the lowest checkpoint of the first fine-tuning epoch, "
             "the first and last fine-tuning epochs (mean and 95 % t-interval over seeds); Δ: paired against "
             "`default` on the same spec and seeds; moved: `train/block_change` in the first fine-tuning epoch "
             "(‖θ − θ_start‖ / ‖θ_start‖, mean over blocks); below head: some fine-tuning epoch's mean under the "
             "head's last; val loss: the head's last, and the highest checkpoint of the first fine-tuning epoch.",
             "", "| recipe | unfreeze | n | head's last | lowest, first ft epoch | ft epoch 1 | Δ ft epoch 1 "
             "| last ft epoch | Δ last | moved | below head | val loss, head's last | val loss, highest |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        d1, dl = s["d_first"], s["d_last"]
        lines.append(f"| {s['recipe']} | {s['unfreeze']} | {s['n']} | {s['head_last'].format()} | "
                     f"{s['dip_low'].format()} | {s['ft_first'].format()} | "
                     f"{d1.format(signed=True) if d1 else '(baseline)'} | {s['ft_last'].format()} | "
                     f"{dl.format(signed=True) if dl else '(baseline)'} | {s['block_change']:.4f} | "
                     f"{'yes' if s['below_head'] else 'no'} | {s['head_loss'].format()} | {s['loss_high'].format()} |")
    lines += code_lines(rows)
    with open(os.path.join(root, "dip.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(root: str, summary: list[dict]) -> str | None:
    """Mean validation accuracy and loss over the first fine-tuning epoch's steps, one line
    per row; step 0 is the head's last epoch."""
    if not summary:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, label in zip(axes, ("curve", "loss_curve"), ("val/accuracy", "val/loss")):
        for s in summary:
            ax.plot(s["steps"], s[key], marker=".", label=f"{s['recipe']} ({s['unfreeze']})")
        ax.set_xlabel("steps into the first fine-tuning epoch (0: the head's last epoch)")
        ax.set_ylabel(f"{label} (mean over seeds)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(root, "dip.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
