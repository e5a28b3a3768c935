"""Which block the head should read (`launch.ablate --study=features`): `--features`
values (the base's top, the probes' peak `auto`, lower blocks, several blocks
concatenated), each head-only (`--unfreeze=none`) and head-then-`all`, on the same data
and seeds, as one sweep (research/studies/ablation.py), then one table and one plot.

Per row: test accuracy (mean, 95 % t-interval), the paired difference against `top` in
the same mode, the backbone parameters the cut model keeps and those it trains, the
seconds per epoch of the last stage (`research.studies.peft.trial_costs`), and for
`auto` the block each seed's probes chose.
"""

from __future__ import annotations

import json
import os

from research.studies import stats
from research.studies.ablation import run_sweep
from research.studies.peft import trial_costs
from research.studies.tables import headline_metric
from research.studies.trials import SEED_KEY, MakeConfig

FEATURES = ("top", "auto")
MODES = ("none", "all")  # head-only; head, then every block that remains
REFERENCE = "top"


def run_features_study(root: str, train_flags: list[str], make_config: MakeConfig, *, seeds: list[str],
                       features: list[str] | tuple[str, ...] = FEATURES, parallel: int = 1, rerun: bool = False,
                       log=print, ready=lambda: None) -> list[dict]:
    """Runs every `--features` value in both modes on every seed (resumable, as any sweep),
    then writes `features.md` and `features.png` beside the sweep's own tables.

    Raises:
      UserError: invalid flags or features, or stale trials without `rerun`.
    """
    rows = run_sweep(root, [f"features:{';'.join(features)}", f"unfreeze:{','.join(MODES)}",
                            f"{SEED_KEY}:{','.join(seeds)}"], train_flags, make_config, parallel=parallel,
                     rerun=rerun, log=log, ready=ready)
    for row in rows:
        row.update(_trial_features(os.path.join(root, "trials", row["trial"])))
    summary = summarize(rows, list(features))
    write_report(root, summary, headline_metric(rows))
    plot(root, summary, headline_metric(rows))
    return rows


def _trial_features(workdir: str) -> dict:
    """A finished trial's costs and what its head read."""
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        record = json.load(f).get("features") or {}
    return dict(trial_costs(workdir), read=record.get("resolved"), kept=record.get("backbone_params"),
                whole=record.get("whole_backbone_params"))


def summarize(rows: list[dict], features: list[str]) -> list[dict]:
    """One entry per (mode, features value), modes outer, in the order given."""
    metric = headline_metric(rows)
    out = []
    for mode in MODES:
        done = {f: [r for r in rows if r.get("features") == f and r.get("unfreeze") == mode and r["status"] == "done"]
                for f in features}
        ref = {r[SEED_KEY]: r[metric] for r in done.get(REFERENCE, [])}
        for feat, runs in done.items():
            first = runs[0] if runs else {}
            seconds = sorted(r["seconds_per_epoch"] for r in runs if r.get("seconds_per_epoch") is not None)
            out.append({
                "mode": mode, "features": feat, "n": len(runs), "metric": metric,
                "test": stats.t_interval([r[metric] for r in runs], within=stats.bounds(metric)),
                "diff": (stats.paired_difference({r[SEED_KEY]: r[metric] for r in runs}, ref, metric=metric)
                         if ref and feat != REFERENCE else None),
                "read": [r.get("read") for r in sorted(runs, key=lambda r: str(r[SEED_KEY]))],
                "kept": first.get("kept"), "whole": first.get("whole"),
                "trained": first.get("backbone_trained_params"), "trainable": first.get("trainable_params"),
                "seconds_per_epoch": seconds[len(seconds) // 2] if seconds else None})
    return out


def _num(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def _read(entry: dict) -> str:
    """What the head read, when it is not the value itself (`auto`): per seed, or once if all agree."""
    if entry["features"] != "auto" or not entry["read"]:
        return ""
    read = entry["read"]
    return read[0] if len(set(read)) == 1 else "; ".join(str(r) for r in read)


def write_report(root: str, summary: list[dict], metric: str) -> None:
    lines = ["# Which block the head reads", "",
             f"{metric}: mean and 95 % t-interval over seeds; Δ: paired difference against `{REFERENCE}` in the "
             "same mode, on the same seeds. Mode `none`: head only; `all`: the head, then every block the model "
             "keeps. Kept: the backbone parameters of the cut model (the blocks above the highest block read are "
             "dropped); trained: those the last stage trains (the head's not counted); head: the parameters of "
             "the whole trainable set of the last stage. s/epoch: the last stage's, median over seeds of the "
             "median of its epochs after the first. For `auto`, the block the probes chose (per seed if they differ).",
             "",
             f"| mode | features | n | {metric} | Δ vs {REFERENCE} | reads | kept | trained | trainable | s/epoch |",
             "|---|---|---|---|---|---|---:|---:|---:|---:|"]
    for e in summary:
        t, d = e["test"], e["diff"]
        test = f"{t.mean:.4f} [{t.lo:.4f}, {t.hi:.4f}]" if t.n >= 2 else _num(t.mean, ".4f") if t.n else ""
        diff = (f"{d.mean:+.4f} [{d.lo:+.4f}, {d.hi:+.4f}]" if d is not None and d.n >= 2 else
                "(reference)" if e["features"] == REFERENCE else "")
        lines.append(f"| {e['mode']} | `{e['features']}` | {e['n']} | {test} | {diff} | {_read(e)} | "
                     f"{_num(e['kept'], ',')} | {_num(e['trained'], ',')} | {_num(e['trainable'], ',')} | "
                     f"{_num(e['seconds_per_epoch'], '.2f')} |")
    with open(os.path.join(root, "features.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(root: str, summary: list[dict], metric: str) -> None:
    """Test accuracy per features value, one series per mode, 95 % intervals."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = list(dict.fromkeys(e["features"] for e in summary))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(values)), 4.2))
    for k, mode in enumerate(MODES):
        points = [(values.index(e["features"]) + (k - 0.5) * 0.15, e["test"]) for e in summary
                  if e["mode"] == mode and e["n"]]
        if not points:
            continue
        ax.errorbar([x for x, _ in points], [t.mean for _, t in points],
                    yerr=[[t.mean - t.lo if t.n >= 2 else 0 for _, t in points],
                          [t.hi - t.mean if t.n >= 2 else 0 for _, t in points]],
                    fmt="o", capsize=3, label={"none": "head only", "all": "head, then all"}[mode])
    ax.set_xticks(range(len(values)), values, rotation=20, ha="right", fontsize=8)
    ax.set_xlabel("--features (what the head reads)")
    ax.set_ylabel(f"{metric} (mean, 95 % t-interval)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(root, "features.png"), dpi=120)
    plt.close(fig)
