"""Data sources: what the images are, before any batching.

Sources (`DataConfig.dataset`):
  * `digits`        scikit-learn's bundled 8x8 handwritten digits (1797 real images, offline)
  * `folder:PATH`   one sub-folder per class; PATH/train + PATH/val (or validation) if present
  * `tfds:NAME`     any TFDS image-classification dataset
  * `tfrecord:DIR`  TFRecord shards written by the converter (research/data/convert.py)

Every source becomes a `Source`: two `tf.data.Dataset`s of `(uint8 image resized to
the model's input side, int32 label)`, their sizes and the class names.
`research/data/pipeline.py` turns them into the batched training and validation streams.

`load_source` picks the source's own module (research/data/folders.py,
research/data/tfds_source.py, research/data/tfrecords.py; the digits are here);
what every source shares (the `Source` record, class subsets, the carve of
validation and test slices) is research/data/splits.py. Class weights are here.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from research.config import DataConfig, UserError
from research.data.folders import load_folder_source
from research.data.layout import (IMAGE_EXTENSIONS, split_plan, show_names, carve, folder_split_dirs,  # noqa: F401
                                  list_class_folder, parse_classes)
from research.data.splits import AUTOTUNE, Source, _from_arrays, fingerprint, progress_bar  # noqa: F401
from research.data.tfds_source import load_tfds_source
from research.data.tfrecords import load_tfrecord_source, read_tfrecord_manifest


def load_digits_source(cfg: DataConfig, size: int) -> Source:
    from sklearn.datasets import load_digits
    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(images[..., None], 3, axis=-1)
    names = [str(i) for i in range(10)]
    keep = parse_classes(cfg.classes, names)
    _, test_plan, test_from = split_plan(cfg, has_val=False, has_test=False, own="digits")
    # Carved over all ten classes, then subset (as folders are): a digit's split is the same
    # whatever --classes, so a run on 0-9 never trained on the test images of a run on 5-9.
    parts = carve(d.target, cfg.val_fraction, cfg.test_fraction if test_plan == "carve" else 0.0,
                  folds=cfg.folds, fold=cfg.fold, refit=cfg.refit)
    tr, va, te = (idx[np.isin(d.target[idx], keep)] for idx in parts)
    labels = np.searchsorted(keep, d.target)
    return Source(_from_arrays(images[tr], labels[tr], size), _from_arrays(images[va], labels[va], size),
                  len(tr), len(va), [names[k] for k in keep], size,
                  test=_from_arrays(images[te], labels[te], size) if len(te) else None, num_test=len(te),
                  test_from=test_from, train_counts=np.bincount(labels[tr], minlength=len(keep)).tolist(),
                  fingerprints={k: fingerprint("digits", idx, labels[idx]) for k, idx in zip(("train", "val", "test"),
                                                                                          (tr, va, te))})


def class_names(cfg: DataConfig) -> list[str]:
    """Every class name of the configured dataset, in label order, ignoring `cfg.classes`.

    A folder's classes are its sub-folder names: no image is opened.

    Raises:
      UserError: as `load_source`.
    """
    if cfg.source.kind == "folder":
        path = cfg.source.arg
        if not os.path.isdir(path):
            raise UserError(f"--dataset=folder:{path}: no such directory")
        dirs = folder_split_dirs(path)
        return list_class_folder(os.path.join(path, dirs["train"]) if dirs else path)[0]
    if cfg.source.kind == "tfrecord":
        return list(read_tfrecord_manifest(cfg.source.arg)["class_names"])
    return load_source(dataclasses.replace(cfg, classes="", batch_size=1), 1).class_names


def class_weights(spec: str, class_names: list[str], counts: list[int]) -> list[float] | None:
    """The per-class loss weights of `--class_weight` (None for `none`).

    `balanced` is scikit-learn's `compute_class_weight("balanced")`: n / (k n_c)
    over the training split's counts.

    Raises:
      UserError: a class without training images (balanced); a file that is not
        JSON, misses or adds class names, or gives a weight that is not positive.
    """
    if spec == "none":
        return None
    if spec == "balanced":
        empty = [c for c, n in zip(class_names, counts) if n == 0]
        if empty:
            raise UserError(f"--class_weight=balanced: class {empty[0]!r} has no training images")
        total = sum(counts)
        return [total / (len(counts) * n) for n in counts]
    try:
        with open(spec) as f:
            given = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"--class_weight={spec}: not a readable JSON file ({e})") from None
    if not isinstance(given, dict):
        raise UserError(f"--class_weight={spec}: expected a JSON object {{class name: weight}}")
    missing = [c for c in class_names if c not in given]
    extra = [c for c in given if c not in class_names]
    if missing or extra:
        raise UserError(f"--class_weight={spec}: missing classes {missing or 'none'}, unknown classes "
                        f"{extra or 'none'}; the classes are {show_names(class_names)}")
    weights = [given[c] for c in class_names]
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in weights):
        raise UserError(f"--class_weight={spec}: every weight must be a positive number")
    return [float(w) for w in weights]


def load_source(cfg: DataConfig, image_size: int, *, cache_dir: str | None = None,
                worker: tuple[int, int] = (0, 1)) -> Source:
    """Loads the configured dataset, resized to `image_size`.

    Args:
      cfg: the data settings.
      image_size: the model's input side.
      cache_dir: where the folder check's results are remembered (None: nowhere).
      worker: `(index, count)` of this worker under multi-worker training; only a
        `tfrecord:` source shards its files by worker (others are sharded by tf.data).

    Raises:
      UserError: unknown source, missing folder, class folder without images,
        unreadable image, unknown TFDS name or split, missing or bad shards.
    """
    kind = cfg.source.kind
    if kind == "digits":
        src = load_digits_source(cfg, image_size)
    elif kind == "folder":
        src = load_folder_source(cfg, image_size, cache_dir)
    elif kind == "tfds":
        src = load_tfds_source(cfg, image_size)
    elif kind == "tfrecord":
        src = load_tfrecord_source(cfg, image_size, worker)
    else:
        raise UserError(f"--dataset={cfg.dataset!r} is not valid; allowed values: digits, folder:PATH, tfds:NAME, "
                        "tfrecord:DIR")
    if src.shard[1] > 1:  # the same decision on every worker: the smallest share against its batch
        if src.min_worker_train < cfg.batch_size // src.shard[1]:
            raise UserError(f"--batch_size={cfg.batch_size} over {src.shard[1]} workers is larger than the smallest "
                            f"worker's share of the training set ({src.min_worker_train} images); lower it")
    elif src.num_train < cfg.batch_size:
        raise UserError(f"--batch_size={cfg.batch_size} is larger than the training set "
                        f"({src.num_train} images); lower it")
    return src
