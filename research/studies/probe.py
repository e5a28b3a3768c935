"""Probe studies: the probe curve of one config (`run_probe`: every block of its backbone
probed on its data and splits), and the study that sets it beside the `auto:` specs'
choices and a sweep of fixed specs (`run_probe_study`). The probes themselves are
research/model/probe.py."""

from __future__ import annotations

import os
import time

import json
import shutil

import keras
import numpy as np
import tensorflow as tf

from research.model.probe import probe_curve, split_features, tap_layers, tap_model
from research.config import UnfreezeSpec, UserError
from research.run import build as build_lib
from research.studies import stats
from research.studies.tables import collect, headline_metric, plot, protocol_lines, write_hparams, write_tables
from research.studies.trials import SEED_KEY, MakeConfig, expand, prepare, run_all, run_config, trial_dir


def conclusion(rows: list[dict]) -> str:
    """One line: the block the probes peak at, and what `auto:probe:K` would unfreeze."""
    from research.model.probe import choose_by_probe, peak as peak_of

    blocks = [r["block"] for r in rows]
    peak = rows[blocks.index(peak_of(rows))]
    picks = "; ".join(f"auto:probe:{k} -> {','.join(choose_by_probe(rows, blocks, k))}"
                      for k in (1, 2, 3) if k <= len(blocks))
    return (f"peak: {peak['block']} (validation accuracy {peak['val_accuracy']:.4f}, block "
            f"{blocks.index(peak['block']) + 1} of {len(blocks)}); unfreezing would pick {picks}")


def run_probe(config, out_dir: str, *, max_memory_mb: float = 2048, log=print) -> list[dict]:
    """Probes every block of the config's backbone, initialised as the run would be
    (pretrained weights, or `ckpt:`), on its data and splits; writes `probe.csv`,
    `probe.md`, `probe.png` and TensorBoard scalars (step = block depth) in `out_dir`.

    The features of every tap stay in memory when they fit in `max_memory_mb`;
    otherwise they are written to `out_dir/features/` and read back memory-mapped.

    Raises:
      UserError: bad data, weights or flags.
    """
    os.makedirs(out_dir, exist_ok=True)
    keras.utils.set_random_seed(config.train.seed)  # the head, and a backbone without pretrained weights
    strategy = tf.distribute.get_strategy()
    t0 = time.perf_counter()
    source, pipeline = build_lib.build_inputs(config, strategy, cache_dir=os.path.join(out_dir, "cache"), verbose=False)
    build_lib.prepare_inputs(pipeline)
    m = build_lib.build(config, source.num_classes, strategy)
    build_lib.init_weights(config, m)
    taps = tap_model(m.base, config.model.backbone)
    blocks = [b for b, _ in tap_layers(m.base, config.model.backbone)]
    splits = {"train": (pipeline.cached_train, pipeline.train_preprocess, source.num_train),
              "val": (pipeline.cached_val, pipeline.eval_preprocess, source.num_val)}
    if source.test is not None:
        splits["test"] = (source.test, pipeline.eval_preprocess, source.num_test)
    channels = sum(int(o.shape[-1]) for o in taps.outputs)
    size_mb = sum(n for _, _, n in splits.values()) * channels * 4 / 2**20
    on_disk = size_mb > max_memory_mb
    features, labels = split_features(taps, splits, directory=os.path.join(out_dir, "features") if on_disk else None)
    extract_s = time.perf_counter() - t0
    log(f"[probe] {len(blocks)} taps of {config.model.backbone} on {sum(len(v) for v in labels.values())} images "
        f"({size_mb:.0f} MB of features, {'on disk in ' + out_dir + '/features' if on_disk else 'in memory'}) "
        f"in {extract_s:.1f}s")
    rows = probe_curve(features, labels, blocks, log=log)
    write_probe(out_dir, rows, title=f"{config.model.backbone} on {config.data.dataset}",
                test_from=source.test_from, seconds={"extract": extract_s,
                                                      "total": time.perf_counter() - t0})
    return rows


