"""Named recipes: `python -m launch.train --preset=NAME [flag overrides]`.

A preset is a function returning `launch.train` flag values; flags given on the
command line override it, and `config.json` records the resolved config. Each
docstring carries the exact command and what it reached when measured (one
2-core CPU, no GPU; numbers from `results.json`).
"""

from __future__ import annotations

from typing import Any, Callable

from research.errors import UserError

ANTS = "folder:../shared/data/hymenoptera"
# ants/bees ships train/ and val/ only: its 153 validation photos are the test split, and
# validation is a 20 % slice of train/ (49 photos), on which every run's decisions are taken.
# The presets' learning rates and epochs were chosen earlier, while those 153 photos were
# the validation split: their test numbers are not those of an untouched test set.
ANTS_SPLITS = dict(dataset=ANTS, test="val")
MOBILENET_025 = dict(backbone="mobilenet", alpha=0.25, weights="imagenet", image_size=224, batch_size=16)


def quickstart() -> dict[str, Any]:
    """small_cnn from scratch on the embedded digits: the default run.

        python -m launch.train --workdir=/tmp/quickstart --preset=quickstart

    20 epochs, 16 s of training (23 s for the whole command) on 2 CPU cores:
    test/accuracy 0.983 (179 images, a 10 % slice; validation 0.981 on 359).
    """
    return {}


def ants_top2() -> dict[str, Any]:
    """Ants vs bees: a head on frozen ImageNet MobileNet-0.25, then its top 2 blocks at a low LR.

        python -m launch.train --workdir=runs/ants_top2 --preset=ants_top2 \\
            --weights=../shared/data/weights/mobilenet_2_5_224_tf_no_top.h5   # offline: the weights file

    8 + 8 epochs, 24 s of training (35 s in all) on 2 CPU cores (seed 0): test/accuracy
    0.837 on the 153 held-out
    photos; validation (49 photos carved from train/) 0.878 after the head stage, 0.918
    after fine-tuning top:2. Over 3 seeds: 0.837 [0.804, 0.869] (docs/RESULTS.md).
    """
    return dict(MOBILENET_025, **ANTS_SPLITS, horizontal_flip=True, head_epochs=8, lr=3e-3,
                unfreeze="top:2", finetune_epochs=8, finetune_lr=1e-4)


def features() -> dict[str, Any]:
    """Feature extraction: the frozen ImageNet base runs once, the head trains on cached features.

        python -m launch.train --workdir=runs/ants_features --preset=features \\
            --weights=../shared/data/weights/mobilenet_2_5_224_tf_no_top.h5

    20 head-only epochs on cached features, 12 s of training (23 s in all) on 2 CPU cores
    (most of it the one pass of the base): test/accuracy 0.837 on the 153 held-out ants/bees photos
    (seed 0; validation 0.939).
    """
    return dict(MOBILENET_025, **ANTS_SPLITS, cache_features=True, finetune_epochs=20, unfreeze="none",
                lr=3e-3, schedule="constant")


def lp_ft() -> dict[str, Any]:
    """LP-FT (Kumar et al., 2022): a linear probe to convergence, then everything at a low LR.

        python -m launch.train --workdir=runs/ants_lpft --preset=lp_ft \\
            --weights=../shared/data/weights/mobilenet_2_5_224_tf_no_top.h5

    Fine-tuning from a trained head distorts the pretrained features less than
    from a random one. 10 + 5 epochs, 28 s of training (40 s in all) on 2 CPU cores:
    test/accuracy 0.856 on the
    153 held-out ants/bees photos (seed 0; validation 0.918).
    """
    return dict(MOBILENET_025, **ANTS_SPLITS, horizontal_flip=True, head_epochs=10, lr=3e-3,
                unfreeze="all", finetune_epochs=5, finetune_lr=3e-5)


PRESETS: dict[str, Callable[[], dict[str, Any]]] = {
    "quickstart": quickstart, "ants_top2": ants_top2, "features": features, "lp_ft": lp_ft,
}


def get(name: str) -> dict[str, Any]:
    """The flag values of preset `name`.

    Raises:
      UserError: an unknown preset.
    """
    if name not in PRESETS:
        raise UserError(f"--preset={name!r} is not valid; allowed values: {', '.join(PRESETS)}")
    return PRESETS[name]()
