"""Mixup (Zhang et al., 2018) and CutMix (Yun et al., 2019) on training batches.

Batch-level, as timm's `Mixup` in its default `batch` mode: one λ per batch,
drawn from Beta(α, α); each image is mixed with the image at the mirrored
position of the batch (`x[::-1]`), and the one-hot targets are mixed with the
same weights, so they still sum to 1. CutMix pastes a box of area (1 - λ) of
the image (clipped at the borders; λ is then recomputed from the box actually
pasted). With both on, each mixed batch picks one of the two with probability
1/2; `mix_prob` is the probability that a batch is mixed at all.

The draws are stateless, from the batch's (epoch seed, batch index) like the
augmentation, so a resumed epoch mixes exactly the same batches. Mixing runs on
the global batch before it is split across replicas: MirroredStrategy trains on
the same mixed images as one device.
"""

from __future__ import annotations

import tensorflow as tf

from research.config import AugmentConfig

_SALT = 7919  # separates the mixing draws from the augmentation's, which use the same batch seed


def _beta(seed, alpha: float) -> tf.Tensor:
    """A Beta(α, α) draw, as the ratio of two Gamma(α) draws."""
    a = tf.random.stateless_gamma([], seed[0], alpha)
    b = tf.random.stateless_gamma([], seed[1], alpha)
    return a / (a + b)


def draw(cfg: AugmentConfig, seed, height: int, width: int) -> dict[str, tf.Tensor]:
    """The mixing of one batch: `lam` (the weight of the batch's own images and targets),
    `cutmix` (a box is pasted) and the box `[y0, y1, x0, x1]`. A function of `seed` only."""
    keys = tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), _SALT), 7)
    mixed = tf.random.stateless_uniform([], keys[0]) < cfg.mix_prob
    if cfg.mixup and cfg.cutmix:
        cutmix = tf.random.stateless_uniform([], keys[1]) < 0.5
    else:
        cutmix = tf.constant(bool(cfg.cutmix))
    lam_mixup = _beta(keys[2:4], cfg.mixup) if cfg.mixup else tf.constant(1.0)
    lam_cut = _beta(keys[4:6], cfg.cutmix) if cfg.cutmix else tf.constant(1.0)
    # The box: sides sqrt(1 - λ) of the image's, centred anywhere, clipped at the borders.
    ratio = tf.sqrt(1.0 - lam_cut)
    cut_h = tf.cast(tf.round(ratio * height), tf.int32)
    cut_w = tf.cast(tf.round(ratio * width), tf.int32)
    centre = tf.random.stateless_uniform([2], keys[6], 0.0, 1.0)
    cy = tf.cast(centre[0] * height, tf.int32)
    cx = tf.cast(centre[1] * width, tf.int32)
    y0, y1 = tf.clip_by_value(cy - cut_h // 2, 0, height), tf.clip_by_value(cy + (cut_h + 1) // 2, 0, height)
    x0, x1 = tf.clip_by_value(cx - cut_w // 2, 0, width), tf.clip_by_value(cx + (cut_w + 1) // 2, 0, width)
    box_lam = 1.0 - tf.cast((y1 - y0) * (x1 - x0), tf.float32) / float(height * width)
    lam = tf.where(mixed, tf.where(cutmix, box_lam, lam_mixup), 1.0)
    return {"lam": lam, "cutmix": tf.logical_and(mixed, cutmix), "box": tf.stack([y0, y1, x0, x1])}


def mix_batch(cfg: AugmentConfig, images: tf.Tensor, labels: tf.Tensor, num_classes: int, seed):
    """(mixed images, soft targets [N, num_classes] summing to 1) for one batch."""
    height, width = int(images.shape[1]), int(images.shape[2])
    d = draw(cfg, seed, height, width)
    target = tf.one_hot(tf.cast(labels, tf.int32), num_classes)
    other_x, other_y = images[::-1], target[::-1]
    rows = tf.range(height)[:, None]
    cols = tf.range(width)[None, :]
    y0, y1, x0, x1 = d["box"][0], d["box"][1], d["box"][2], d["box"][3]
    inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    pasted = tf.where(inside[None, :, :, None], other_x, images)
    lam = tf.cast(d["lam"], images.dtype)
    blended = lam * images + (1.0 - lam) * other_x
    mixed_x = tf.where(d["cutmix"], pasted, blended)
    lam_y = tf.cast(d["lam"], tf.float32)
    return mixed_x, lam_y * target + (1.0 - lam_y) * other_y
