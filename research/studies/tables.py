"""A sweep's results: rows per trial, means and intervals over seeds, paired differences,
the tables (`results.csv`, `summary.csv`, `results.md`), the plot and TensorBoard HParams."""

from __future__ import annotations

import csv
import json
import os
import re

from absl import logging

from research import provenance
from research.config import UserError
from research.studies import stats
from research.studies.trials import SEED_KEY, Trial, is_finished, trial_dir

# The run's metric vocabulary: test/... and val/... are the final weights', best/... the
# run's best epoch (chosen on validation).
COLUMNS = ["test/accuracy", "val/accuracy", "test/loss", "val/loss", "best/test/accuracy", "best/val/accuracy",
           "best_epoch", "epochs", "early_stopped", "trainable_params", "backbone_trained_params", "wall_time_s",
           "images_per_second", "code"]
VARIANT_COLUMN = re.compile(r"test_\w+/accuracy")  # a weight variant's test score (test_ema/accuracy), after best/
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
            trainable = [s for s in r["stages"] if s.get("trainable_params") is not None]
            row.update({"status": "done", **{k: final.get(k) for k in ("test/accuracy", "val/accuracy", "test/loss",
                                                                       "val/loss")},
                        **{k: v for k, v in final.items() if VARIANT_COLUMN.fullmatch(k)},
                        "best/test/accuracy": best.get("test/accuracy"),
                        "best/val/accuracy": best.get("val/accuracy"),
                        "best_epoch": r["best_epoch"], "epochs": r["epochs_run"],
                        "early_stopped": r["early_stopping_fired"],
                        # The last stage's (the most any stage trains in the usual head-then-base runs).
                        "trainable_params": trainable[-1]["trainable_params"] if trainable else None,
                        "backbone_trained_params": trainable[-1].get("backbone_trained_params") if trainable else None,
                        "wall_time_s": round(r["wall_time_s"], 1),
                        "images_per_second": round(r["images_per_second"], 1),
                        "test_from": r.get("test_from", "none"),
                        # Every code version the trial ran under (a resumed trial may have several).
                        "code": " & ".join(dict.fromkeys(provenance.short(p.get("code"))
                                                         for p in r.get("provenance", []))) or "unknown"})
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
            agg[m] = stats.t_interval([r.get(m) for r in done], within=stats.bounds(m))
        agg["diff"] = agg["is_baseline"] = None
        if baseline is not None:
            key, value = baseline
            agg["is_baseline"] = agg[key] == value
            ref = by_values.get(tuple(value if k == key else agg[k] for k in swept))
            if ref is not None and not agg["is_baseline"]:
                agg["diff"] = stats.paired_difference(
                    {r.get(SEED_KEY, ""): r.get(metric) for r in done},
                    {r.get(SEED_KEY, ""): r.get(metric) for r in ref if r["status"] == "done"}, metric=metric)
        out.append(agg)
    return out


def _fmt(v, column: str = "") -> str:
    if v is None:
        return ""
    if isinstance(v, stats.Interval):
        return v.format()
    if isinstance(v, float):
        if column in ("wall_time_s", "images_per_second"):  # seconds and rates: one decimal is their precision
            return f"{v:.1f}"
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


def code_lines(rows: list[dict]) -> list[str]:
    """The code the table's trials ran: one line, or a warning naming which trials ran which."""
    by_code: dict[str, list[str]] = {}
    for r in rows:
        if r["status"] == "done":
            by_code.setdefault(r.get("code") or "unknown", []).append(r["trial"])
    if len(by_code) <= 1:
        return ["", f"Code: {next(iter(by_code), 'unknown')} (`research.provenance`; +dirty: uncommitted changes, "
                "with the hash of their diff)."]
    logging.warning("the trials of one table ran different code: %s", ", ".join(by_code))
    return ["", "**Warning: these trials ran different code**, so their differences may be the code's: "
            + "; ".join(f"`{code}`: {', '.join(trials)}" for code, trials in by_code.items()) + "."]


