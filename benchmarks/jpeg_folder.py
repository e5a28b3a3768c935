"""Writes a generated class-folder dataset of small JPEGs, for `launch/bench.py --scale`:

    python -m benchmarks.jpeg_folder --out=/tmp/jpegs-10k --n=10000 [--size=64] [--classes=10]

Class c's images are noise around a colour and a stripe orientation of its own, so
a model can learn them; every file is a different image (seeded by its index).
Writes OUT/CLASS/NNNNNNN.jpg; launch.train carves validation and test from it.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

F = flags.FLAGS
flags.DEFINE_string("out", None, "Where to write the folder (must not exist, or be empty).")
flags.DEFINE_integer("n", 10000, "Number of images.")
flags.DEFINE_integer("size", 64, "Side of every image, in pixels.")
flags.DEFINE_integer("classes", 10, "Number of classes.")


def image(index: int, label: int, size: int, classes: int) -> np.ndarray:
    rng = np.random.default_rng(index)
    hue = np.array([np.cos(2 * np.pi * label / classes), np.sin(2 * np.pi * label / classes), 0.0])
    colour = 128 + 60 * hue
    yy, xx = np.mgrid[:size, :size]
    angle = np.pi * label / classes
    stripes = 40 * np.sin((np.cos(angle) * xx + np.sin(angle) * yy) / 3.0 + rng.uniform(0, 2 * np.pi))
    pixels = colour + stripes[..., None] + rng.normal(0, 25, (size, size, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write(out: str, n: int, size: int = 64, classes: int = 10) -> None:
    from PIL import Image
    for c in range(classes):
        os.makedirs(os.path.join(out, f"class{c:02d}"), exist_ok=True)
    for i in range(n):
        label = i % classes
        Image.fromarray(image(i, label, size, classes)).save(
            os.path.join(out, f"class{label:02d}", f"{i:07d}.jpg"), quality=90)


def main(argv):
    if not F.out:
        raise app.UsageError("--out is required")
    if os.path.exists(F.out) and os.listdir(F.out):
        raise app.UsageError(f"--out={F.out} exists and is not empty")
    write(F.out, F.n, F.size, F.classes)
    print(f"{F.out}: {F.n} JPEGs of {F.size}x{F.size} px in {F.classes} classes")


if __name__ == "__main__":
    app.run(main)
