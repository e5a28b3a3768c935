"""A tiny TFDS dataset built offline, to test the real `download_and_prepare` path.

Importing this module registers `tiny_colors` with TFDS (defining a
`GeneratorBasedBuilder` subclass registers it under its snake-case name).
Three classes of 16x16 images whose dominant colour is the class, so a small
CNN learns them in a few epochs; splits of different sizes (train 48,
validation 12, test 18) so a test can tell which one was used.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

CLASSES = ["red", "green", "blue"]
SPLITS = {"train": 48, "validation": 12, "test": 18}


def example_image(label: int, rng: np.random.RandomState, side: int = 16) -> np.ndarray:
    """Noise, plus a strong tint in the class's channel over a random rectangle."""
    image = rng.randint(0, 90, (side, side, 3))
    top, left = rng.randint(0, side // 2, 2)
    image[top:top + side // 2, left:left + side // 2, label] += 150
    return image.astype(np.uint8)


class TinyColors(tfds.core.GeneratorBasedBuilder):
    """tiny_colors: red, green and blue 16x16 images, generated (no download)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(16, 16, 3)),
                "label": tfds.features.ClassLabel(names=CLASSES),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {name: self._generate_examples(n, seed) for seed, (name, n) in enumerate(SPLITS.items())}

    def _generate_examples(self, n: int, seed: int):
        rng = np.random.RandomState(seed)
        for i in range(n):
            yield i, {"image": example_image(i % len(CLASSES), rng), "label": i % len(CLASSES)}