def write_csv(root: str, rows: list[dict], keys: list[str]) -> list[str]:
    """`results.csv`: every trial's values and metrics. Returns its columns."""
    variants = sorted({k for r in rows for k in r if VARIANT_COLUMN.fullmatch(k)})
    at = COLUMNS.index("best/val/accuracy") + 1
    cols = ["trial", *keys, "status", *COLUMNS[:at], *variants, *COLUMNS[at:], "error"]
    with open(os.path.join(root, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in cols})
    return cols


def write_tables(root: str, rows: list[dict], keys: list[str], *, title: str = "Sweep results",
                 baseline: tuple[str, str] | None = None) -> list[dict]:
    """`results.csv` (every trial), `summary.csv` and `results.md` (trials, then per row of
    seeds: mean, 95 % t-interval, n and the paired difference against the baseline).

    Returns:
      `aggregate`'s rows.
    """
    cols = write_csv(root, rows, keys)
    lines = [f"# {title}", "", "| " + " | ".join(cols[1:-1]) + " |", "|" + "---|" * (len(cols) - 2)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c), c) for c in cols[1:-1]) + " |")
    lines += code_lines(rows)
    failed = [r for r in rows if r["status"] != "done"]
    if failed:
        lines += ["", "Failed or missing trials:", ""] + [f"- `{r['trial']}`: {r.get('error') or r['status']}" for r in failed]
    agg = aggregate(rows, keys, baseline)
    ks = [k for k in keys if k != SEED_KEY]
    if any(r["status"] == "done" for r in rows):
        metric = headline_metric(rows)
        other = "val/accuracy" if metric == "test/accuracy" else "best/val/accuracy"
        base = f"{baseline[0]}={baseline[1]}" if baseline else ""
        lines += ["", f"## {metric}: mean and 95 % t-interval over seeds", "", *protocol_lines(rows, metric), "",
                  *([f"Δ is the paired difference in {metric} against the baseline row ({base}) on the same "
                     "seeds, with its 95 % t-interval; \"excludes 0\" says whether the interval leaves out zero.",
                     ""] if baseline else []),
                  "| " + " | ".join((ks or ["trials"]) + ["n", metric, other]
                                    + ([f"Δ vs {base}", "excludes 0"] if baseline else []))
                  + " |", "|" + "---|" * (len(ks or [0]) + 3 + 2 * bool(baseline))]
        for a in agg:
            # A sweep of seeds only is one row: every trial.
            cells = ([_fmt(a.get(k)) for k in ks] or ["all"]) + [str(a["n"]), a[metric].format(), a[other].format()]
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
    if xs_key is None:  # seeds only: one point, every trial
        xs_key, rows = "trials", [{**r, "trials": "all"} for r in rows]
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
        ivs = [stats.t_interval(pts[xs[i]], within=stats.bounds(metric)) for i in px]
        # Below and above the mean apart: an interval cut at the metric's range is asymmetric.
        yerr = [[iv.mean - iv.lo if iv.has_interval else 0.0 for iv in ivs],
                [iv.hi - iv.mean if iv.has_interval else 0.0 for iv in ivs]]
        ax.errorbar([p + shift for p in px], [iv.mean for iv in ivs], yerr=yerr, marker="o", capsize=3,
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
    # A key whose every value is a number (seed, lr, epochs) is numeric in the dashboard:
    # sortable, plottable against a metric; the others are categories.
    numeric = {k for k in keys if all(_is_number(str(t.values.get(k, ""))) for t in trials)}

    def value(k, v):
        return float(v) if k in numeric else str(v)

    hparams = {k: hp.HParam(k, hp.Discrete(sorted({value(k, t.values.get(k, "")) for t in trials}))) for k in keys}
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
            hp.hparams({hparams[k]: value(k, v) for k, v in t.values.items()}, trial_id=t.name)
        open(marker, "w").close()
