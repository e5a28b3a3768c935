"""Which parameters to train, at which budget (`launch.ablate --study=peft`): block
unfreezing (`top:K`, `all`) beside the parameter-efficient specs (`norm`, `bias`,
`lora:R`) on the same data and seeds, as one sweep over `--unfreeze` (research/studies/
ablation.py), then one table and one plot of test accuracy against trained parameters.

Per spec: test accuracy (mean, 95 % t-interval), the paired difference against `all`,
whether the mean lands inside `all`'s interval, the backbone parameters trained and
their share of the backbone, the seconds per epoch of the last stage (the median of its
epochs after the first, which traces), and the peak host memory (and GPU memory, on
GPUs). The plot marks the Pareto front: the specs no other spec beats with as few
trained parameters.
"""

from __future__ import annotations

import json
import os
import statistics

from research.studies import stats
from research.studies.ablation import run_sweep
from research.studies.tables import headline_metric
from research.studies.trials import SEED_KEY, MakeConfig

SPECS = ("none", "norm", "bias", "lora:4", "lora:16", "top:1", "top:2", "top:4", "all")
REFERENCE = "all"


def run_peft_study(root: str, train_flags: list[str], make_config: MakeConfig, *, seeds: list[str],
                   specs: list[str] | tuple[str, ...] = SPECS, parallel: int = 1, rerun: bool = False,
                   log=print, ready=lambda: None) -> list[dict]:
    """Runs every spec on every seed (resumable, as any sweep), then writes `peft.md` and
    `peft.png` beside the sweep's own tables.

    Raises:
      UserError: invalid flags or specs, or stale trials without `rerun`.
    """
    baseline = f"unfreeze:{REFERENCE}" if REFERENCE in specs else None
    rows = run_sweep(root, [f"unfreeze:{';'.join(specs)}", f"{SEED_KEY}:{','.join(seeds)}"], train_flags,
                     make_config, parallel=parallel, rerun=rerun, baseline=baseline, log=log, ready=ready)
    for row in rows:
        row.update(trial_costs(os.path.join(root, "trials", row["trial"])))
    summary = summarize(rows, list(specs))
    write_report(root, summary, headline_metric(rows))
    plot(root, summary, headline_metric(rows))
    return rows


def trial_costs(workdir: str) -> dict:
    """A finished trial's last stage's seconds per epoch, its backbone share and peak memory."""
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        r = json.load(f)
    last = r["stages"][-1]
    epochs = [h["train_seconds"] for h in r["history"]
              if h["stage"] == last["name"] and h.get("train_seconds") is not None]
    memory = [p.get("peak_memory_mb", {}) for p in r.get("provenance", [])]
    return {"seconds_per_epoch": statistics.median(epochs[1:] or epochs) if epochs else None,
            "backbone_share": last.get("backbone_share"),
            "peak_host_mb": max((m.get("host_rss", 0.0) for m in memory), default=None) or None,
            "peak_gpu_mb": max((v for m in memory for k, v in m.items() if k != "host_rss"), default=None)}


def summarize(rows: list[dict], specs: list[str]) -> list[dict]:
    """One entry per spec, in the order given, with the Pareto front marked."""
    metric = headline_metric(rows)
    by_spec = {s: [r for r in rows if r.get("unfreeze") == s and r["status"] == "done"] for s in specs}
    ref = {r[SEED_KEY]: r[metric] for r in by_spec.get(REFERENCE, [])}
    out = []
    for spec, done in by_spec.items():
        first = done[0] if done else {}

        def median(key):
            values = [r[key] for r in done if r.get(key) is not None]
            return statistics.median(values) if values else None

        out.append({
            "spec": spec, "n": len(done), "metric": metric,
            "test": stats.t_interval([r[metric] for r in done], within=stats.bounds(metric)),
            "diff": (stats.paired_difference({r[SEED_KEY]: r[metric] for r in done}, ref, metric=metric)
                     if ref and spec != REFERENCE else None),
            "trained": first.get("backbone_trained_params"), "trainable": first.get("trainable_params"),
            "share": first.get("backbone_share"), "seconds_per_epoch": median("seconds_per_epoch"),
            "peak_host_mb": median("peak_host_mb"), "peak_gpu_mb": median("peak_gpu_mb")})
    reference = next((e["test"] for e in out if e["spec"] == REFERENCE), None)
    for e in out:
        e["inside_reference"] = (None if reference is None or e["spec"] == REFERENCE or not e["n"]
                                 else reference.lo <= e["test"].mean <= reference.hi)
        e["pareto"] = bool(e["n"]) and e["trainable"] is not None and not any(
            o is not e and o["n"] and o["trainable"] is not None and o["trainable"] <= e["trainable"]
            and o["test"].mean >= e["test"].mean and (o["trainable"], o["test"].mean) != (e["trainable"], e["test"].mean)
            for o in out)
    return out


