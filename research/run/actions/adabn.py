"""AdaBN (Li et al., 2016): re-estimate BatchNorm statistics on the target data.

A pretrained backbone's BN layers normalise with the moving statistics of the
pretraining data. Frozen (`--bn=frozen`) they keep them, which suits target
photos close to ImageNet; on data far from it (upscaled 32-px images, medical
scans) every activation is shifted and scaled wrongly. `--bn=adapt` keeps BN
frozen while training but first replaces the moving mean and variance of every
BN layer with their average over the training batches, as PyTorch's
`torch.optim.swa_utils.update_bn` does: a forward pass in training mode (each
layer normalised with its batch's statistics), gamma and beta untouched, and
the cumulative average of each batch's mean and (biased, as Keras's BN uses)
variance. The result depends only on the weights and the data, not on the
statistics it replaces, so repeating it after a resume gives the same numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from research.run.actions.base import Action, Context

if TYPE_CHECKING:
    import keras
    import tensorflow as tf


def bn_layers(base: keras.Model) -> list:
    import keras
    # The base's own layers: `adapt` taps each one's input in the base's graph, which a
    # BatchNorm nested in a container is not part of (no registry backbone nests one).
    return [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]


def adapt(base: keras.Model, batches: tf.data.Dataset) -> int:
    """Sets the moving statistics of every BN layer of `base` from `batches` of its inputs.

    Runs in the cross-replica context: the (mirrored) statistics are assigned
    once, with the same values on every replica and worker.

    Returns:
      The number of images the statistics were estimated on (0: no BN layer).
    """
    import keras
    import tensorflow as tf

    layers = bn_layers(base)
    if not layers:
        return 0
    was = [layer.trainable for layer in layers]
    for layer in layers:
        layer.trainable = True  # training mode: normalise with the batch's statistics
    try:
        taps = keras.Model(base.inputs, [layer.input for layer in layers])

        @tf.function
        def moments(x):
            outs = taps(x, training=True)
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            stats = []
            for out, layer in zip(outs, layers):
                axes = [a for a in range(len(out.shape)) if a != (layer.axis % len(out.shape))]
                mean, var = tf.nn.moments(tf.cast(out, tf.float32), axes=axes)
                stats += [mean, var]
            return stats

        # The forward pass also moves the moving averages (Keras's BN updates them in
        # training mode); they are overwritten below, and nothing reads them meanwhile.
        saved = [(layer.moving_mean.numpy(), layer.moving_variance.numpy()) for layer in layers]
        sums, count, images = None, 0, 0
        for x, _ in batches:
            stats = [s.numpy().astype(np.float64) for s in moments(x)]
            sums = stats if sums is None else [a + b for a, b in zip(sums, stats)]
            count += 1
            images += int(x.shape[0])
        if count == 0:
            for layer, (m, v) in zip(layers, saved):
                layer.moving_mean.assign(m)
                layer.moving_variance.assign(v)
            return 0
        for i, layer in enumerate(layers):
            layer.moving_mean.assign((sums[2 * i] / count).astype(layer.moving_mean.dtype))
            layer.moving_variance.assign((sums[2 * i + 1] / count).astype(layer.moving_variance.dtype))
    finally:
        for layer, t in zip(layers, was):
            layer.trainable = t
    return images


@dataclass
class AdaBNState:
    adapted: list = field(default_factory=list)  # {"stage", "images"} per re-estimation


class AdaBN(Action):
    """`--bn=adapt`: BN statistics re-estimated on the training images (no augmentation)
    at the start of every stage, before it trains. A run killed before the stage's
    first checkpoint does it again on resume, from the same weights: the same statistics."""

    name = "adabn"
    State = AdaBNState

    def stage_start(self, ctx: Context, run, stage) -> None:
        if self.config.model.bn != "adapt" or run.epoch or run.step_in_epoch:
            return  # resumed inside the stage: its statistics are in the checkpoint
        t0 = time.perf_counter()
        n = adapt(ctx.built.base, ctx.pipeline.train_dataset(run.global_epoch, augment=False))
        ctx.base_changed()
        ctx.say(f"stage {stage.name}: BatchNorm statistics re-estimated on {n} training images "
                f"({time.perf_counter() - t0:.1f}s)")
        self.state(run).adapted.append({"stage": stage.name, "images": n})

    def results(self, run) -> dict:
        return {"bn_adapted": self.state(run).adapted}  # [] without --bn=adapt: results.json always has it