def write_probe(out_dir: str, rows: list[dict], *, title: str, test_from: str, seconds: dict) -> None:
    import csv
    import json

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["depth", "block", "channels", "C", "train_accuracy", "val_accuracy", "val_loss", "test_accuracy",
            "test_lo", "test_hi", "num_test"]
    with open(os.path.join(out_dir, "probe.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    has_test = all("test_accuracy" in r for r in rows)
    lines = [f"# Linear probes per block: {title}", "",
             f"A logistic regression on each block's pooled output, the backbone frozen; C chosen on validation. "
             f"Test: {test_from}" + ("; its 95 % Wilson interval over the test images." if has_test else "."),
             f"Feature extraction {seconds['extract']:.1f}s, in all {seconds['total']:.1f}s.", "",
             "| depth | block | channels | C | train | val | " + ("test [95 %] |" if has_test else ""),
             "|---|---|---|---|---|---|" + ("---|" if has_test else "")]
    for r in rows:
        cells = [str(r["depth"]), r["block"], str(r["channels"]), f"{r['C']:g}", f"{r['train_accuracy']:.4f}",
                 f"{r['val_accuracy']:.4f}"]
        if has_test:
            cells.append(f"{r['test_accuracy']:.4f} [{r['test_lo']:.4f}, {r['test_hi']:.4f}]")
        lines.append("| " + " | ".join(cells) + " |")
    with open(os.path.join(out_dir, "probe.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "probe.json"), "w") as f:
        json.dump({"rows": rows, "test_from": test_from, "seconds": seconds}, f, indent=2)
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(rows) + 2), 3.8))
    x = [r["depth"] for r in rows]
    ax.plot(x, [r["val_accuracy"] for r in rows], "o-", label="validation")
    if has_test:
        ax.errorbar(x, [r["test_accuracy"] for r in rows],
                    # max(0, ...): at 0 % or 100 % the bound equals the proportion up to rounding
                    yerr=[[max(0.0, r["test_accuracy"] - r["test_lo"]) for r in rows],
                          [max(0.0, r["test_hi"] - r["test_accuracy"]) for r in rows]],
                    fmt="s-", capsize=3, label="test (95 % Wilson)")
    ax.set_xticks(x, [r["block"] for r in rows], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("probe accuracy")
    ax.set_title(f"linear probe per block: {title}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "probe.png"), dpi=120)
    plt.close(fig)
    with tf.summary.create_file_writer(out_dir).as_default():
        for r in rows:
            for key in ("train_accuracy", "val_accuracy", "test_accuracy"):
                if key in r:
                    tf.summary.scalar(f"probe/{key}", r[key], step=r["depth"])


def run_probe_study(root: str, train_flags: list[str], make_config: MakeConfig, *, seeds: list[str],
                    specs: list[str], autos: list[str], parallel: int = 1, rerun: bool = False,
                    log=print) -> tuple[list[dict], dict]:
    """The probe curve (`run_probe`), the `auto:` specs' choices, and the brute-force
    sweep over fixed specs, on the same data and seeds: `probe_study.md`, `probe_study.png`.

    Raises:
      UserError: invalid flags or specs, or stale trials without `rerun`.
    """
    def is_auto(text: str) -> bool:
        try:
            return UnfreezeSpec.parse(text).kind == "auto"
        except UserError:
            return False

    bad = [a for a in autos if not is_auto(a)]
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
        rc = run_config("probe", make_config(train_flags), probe_dir, os.path.join(root, "probe.trial.json"))
        if rc != 0:
            raise UserError(f"the linear probes failed (exit {rc}); see {probe_dir}/stderr.log")
        with open(probe_json) as f:
            probe = json.load(f)
        with open(probe_json, "w") as f:
            json.dump(dict(probe, train_flags=train_flags), f, indent=2)
    run_all(root, trials, parallel=parallel, log=log)
    rows = collect(root, trials)
    for r in rows:
        if r["status"] == "done" and is_auto(r["unfreeze"]):
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
    means = {s: stats.t_interval(list(v.values()), within=stats.bounds(metric)) for s, v in by.items() if v}
    fixed = [s for s in specs if s in means]
    if not fixed:
        raise UserError(f"no fixed-spec trial finished in {root}; see results.md for their errors")
    best = max(fixed, key=lambda s: means[s].mean)
    worst = min(fixed, key=lambda s: means[s].mean)
    # The sweep's cost for one seed: every fixed spec's run of that seed, averaged over seeds.
    seeds = sorted({r[SEED_KEY] for r in done if r["unfreeze"] in specs})
    sweep_s = sum(r["wall_time_s"] for r in done if r["unfreeze"] in specs) / max(len(seeds), 1)
    lines = ["# Which blocks to unfreeze: the prediction against the sweep", "", *protocol_lines(rows, metric), "",
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
            vs_best = stats.paired_difference(by[s], by[best], metric=metric)
            vs_worst = stats.paired_difference(by[s], by[worst], metric=metric)
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
        below, above = (iv.mean - iv.lo, iv.hi - iv.mean) if iv.has_interval else (0.0, 0.0)
        b.errorbar([i], [iv.mean], yerr=[[below], [above]], fmt="o" if s in fixed else "D", capsize=3,
                   color="C0" if s in fixed else "C3")
    b.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    b.set_ylabel(f"fine-tuned {metric}")
    b.grid(alpha=0.3)
    b.set_title("fixed specs (blue), auto (red): mean, 95 % t-interval", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(root, "probe_study.png"), dpi=120)
    plt.close(fig)
