"""Augmentation inside tf.data: one fused geometric warp per batch, RandAugment, then colour.

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


class _Seeds(keras.random.SeedGenerator):
    """Feeds a Keras layer's `get_random_transformation` stateless seeds derived from a
    tensor: Keras accepts only an int or a `SeedGenerator` there, and an int would be
    one constant per trace, a real generator one state shared across a parallel map.

    Deliberately skips `SeedGenerator.__init__` (which makes a state variable):
    `next` is all Keras's random ops call.
    """

    def __init__(self, seed):
        self._seed, self._count = tf.cast(seed, tf.int64), 0

    def next(self, ordered=True):
        self._count += 1
        return tf.random.experimental.stateless_fold_in(self._seed, self._count)


class RandAugment:
    """Keras's `RandAugment` operations (Cubuk et al., 2020), drawn per image from a
    stateless seed.

    Keras's layer draws its operations once per batch from a stateful generator;
    here each image draws its own `num_ops` operations, as in the paper and timm,
    and every parameter comes from (epoch seed, batch index). The operations, their
    magnitudes (`factor`) and their `transform_images` are the Keras layer's own.
    """

    def __init__(self, num_ops: int, magnitude: float):
        # float32 whatever the global policy: the ops' outputs are blended with float32 images.
        self.layer = keras.layers.RandAugment(value_range=(0, 255), num_ops=num_ops, factor=magnitude,
                                              dtype="float32")
        self.ops = [getattr(self.layer, name) for name in self.layer._AUGMENT_LAYERS]  # Keras 3.15's list
        self.num_ops = num_ops

    def choices(self, n, seed) -> tuple[tf.Tensor, tf.Tensor]:
        """[num_ops, n]: each image's operation in each round; and the key of their parameters."""
        keys = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
        idx = tf.random.stateless_uniform([self.num_ops, n], keys[0], 0, len(self.ops), dtype=tf.int32)
        return idx, keys[1]

    def operation(self, j: int, images, seed):
        """Operation j, its Keras parameters drawn from `seed`, on the images that drew it.

        Keras 3.15's `Equalization` pools its histograms over the whole batch; it
        runs image by image here, so that an image's result depends on it alone.
        """
        op = self.ops[j]
        transformation = op.get_random_transformation(images, training=True, seed=_Seeds(seed))
        if isinstance(op, keras.layers.Equalization):
            return tf.map_fn(lambda im: op.transform_images(im[None], transformation)[0], images)
        return op.transform_images(images, transformation)

    def __call__(self, images, seed):
        """Round i applies each image's i-th operation to the round's input. Each operation
        runs on the images that drew it only (gathered, then scattered back): one
        operation per image per round, not every operation on the whole batch as the
        Keras layer computes them."""
        idx, key = self.choices(tf.shape(images)[0], seed)
        for i in range(self.num_ops):
            out = images
            for j in range(len(self.ops)):
                chosen = tf.where(idx[i] == j)[:, 0]
                op_seed = tf.random.experimental.stateless_fold_in(key, i * len(self.ops) + j)

                def run(out=out, chosen=chosen, op_seed=op_seed, j=j, before=images):
                    done = self.operation(j, tf.gather(before, chosen), op_seed)
                    return tf.tensor_scatter_nd_update(out, chosen[:, None], done)

                out = tf.cond(tf.size(chosen) > 0, run, lambda out=out: out)
            images = out
        return images


