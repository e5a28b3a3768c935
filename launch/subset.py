"""A class-balanced subset of a class-folder dataset, as symbolic links (no image copied):

    tar -xzf ../shared/data/cifar10-train.tar.gz -C /tmp/cifar10
    python -m launch.subset --src=/tmp/cifar10/train --out=/tmp/cifar4k --train_per_class=400 --test_per_class=100

Writes OUT/train/<class>/ with the first `--train_per_class` files of each class
(sorted by name) and, with `--test_per_class`, OUT/test/<class>/ with the last
ones, so the two never share an image. `launch.train --dataset=folder:OUT` then
carves validation from OUT/train and tests on OUT/test.
"""

from __future__ import annotations

import os

from absl import app, flags

from launch import common

F = flags.FLAGS
flags.DEFINE_string("src", None, "A folder with one sub-folder of images per class.")
flags.DEFINE_string("out", None, "Where to write the subset (must not exist, or be empty).")
flags.DEFINE_integer("train_per_class", 400, "Training images per class.")
flags.DEFINE_integer("test_per_class", 0, "Test images per class (0: no test folder).")


def main(argv):
    from research.data import layout  # no TensorFlow: this tool copies files
    if not F.src or not os.path.isdir(F.src):
        common.die(f"--src={F.src!r}: no such directory", common.EXIT_USER_ERROR)
    if not F.out:
        common.die("--out is required", common.EXIT_USER_ERROR)
    if os.path.exists(F.out) and (not os.path.isdir(F.out) or os.listdir(F.out)):
        common.die(f"--out={F.out}: exists and is not an empty directory", common.EXIT_USER_ERROR)
    if F.train_per_class < 1 or F.test_per_class < 0:
        common.die("--train_per_class must be >= 1 and --test_per_class >= 0", common.EXIT_USER_ERROR)
    classes = sorted(d for d in os.listdir(F.src) if os.path.isdir(os.path.join(F.src, d)) and not d.startswith("."))
    if not classes:
        common.die(f"--src={F.src}: no class sub-folders", common.EXIT_USER_ERROR)
    need = F.train_per_class + F.test_per_class
    # The training rule for a class folder: its sub-folders' images belong to it.
    files = {c: [os.path.relpath(p, os.path.join(F.src, c)) for p in layout.walk_images(os.path.join(F.src, c))[0]]
             for c in classes}
    short = [f"{c!r} ({len(fs)})" for c, fs in files.items() if len(fs) < need]
    if short:  # checked before anything is written
        common.die(f"classes with fewer than {need} images: {', '.join(short)}", common.EXIT_USER_ERROR)
    for c in classes:
        parts = {"train": files[c][:F.train_per_class]}
        if F.test_per_class:
            parts["test"] = files[c][len(files[c]) - F.test_per_class:]
        for split, names in parts.items():
            os.makedirs(os.path.join(F.out, split, c), exist_ok=True)
            for name in names:  # more/x.jpg becomes more__x.jpg: one folder per class in the subset
                os.symlink(os.path.abspath(os.path.join(F.src, c, name)),
                           os.path.join(F.out, split, c, name.replace(os.sep, "__")))
    print(f"{F.out}: {len(classes)} classes, {F.train_per_class} train"
          + (f" and {F.test_per_class} test" if F.test_per_class else "") + " images each (symbolic links)")


if __name__ == "__main__":
    app.run(common.guarded(main), flags_parser=common.parse_flags_or_exit)