def _num(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def write_report(root: str, summary: list[dict], metric: str) -> None:
    ref = REFERENCE if any(e["spec"] == REFERENCE for e in summary) else None
    lines = ["# Which parameters to train, at which budget", "",
             f"{metric}: mean and 95 % t-interval over seeds"
             + (f"; Δ: paired difference against `{ref}` on the same seeds; 'inside': the mean falls inside "
                f"`{ref}`'s interval" if ref else "") + ". Trained: the backbone's parameters the last stage "
             "trains (the head's are not counted), and their share of the backbone. s/epoch: the last stage's, "
             "the median of its whole epochs after the first. Peak host MB: the largest of the sessions that "
             "finished (a session killed before its end records none). Pareto: no other spec reaches a higher mean "
             "with as few trained parameters."
             + (" Under the default `--bn=frozen`, `all` trains no BatchNorm gamma/beta: `all+norm` is every "
                "parameter." if ref else ""), "",
             f"| spec | n | {metric} | Δ vs {ref or '-'} | inside | trained | share | s/epoch | peak host MB | "
             "peak GPU MB | Pareto |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for e in summary:
        t, d = e["test"], e["diff"]
        test = (f"{t.mean:.4f} [{t.lo:.4f}, {t.hi:.4f}]" if t.n >= 2 else _num(t.mean, ".4f") if t.n else "")
        diff = (f"{d.mean:+.4f} [{d.lo:+.4f}, {d.hi:+.4f}]" if d is not None and d.n >= 2 else
                "(reference)" if e["spec"] == ref else "")
        inside = {True: "yes", False: "no", None: ""}[e["inside_reference"]]
        lines.append(f"| `{e['spec']}` | {e['n']} | {test} | {diff} | {inside} | {_num(e['trained'], ',')} | "
                     f"{_num(e['share'], '.2%')} | {_num(e['seconds_per_epoch'], '.2f')} | "
                     f"{_num(e['peak_host_mb'], '.0f')} | {_num(e['peak_gpu_mb'], '.0f')} | "
                     f"{'yes' if e['pareto'] else ''} |")
    with open(os.path.join(root, "peft.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(root: str, summary: list[dict], metric: str) -> None:
    """Test accuracy against trained parameters (the head's included, so `none` has a place on
    the log axis), 95 % intervals, the Pareto front joined."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [e for e in summary if e["n"] and e["trainable"]]
    if not points:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for e in points:
        t = e["test"]
        err = [[t.mean - t.lo], [t.hi - t.mean]] if t.n >= 2 else None
        ax.errorbar(e["trainable"], t.mean, yerr=err, fmt="o", color="C3" if e["pareto"] else "C0", capsize=3)
        ax.annotate(e["spec"], (e["trainable"], t.mean), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = sorted((e for e in points if e["pareto"]), key=lambda e: e["trainable"])
    ax.plot([e["trainable"] for e in front], [e["test"].mean for e in front], "-", color="C3", alpha=0.6,
            label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("trained parameters (backbone and head, log scale)")
    ax.set_ylabel(f"{metric} (mean, 95 % t-interval)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(root, "peft.png"), dpi=120)
    plt.close(fig)
