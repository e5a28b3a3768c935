"""Which blocks to unfreeze, measured before fine-tuning: block-wise linear probes and
relative gradient norms.

* **Linear probes at every depth** (Alain & Bengio, 2016; the transferability curves
  of Yosinski et al., 2014 and Kornblith et al., 2019): the pretrained backbone
  frozen, the globally pooled output of every block (a *tap*) is recorded in one
  pass over the data, and a logistic regression is fitted on each tap. Where the
  probe's accuracy stops rising with depth, the blocks above have become specific
  to the source task: those are the ones worth unfreezing.
* **Relative gradient norms** (Lee et al., 2023, "Surgical fine-tuning", Auto-RGN):
  ‖∂L/∂θ_b‖ / ‖θ_b‖ per block b on a few batches of the target data, without an
  update. Blocks with a large RGN are those the target task pulls on hardest.

The probe is a scikit-learn `LogisticRegression` (L-BFGS, standardised features)
rather than a head trained by the loop: it is convex, so one fit per tap and
regularisation strength is the answer, with no learning rate or epoch count to
choose, and the strength is chosen on validation from `C_GRID`. Given the
features it is deterministic, so a probe curve has no seed spread: its intervals
are Wilson score intervals over the test images.

`auto:K` specs (`research/model/unfreeze.py`) turn either signal into K blocks.
"""

from __future__ import annotations

import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

from research.model import backbones

C_GRID = (0.01, 0.1, 1.0, 10.0)


# --- taps ---------------------------------------------------------------------------------

def tap_layers(base: keras.Model, backbone: str) -> list[tuple[str, str]]:
    """(block, the name of its last layer) for every block, input to output (`backbones.block_ends`)."""
    last = backbones.block_ends(base, backbone)
    return [(b, last[b]) for b in backbones.blocks(base, backbone)]


def tap_model(base: keras.Model, backbone: str) -> keras.Model:
    """The base with one output per block: that block's output, pooled as the head pools it
    (`backbones.pooled`: averaged, or a transformer's class token)."""
    pool, at = backbones.get(backbone).pool, backbones.block_outputs(base, backbone)
    outputs = [backbones.pooled(at[block], f"tap_{block}", pool) for block, _ in tap_layers(base, backbone)]
    return keras.Model(base.inputs, outputs, name="taps")


