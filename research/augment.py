"""Augmentation with Keras preprocessing layers, applied inside `tf.data` (not the model).

The knobs mirror the classic `ImageDataGenerator` ones (horizontal_flip,
rotation_range in degrees, width/height_shift_range, zoom_range) plus contrast;
fill mode is `nearest`, ImageDataGenerator's default. Layers work on float
batches in [0, 255], before the backbone's preprocessing.
"""

from __future__ import annotations

import keras

from research.config import AugmentConfig


def build(cfg: AugmentConfig, *, seed: int) -> keras.Sequential | None:
    """Returns the augmentation pipeline, or None when every knob is off.

    Args:
      cfg: augmentation settings.
      seed: seeds every random layer (each gets its own offset), so a pipeline
        built again with the same seed draws the same transformations.
    """
    if not cfg.enabled:
        return None
    stack = []
    if cfg.horizontal_flip:
        stack.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if cfg.rotation:
        stack.append(keras.layers.RandomRotation(cfg.rotation / 360.0, fill_mode="nearest", seed=seed + 1))
    if cfg.width_shift or cfg.height_shift:
        stack.append(keras.layers.RandomTranslation(cfg.height_shift, cfg.width_shift,
                                                    fill_mode="nearest", seed=seed + 2))
    if cfg.zoom:
        stack.append(keras.layers.RandomZoom(cfg.zoom, fill_mode="nearest", seed=seed + 3))
    if cfg.contrast:
        stack.append(keras.layers.RandomContrast(cfg.contrast, value_range=(0, 255), seed=seed + 4))
    return keras.Sequential(stack, name="augment")
