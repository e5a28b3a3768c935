"""The linear-probe study of one config: every block of its backbone probed on its
data and splits (`launch.probe`); the probes themselves are research/model/probe.py."""

from __future__ import annotations

import os
import time

import keras
import tensorflow as tf

from research.model.probe import probe_curve, split_features, tap_layers, tap_model
from research.run import build as build_lib


def run_probe(config, out_dir: str, *, max_memory_mb: float = 2048, log=print) -> list[dict]:
    """Probes every block of the config's backbone, initialised as the run would be
    (pretrained weights, or `ckpt:`), on its data and splits; writes `probe.csv`,
    `probe.md`, `probe.png` and TensorBoard scalars (step = block depth) in `out_dir`.

    The features of every tap stay in memory when they fit in `max_memory_mb`;
    otherwise they are written to `out_dir/features/` and read back memory-mapped.

    Raises:
      UserError: bad data, weights or flags (as `launch.train` reports them).
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