def tap_features(taps: keras.Model, batches: tf.data.Dataset, *, num: int | None = None,
                 directory: str | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """One pass over `(model input, label)` batches: per tap, the [N, channels] features; the labels.

    With `directory` (and `num`, the number of examples), each tap's features are
    written batch by batch into `directory/TAP.npy` and returned memory-mapped, so
    that memory holds one batch, not the dataset.
    """
    run = tf.function(lambda x: taps(x, training=False))
    feats: list = []
    labels, done = [], 0
    for x, y in batches:
        outs = [o.numpy().astype(np.float32) for o in run(x)]
        if not feats:
            if directory:
                os.makedirs(directory, exist_ok=True)
                feats = [np.lib.format.open_memmap(os.path.join(directory, f"{i}.npy"), mode="w+",
                                                   dtype=np.float32, shape=(num, o.shape[1]))
                         for i, o in enumerate(outs)]
            else:
                feats = [[] for _ in outs]
        for f, o in zip(feats, outs):
            if directory:
                f[done:done + len(o)] = o
            else:
                f.append(o)
        done += len(outs[0])
        labels.append(y.numpy())
    if directory:
        for f in feats:
            f.flush()
        return feats, np.concatenate(labels).astype(np.int64)
    return [np.concatenate(f) for f in feats], np.concatenate(labels).astype(np.int64)


def split_features(taps: keras.Model, splits: dict, *, directory: str | None = None) -> tuple[dict, dict]:
    """`{split: (uint8 (image, label) dataset, preprocess, number of examples)}` -> per split, the
    taps' features (memory-mapped under `directory/SPLIT/` if given) and the labels."""
    features, labels = {}, {}
    for split, (ds, prep, num) in splits.items():
        batches = ds.batch(128).map(lambda x, y, prep=prep: (prep(x), y)).prefetch(tf.data.AUTOTUNE)
        features[split], labels[split] = tap_features(
            taps, batches, num=num, directory=os.path.join(directory, split) if directory else None)
    return features, labels


# --- the probe ------------------------------------------------------------------------------

def wilson(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95 % Wilson score interval of a proportion (binomial over `n` images)."""
    if n == 0:
        return math.nan, math.nan
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def fit_probe(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
              test: tuple[np.ndarray, np.ndarray] | None) -> dict:
    """A logistic regression on one tap: C chosen on validation accuracy (ties: the lower
    validation log-loss), then scored on train, validation and test."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (xt, yt), (xv, yv) = train, val
    labels = np.unique(np.concatenate([yt, yv]))
    best = None
    for c in C_GRID:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
        clf.fit(xt, yt)
        acc = float((clf.predict(xv) == yv).mean())
        # A class without training images gets probability 0 (log_loss clips it).
        proba = np.zeros((len(yv), len(labels)))
        proba[:, np.searchsorted(labels, clf.classes_)] = clf.predict_proba(xv)
        # Float32 features give rows that sum to 1 within float32's precision, which
        # scikit-learn's log_loss warns about (once per C and block): renormalised in float64.
        proba /= proba.sum(axis=1, keepdims=True)
        loss = float(log_loss(yv, proba, labels=labels))
        if best is None or (acc, -loss) > (best[1], -best[2]):
            best = (c, acc, loss, clf)
    c, val_acc, val_loss, clf = best
    out = {"C": c, "train_accuracy": float((clf.predict(xt) == yt).mean()), "val_accuracy": val_acc,
           "val_loss": val_loss}
    if test is not None:
        xs, ys = test
        correct = int((clf.predict(xs) == ys).sum())
        lo, hi = wilson(correct, len(ys))
        out.update({"test_accuracy": correct / len(ys), "test_lo": lo, "test_hi": hi, "num_test": len(ys)})
    return out


def probe_curve(features: dict[str, list[np.ndarray]], labels: dict[str, np.ndarray], blocks: list[str],
                *, log=print) -> list[dict]:
    """One row per block: its channels and the probe's accuracies (`fit_probe`)."""
    rows = []
    for i, block in enumerate(blocks):
        t0 = time.perf_counter()
        test = (features["test"][i], labels["test"]) if "test" in features else None
        r = fit_probe((features["train"][i], labels["train"]), (features["val"][i], labels["val"]), test)
        rows.append({"block": block, "depth": i + 1, "channels": int(features["train"][i].shape[1]), **r})
        log(f"[probe] {block}: val {r['val_accuracy']:.4f}" +
            (f", test {r['test_accuracy']:.4f}" if "test_accuracy" in r else "") +
            f" (C={r['C']:g}, {time.perf_counter() - t0:.1f}s)")
    return rows


# --- relative gradient norms -----------------------------------------------------------------

def block_variables(model: keras.Model, backbone: str, *, train_bn: bool = False) -> dict[str, list]:
    """The base variables a run could train, by block: those of `unfreeze.select`'s
    `all` spec (BatchNorm's gamma/beta only with `train_bn`)."""
    from research.model import unfreeze

    base, block_of, names = unfreeze.layer_blocks(model, backbone)
    selected = {id(v) for v in unfreeze.select(model, backbone, "all", train_bn=train_bn).variables}
    out: dict[str, list] = {b: [] for b in names}
    for layer in base.layers:
        out[block_of[layer.name]].extend(v for v in layer.weights if id(v) in selected)
    return {b: vs for b, vs in out.items() if vs}


def relative_gradient_norms(model: keras.Model, backbone: str, batches: tf.data.Dataset, *,
                            train_bn: bool = False) -> dict[str, float]:
    """‖g_b‖ / ‖θ_b‖ per block, g_b the mean gradient of the cross-entropy over `batches`
    (the model in inference mode, no update): Lee et al.'s RGN, per block.

    Runs under the current strategy: each replica differentiates its share of a batch
    and the gradients are summed across replicas (and workers), so every replica and
    worker gets the same scores, and the same choice of blocks.
    """
    by_block = block_variables(model, backbone, train_bn=train_bn)
    variables = [v for vs in by_block.values() for v in vs]
    strategy = tf.distribute.get_strategy()

    def replica_grads(x, y):
        with tf.GradientTape() as tape:
            tape.watch([v.value for v in variables])  # frozen Keras variables: watch what they hold
            per_example = keras.losses.sparse_categorical_crossentropy(y, model(x, training=False),
                                                                       from_logits=True)
            loss = tf.reduce_sum(per_example) / tf.cast(tf.shape(y)[0], tf.float32)
        grads = tape.gradient(loss, [v.value for v in variables])
        return [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g) for g, v in zip(grads, variables)]

    @tf.function
    def grads(dist_batch):
        per_replica = strategy.run(replica_grads, args=dist_batch)
        return [strategy.reduce(tf.distribute.ReduceOp.MEAN, g, axis=None) for g in per_replica]

    total, n = None, 0
    for dist_batch in strategy.experimental_distribute_dataset(batches):
        g = grads(dist_batch)
        total = g if total is None else [a + b for a, b in zip(total, g)]
        n += 1
    if not n:
        raise ValueError("no batches to measure gradients on")
    out, i = {}, 0
    for block, vs in by_block.items():
        g2 = sum(float(tf.reduce_sum(tf.square(total[i + j] / n))) for j in range(len(vs)))
        w2 = sum(float(tf.reduce_sum(tf.square(v))) for v in vs)
        out[block] = math.sqrt(g2) / max(math.sqrt(w2), 1e-12)
        i += len(vs)
    return out


# --- choosing K blocks ------------------------------------------------------------------------

def choose_by_rgn(scores: dict[str, float], blocks: list[str], k: int) -> list[str]:
    """The K blocks with the largest RGN (ties: the deeper block), input to output."""
    ranked = sorted(scores, key=lambda b: (-scores[b], -blocks.index(b)))
    chosen = set(ranked[:k])
    return [b for b in blocks if b in chosen]


def peak(rows: list[dict]) -> str:
    """The block the probes peak at: the first (from the input) at the best validation accuracy."""
    return max(rows, key=lambda r: r["val_accuracy"])["block"]  # max keeps the first of equals


def choose_by_probe(rows: list[dict], blocks: list[str], k: int) -> list[str]:
    """The K blocks right above the probe's validation peak (`peak`); when fewer than K lie
    above it, the top K blocks."""
    start = min(blocks.index(peak(rows)) + 1, len(blocks) - k)
    return blocks[max(0, start):max(0, start) + k]