class Augmenter:
    """Draws per-image parameters from a seed and applies them to a batch.

    Args:
      cfg: augmentation settings (at least one knob on).
    """

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg
        self.warps = bool(cfg.rotation or cfg.width_shift or cfg.height_shift or cfg.zoom or cfg.crop_scale)
        # Keras's own contrast adjustment, fed the stateless per-image factors drawn here.
        self.contrast = keras.layers.RandomContrast(cfg.contrast, value_range=(0, 255)) if cfg.contrast else None
        # Keras's colour layers too; their own factor arguments are unused (the draws are fed).
        self.brightness = keras.layers.RandomBrightness(cfg.brightness, value_range=(0, 255)) if cfg.brightness else None
        self.saturation = keras.layers.RandomSaturation(0.5, value_range=(0, 1)) if cfg.saturation else None
        self.hue = keras.layers.RandomHue(0.5, value_range=(0, 1)) if cfg.hue else None
        self.randaugment = RandAugment(cfg.randaugment, cfg.randaugment_magnitude) if cfg.randaugment else None

    def sample(self, n, seed, height: int = 1, width: int = 1) -> dict[str, tf.Tensor]:
        """Per-image parameters for a batch of `n`, a function of `seed` (shape [2] int) only.

        Ranges are those of the Keras layers with the same settings: flip with
        probability 1/2, angle uniform in +-rotation degrees, shift uniform in
        +-shift of the side, zoom factor uniform in 1 +- zoom (above 1 zooms out),
        contrast factor uniform in 1 +- contrast. The random-resized crop is
        torchvision's `RandomResizedCrop.get_params` on a continuous box (`crop_box`).
        """
        keys = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 6)
        # Knobs added later draw from their own keys, so the older ones keep their draws.
        more = tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), 1), 5)

        def uniform(i, half_width):
            return tf.random.stateless_uniform([n], keys[i], -1.0, 1.0) * float(half_width)

        flip = tf.random.stateless_uniform([n], keys[0]) < 0.5
        vflip = tf.random.stateless_uniform([n], more[0]) < 0.5
        p = {"flip": tf.logical_and(flip, self.cfg.horizontal_flip),
             "vflip": tf.logical_and(vflip, self.cfg.vertical_flip),
             "angle": uniform(1, self.cfg.rotation * math.pi / 180.0),
             "shift": tf.stack([uniform(2, self.cfg.width_shift), uniform(3, self.cfg.height_shift)], axis=1),
             "zoom": 1.0 + uniform(4, self.cfg.zoom),
             "contrast": 1.0 + uniform(5, self.cfg.contrast)}
        if self.cfg.crop_scale:
            p["crop"] = crop_box(n, more[1:], self.cfg.crop_range("crop_scale"), self.cfg.crop_range("crop_ratio"),
                                 height, width)
        colour = tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), 2), 5)
        # Drawn only when on: the draws run for every training batch.
        if self.cfg.brightness:
            p["brightness"] = tf.random.stateless_uniform([n], colour[0], -1.0, 1.0) * self.cfg.brightness * 255.0
        if self.cfg.saturation:
            p["saturation"] = 1.0 + tf.random.stateless_uniform([n], colour[1], -1.0, 1.0) * self.cfg.saturation
        if self.cfg.hue:
            p["hue"] = tf.random.stateless_uniform([n], colour[2], -1.0, 1.0) * self.cfg.hue
        if self.cfg.erase_prob:
            p["erase"] = erase_box(n, colour[3], self.cfg.erase_prob, height, width)
            p["erase_noise"] = colour[4]
        return p

    def __call__(self, images: tf.Tensor, seed) -> tf.Tensor:
        """Augments a float batch [N, H, W, C] in [0, 255]; `seed` is a shape [2] int tensor."""
        height, width = images.shape[1], images.shape[2]
        p = self.sample(tf.shape(images)[0], seed, height, width)
        if self.warps:
            images = keras.ops.image.affine_transform(
                images, affine_matrices(p, height, width), interpolation="bilinear", fill_mode="nearest")
        else:
            if self.cfg.horizontal_flip:
                images = tf.where(p["flip"][:, None, None, None], tf.reverse(images, axis=[2]), images)
            if self.cfg.vertical_flip:
                images = tf.where(p["vflip"][:, None, None, None], tf.reverse(images, axis=[1]), images)
        if self.randaugment is not None:
            images = self.randaugment(images, tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), 3))
        if self.contrast is not None:
            images = self.contrast.transform_images(images, {"contrast_factor": p["contrast"][:, None, None, None]})
        if self.brightness is not None:
            images = self.brightness.transform_images(images, {"rgb_delta": p["brightness"][:, None, None, None]})
        for layer, key in ((self.saturation, "saturation"), (self.hue, "hue")):
            if layer is not None:
                images = layer.transform_images(images / 255.0, {"factor": p[key]}) * 255.0
        if "erase" in p:
            images = erase(images, p["erase"], p["erase_noise"])
        return images


