"""Augmentation inside tf.data: one fused geometric warp per batch, then contrast.

The knobs mirror the classic `ImageDataGenerator` ones (horizontal_flip,
rotation_range in degrees, width/height_shift_range, zoom_range) plus contrast;
fill mode is `nearest`, ImageDataGenerator's default. Images are float batches in
[0, 255], before the backbone's preprocessing.

Flip, rotation, shift and zoom are composed into one affine matrix per image and
applied by a single `keras.ops.image.affine_transform` (one bilinear resampling).
Keras's RandomFlip, RandomRotation, RandomTranslation and RandomZoom layers chained
do the same geometry in one pass per layer and resample the image once per warp:
on ants/bees at 96 px the augmented pipeline alone delivered 834 images/s with the
chained layers and 1551 with the fused warp (docs/BENCHMARKS.md); on a CPU-bound
machine that cost comes straight out of the training step. The conventions
(angle sign, centre of rotation and zoom, zoom direction, shift direction, value
ranges) are the Keras layers'; `tests/test_augment.py` pins the fused warp to them.

Randomness is stateless: batch b of an epoch draws its parameters from the seed
(epoch_seed, b), so the augmented images are a function of (seed, epoch) even
under a parallel map, and a resumed epoch sees exactly the same images.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from research.config import AugmentConfig


class Augmenter:
    """Draws per-image parameters from a seed and applies them to a batch.

    Args:
      cfg: augmentation settings (at least one knob on).
    """

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg
        self.warps = bool(cfg.rotation or cfg.width_shift or cfg.height_shift or cfg.zoom)
        # Keras's own contrast adjustment, fed the stateless per-image factors drawn here.
        self.contrast = keras.layers.RandomContrast(cfg.contrast, value_range=(0, 255)) if cfg.contrast else None

    def sample(self, n, seed) -> dict[str, tf.Tensor]:
        """Per-image parameters for a batch of `n`, a function of `seed` (shape [2] int) only.

        Ranges are those of the Keras layers with the same settings: flip with
        probability 1/2, angle uniform in +-rotation degrees, shift uniform in
        +-shift of the side, zoom factor uniform in 1 +- zoom (above 1 zooms out),
        contrast factor uniform in 1 +- contrast.
        """
        keys = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 6)

        def uniform(i, half_width):
            return tf.random.stateless_uniform([n], keys[i], -1.0, 1.0) * float(half_width)

        flip = tf.random.stateless_uniform([n], keys[0]) < 0.5
        return {"flip": tf.logical_and(flip, self.cfg.horizontal_flip),
                "angle": uniform(1, self.cfg.rotation * math.pi / 180.0),
                "shift": tf.stack([uniform(2, self.cfg.width_shift), uniform(3, self.cfg.height_shift)], axis=1),
                "zoom": 1.0 + uniform(4, self.cfg.zoom),
                "contrast": 1.0 + uniform(5, self.cfg.contrast)}

    def __call__(self, images: tf.Tensor, seed) -> tf.Tensor:
        """Augments a float batch [N, H, W, C] in [0, 255]; `seed` is a shape [2] int tensor."""
        p = self.sample(tf.shape(images)[0], seed)
        if self.warps:
            height, width = images.shape[1], images.shape[2]
            images = keras.ops.image.affine_transform(
                images, affine_matrices(p, height, width), interpolation="bilinear", fill_mode="nearest")
        elif self.cfg.horizontal_flip:
            images = tf.where(p["flip"][:, None, None, None], tf.reverse(images, axis=[2]), images)
        if self.contrast is not None:
            images = self.contrast.transform_images(images, {"contrast_factor": p["contrast"][:, None, None, None]})
        return images


def affine_matrices(p: dict, height: int, width: int) -> tf.Tensor:
    """The [N, 8] output-to-input transforms of flip, then rotation, shift and zoom.

    The four warps chained map an output pixel x to the input pixel
    flip(rotate(shift(zoom(x)))); about the image centre c that is
    A (x - c) + c + t with A = zoom * flip * rotation and t = -flip * rotation * shift.
    """
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    s = tf.where(p["flip"], -1.0, 1.0)
    cos, sin, z = tf.cos(p["angle"]), tf.sin(p["angle"]), p["zoom"]
    # Keras's rotation matrix for angle a is [[cos, -sin], [sin, cos]]; the flip negates row 0.
    a00, a01, a10, a11 = z * s * cos, -z * s * sin, z * sin, z * cos
    dx, dy = p["shift"][:, 0] * width, p["shift"][:, 1] * height
    t0 = -(s * cos * dx - s * sin * dy)
    t1 = -(sin * dx + cos * dy)
    zeros = tf.zeros_like(z)
    return tf.stack([a00, a01, cx - a00 * cx - a01 * cy + t0,
                     a10, a11, cy - a10 * cx - a11 * cy + t1, zeros, zeros], axis=1)


def build(cfg: AugmentConfig) -> Augmenter | None:
    """The augmentation of `cfg`, or None when every knob is off."""
    return Augmenter(cfg) if cfg.enabled else None