def crop_box(n, keys, scale: tuple[float, float], ratio: tuple[float, float], height: int, width: int
             ) -> tf.Tensor:
    """[N, 4] random-resized-crop boxes `(x0, y0, w, h)` in pixels, torchvision's rule.

    Ten tries per image of an area fraction uniform in `scale` and an aspect ratio
    log-uniform in `ratio`; the first box that fits is placed uniformly in the
    image. If none fits, the centred box of the whole image with its ratio clamped
    to `ratio`.
    """
    tries = 10
    area = tf.random.stateless_uniform([n, tries], keys[0], scale[0], scale[1]) * float(height * width)
    r = tf.exp(tf.random.stateless_uniform([n, tries], keys[1], math.log(ratio[0]), math.log(ratio[1])))
    w, h = tf.sqrt(area * r), tf.sqrt(area / r)
    fits = (w <= width) & (h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
    w = tf.gather(w, first, batch_dims=1)
    h = tf.gather(h, first, batch_dims=1)
    own = width / height
    fw = float(width) if ratio[0] <= own <= ratio[1] else (width if own < ratio[0] else height * ratio[1])
    fh = float(height) if ratio[0] <= own <= ratio[1] else (width / ratio[0] if own < ratio[0] else height)
    ok = tf.reduce_any(fits, axis=1)
    w = tf.where(ok, w, float(fw))
    h = tf.where(ok, h, float(fh))
    u = tf.random.stateless_uniform([n, 2], keys[2])
    x0 = tf.where(ok, u[:, 0] * (width - w), (width - w) / 2.0)
    y0 = tf.where(ok, u[:, 1] * (height - h), (height - h) / 2.0)
    return tf.stack([x0, y0, w, h], axis=1)


def erase_box(n, seed, prob: float, height: int, width: int, scale=(0.02, 0.33), ratio=(0.3, 3.3)) -> tf.Tensor:
    """[N, 4] integer boxes `(y0, y1, x0, x1)` to erase (empty for images left alone).

    torchvision's `RandomErasing.get_params`: ten tries of an area fraction uniform
    in `scale` and an aspect ratio log-uniform in `ratio`, sides rounded; the first
    box smaller than the image is placed uniformly. No fit: nothing is erased.
    """
    keys = tf.random.experimental.stateless_split(seed, 4)
    tries = 10
    area = tf.random.stateless_uniform([n, tries], keys[0], scale[0], scale[1]) * float(height * width)
    r = tf.exp(tf.random.stateless_uniform([n, tries], keys[1], math.log(ratio[0]), math.log(ratio[1])))
    h = tf.cast(tf.round(tf.sqrt(area * r)), tf.int32)
    w = tf.cast(tf.round(tf.sqrt(area / r)), tf.int32)
    fits = (h < height) & (w < width)
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
    h, w = tf.gather(h, first, batch_dims=1), tf.gather(w, first, batch_dims=1)
    on = (tf.random.stateless_uniform([n], keys[2]) < prob) & tf.reduce_any(fits, axis=1)
    u = tf.random.stateless_uniform([n, 2], keys[3])
    y0 = tf.cast(u[:, 0] * tf.cast(height - h + 1, tf.float32), tf.int32)
    x0 = tf.cast(u[:, 1] * tf.cast(width - w + 1, tf.float32), tf.int32)
    h, w = tf.where(on, h, 0), tf.where(on, w, 0)
    return tf.stack([y0, y0 + h, x0, x0 + w], axis=1)


def erase(images: tf.Tensor, boxes: tf.Tensor, seed) -> tf.Tensor:
    """Fills each image's box with uniform noise in [0, 255]."""
    height, width = images.shape[1], images.shape[2]
    rows = tf.range(height)[None, :, None]
    cols = tf.range(width)[None, None, :]
    inside = ((rows >= boxes[:, 0, None, None]) & (rows < boxes[:, 1, None, None])
              & (cols >= boxes[:, 2, None, None]) & (cols < boxes[:, 3, None, None]))
    noise = tf.random.stateless_uniform(tf.shape(images), seed, 0.0, 255.0, dtype=images.dtype)
    return tf.where(inside[..., None], noise, images)


def affine_matrices(p: dict, height: int, width: int) -> tf.Tensor:
    """The [N, 8] output-to-input transforms of the crop, then flips, rotation, shift and zoom.

    The warps chained map an output pixel x to the input pixel
    crop(flip(rotate(shift(zoom(x))))); about the image centre c the last four are
    A (x - c) + c + t with A = zoom * flip * rotation and t = -flip * rotation * shift,
    flip = diag(±1, ±1). The random-resized crop (applied to the original image
    first, as torchvision does) maps pixel centres of the resized box back into the
    box: x_in = x0 + (x + 1/2) w / W - 1/2.
    """
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    s = tf.where(p["flip"], -1.0, 1.0)
    v = tf.where(p["vflip"], -1.0, 1.0) if "vflip" in p else tf.ones_like(s)
    cos, sin, z = tf.cos(p["angle"]), tf.sin(p["angle"]), p["zoom"]
    # Keras's rotation matrix for angle a is [[cos, -sin], [sin, cos]]; the flips negate rows 0 and 1.
    a00, a01, a10, a11 = z * s * cos, -z * s * sin, z * v * sin, z * v * cos
    dx, dy = p["shift"][:, 0] * width, p["shift"][:, 1] * height
    t0 = -(s * cos * dx - s * sin * dy)
    t1 = -v * (sin * dx + cos * dy)
    b0, b1 = cx - a00 * cx - a01 * cy + t0, cy - a10 * cx - a11 * cy + t1
    if "crop" in p:
        x0, y0, w, h = (p["crop"][:, i] for i in range(4))
        sx, sy = w / width, h / height
        a00, a01, b0 = sx * a00, sx * a01, sx * b0 + x0 + 0.5 * sx - 0.5
        a10, a11, b1 = sy * a10, sy * a11, sy * b1 + y0 + 0.5 * sy - 0.5
    zeros = tf.zeros_like(z)
    return tf.stack([a00, a01, b0, a10, a11, b1, zeros, zeros], axis=1)


def eval_view(size: int, fraction: float):
    """`--eval_crop`: the central `fraction` of each side, resized back to `size` (float
    batches in, float batches out), or None for the whole image.

    Built from Keras's `CenterCrop` and `Resizing` layers, the same ones the
    exported model holds (research/serve/export.py), so that evaluation during
    training, `launch.evaluate` and the export see the same pixels.
    """
    layers = eval_view_layers(size, fraction)
    if not layers:
        return None

    def view(x):
        for layer in layers:
            x = layer(x)
        return x
    return view


def eval_view_layers(size: int, fraction: float) -> list:
    """The Keras layers of `eval_view` ([] for the whole image)."""
    if fraction >= 1.0:
        return []
    side = max(1, int(round(size * fraction)))
    # float32 whatever the training precision, as the exported model computes (research/serve/export.py).
    return [keras.layers.CenterCrop(side, side, name="eval_center_crop", dtype="float32"),
            keras.layers.Resizing(size, size, interpolation="bilinear", name="eval_resize", dtype="float32")]


def build(cfg: AugmentConfig) -> Augmenter | None:
    """The augmentation of `cfg`, or None when every knob is off."""
    return Augmenter(cfg) if cfg.enabled else None
