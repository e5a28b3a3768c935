"""What a dataset is made of, before any pixel is read: the files of a folder dataset
and its splits, `--classes`, and the carve of validation and test from training.

No TensorFlow here: a launcher runs these checks (a one-class folder, an empty
`val/`, a `--classes` that names nothing) before it starts TensorFlow, and the
sources (research/data/folders.py, sources.py) use the same functions.
"""

from __future__ import annotations

import os
import re

import numpy as np
from absl import logging

from research.config import DataConfig, UserError, writable_dir

# Formats tf.io.decode_image reads in TF 2.21 (it also reads JPEG XL, which PIL,
# used to check files before training, cannot open).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def has_image_extension(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def walk_images(folder: str) -> tuple[list[str], list[str]]:
    """Every image file under `folder`, its sub-folders included, sorted; and the other files.

    The one rule for a folder of images, in training, evaluation, conversion and
    prediction alike: a class folder's sub-folders belong to its class, as
    `keras.utils.image_dataset_from_directory` reads them. Hidden files and folders
    (`.DS_Store`, macOS `._x.jpg` resource forks, `.git`) are not photos and are skipped.
    """
    images, other = [], []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in files:
            if not f.startswith("."):
                (images if has_image_extension(f) else other).append(os.path.join(root, f))
    return sorted(images), sorted(other)


# --- Class subsets and splits ---------------------------------------------------------

def parse_classes(spec: str, class_names: list[str]) -> list[int]:
    """Resolves `--classes` to sorted original class indices.

    `spec` is a comma-separated list of class names, indices, or index ranges
    (`0-4`). Empty means all classes.

    Raises:
      UserError: unknown name, index out of range, or fewer than two classes.
    """
    if not spec.strip():
        return list(range(len(class_names)))
    chosen: set[int] = set()
    for tok in (t.strip() for t in spec.split(",")):
        if not tok:
            continue
        if tok in class_names:
            chosen.add(class_names.index(tok))
        elif re.fullmatch(r"\d+", tok):
            chosen.add(int(tok))
        elif re.fullmatch(r"\d+-\d+", tok):
            lo, hi = map(int, tok.split("-"))
            if lo > hi:
                raise UserError(f"--classes: range {tok!r} is empty (start > end)")
            chosen.update(range(lo, hi + 1))
        else:
            raise UserError(f"--classes: {tok!r} is neither a class name nor an index; "
                            f"classes are: {show_names(class_names)}")
    bad = sorted(i for i in chosen if i >= len(class_names))
    if bad:
        raise UserError(f"--classes: index {bad[0]} is out of range; the dataset has "
                        f"{len(class_names)} classes (0-{len(class_names) - 1})")
    if len(chosen) < 2:
        raise UserError(f"--classes={spec!r} selects {len(chosen)} class; at least 2 are needed")
    return sorted(chosen)


def show_names(names: list[str], n: int = 20) -> str:
    s = ", ".join(names[:n])
    return s + (f", ... ({len(names)} in all)" if len(names) > n else "")


def carve(labels: np.ndarray, val_fraction: float, test_fraction: float = 0.0, *, folds: int = 0, fold: int = 0,
          refit: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Splits indices into (train, val, test): stratified, deterministic and independent
    of the training seed, so validation and test are the same across seeds and sweeps.

    A zero fraction carves nothing. Validation is taken first, so turning the test
    slice on or off leaves the validation images as they were.

    With `folds` (`--folds=K --fold=I`), test is carved exactly as without, and the rest,
    the pool, is split by scikit-learn's `StratifiedKFold` (shuffled with a fixed seed):
    validation is its fold I, train the other K-1 folds. Each class's count differs by at
    most one between folds, and every pool image is in exactly one fold's validation.
    With `refit`, train is the whole pool and validation is empty.

    Raises:
      UserError: a class of the pool with fewer images than folds.
    """
    rng = np.random.RandomState(12345)
    parts: tuple[list, list, list] = ([], [], [])
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = max(1, int(round(len(idx) * val_fraction))) if val_fraction and len(idx) > 1 else 0
        n_test = 0
        if test_fraction and len(idx) - n_val > 1:  # leave the class at least one training image
            n_test = min(max(1, int(round(len(idx) * test_fraction))), len(idx) - n_val - 1)
        parts[1].extend(idx[:n_val])
        parts[2].extend(idx[n_val:n_val + n_test])
        parts[0].extend(idx[n_val + n_test:])
    train, val, test = (np.sort(np.array(p, dtype=np.int64)) for p in parts)
    pool = np.sort(np.concatenate([train, val]))
    if refit:
        return pool, np.zeros(0, np.int64), test
    if not folds:
        return train, val, test
    from sklearn.model_selection import StratifiedKFold
    counts = np.bincount(labels[pool])
    if counts[counts > 0].min() < folds:
        raise UserError(f"--folds={folds}: a class has only {counts[counts > 0].min()} image(s) in the pool "
                        "(the images that are neither test nor the source's own validation split); use fewer folds")
    split = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=12345).split(pool, labels[pool]))
    rest, held = split[fold]
    return np.sort(pool[rest]), np.sort(pool[held]), test


def split_plan(cfg: DataConfig, has_val: bool, has_test: bool, own: str) -> tuple[str, str, str]:
    """Where validation and test come from: `own` (the source's split), `val` (test
    only: the source's validation split), `carve` or `none`; and what to call it.

    Raises:
      UserError: `--test=val` on a source without a validation split.
    """
    if cfg.test == "val":
        if not has_val:
            raise UserError(f"--test=val holds out the source's validation split as test, but {own} has none; "
                            "use --test=auto (a --test_fraction slice of the training images)")
        return "carve", "val", "the source's validation split"
    val = "own" if has_val else "carve"
    if cfg.test == "none":
        return val, "none", "none"
    if has_test:
        return val, "own", "the source's test split"
    return val, "carve", f"a {cfg.test_fraction:.0%} slice of the training images"


# --- Folder datasets -------------------------------------------------------------------

def list_class_folder(root: str, expected: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """(class names, the image files of each class) of a folder of class folders.

    Args:
      expected: the class names another split of the dataset has (a `val/` must have
        `train/`'s classes).

    Raises:
      UserError: no such folder, fewer than two classes, other classes than
        `expected` (named), or a class folder without images.
    """
    if not os.path.isdir(root):
        raise UserError(f"--dataset=folder:{root}: no such directory")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if expected is not None and classes != expected:
        missing, extra = [c for c in expected if c not in classes], [c for c in classes if c not in expected]
        raise UserError(f"{root!r} must hold the same class folders as the training split"
                        + (f"; missing: {show_names(missing)}" if missing else "")
                        + (f"; not in the training split: {show_names(extra)}" if extra else ""))
    if len(classes) < 2:
        raise UserError(f"folder {root!r} must hold one sub-folder per class (at least 2); found {len(classes)}")
    files, ignored, nested = [], [], []
    for c in classes:
        cdir = os.path.join(root, c)
        fs, other = walk_images(cdir)
        ignored += other
        nested += [f for f in fs if os.path.dirname(f) != cdir]
        if not fs:
            raise UserError(f"class folder {cdir!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        files.append(fs)
    if nested:
        logging.warning("%d image(s) in sub-folders of the class folders of %s count as their class, e.g. %s",
                     len(nested), root, nested[0])
    if ignored:
        # Said, not silent: a class of HEIC phone photos would otherwise just shrink.
        kinds = sorted({os.path.splitext(p)[1].lower() or "no extension" for p in ignored})
        logging.warning("ignored %d file(s) in %s that are not %s images (%s), e.g. %s", len(ignored), root,
                        "/".join(e[1:].upper() for e in IMAGE_EXTENSIONS), ", ".join(kinds), ignored[0])
    return classes, files


def folder_split_dirs(path: str) -> dict[str, str | None] | None:
    """The split sub-folders of a folder dataset: `{"train", "val", "test"}` (a missing
    one is None), or None for a folder of class folders without splits.

    A split folder needs `train/` and `val/` (or `validation/`) or `test/`, in any case.
    """
    sub = {d.lower(): d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))}
    val_dir, test_dir = sub.get("val") or sub.get("validation"), sub.get("test")
    if "train" not in sub or not (val_dir or test_dir):
        return None
    return {"train": sub["train"], "val": val_dir, "test": test_dir}


def folder_splits(cfg: DataConfig) -> tuple[list[str], dict[str, list[list[str]]], str]:
    """The files of each split of a folder dataset, before any image is opened.

    Returns:
      (class names, `{split: one file list per class}` for `train`, `val` and, unless
      `--test=none`, `test`; what plays the test role).

    Raises:
      UserError: a missing folder, split folders with different classes, `--test=val`
        without a validation folder.
    """
    path = cfg.source.arg
    if not os.path.isdir(path):
        raise UserError(f"--dataset=folder:{path}: no such directory")
    dirs = folder_split_dirs(path)
    names, train = list_class_folder(os.path.join(path, dirs["train"]) if dirs else path)
    own = {}
    for key in ("val", "test"):
        if dirs and dirs[key]:
            own[key] = list_class_folder(os.path.join(path, dirs[key]), expected=names)[1]
    val_plan, test_plan, test_from = split_plan(cfg, "val" in own, "test" in own, own=f"folder {path!r}")
    if test_plan == "own":
        test_from = os.path.join(path, dirs["test"])
    elif test_plan == "val":
        test_from = f"{os.path.join(path, dirs['val'])} (the source's validation split)"
    splits = {"train": train, "val": own.get("val"), "test": {"own": own.get("test"), "val": own.get("val")}.get(test_plan)}
    pool_only = cfg.folds or cfg.refit
    if "carve" in (val_plan, test_plan) or pool_only:
        flat = [f for fs in train for f in fs]
        labels = np.array([c for c, fs in enumerate(train) for _ in fs])
        # With --folds, the source's own validation split (if any) is left out of the pool.
        parts = carve(labels, cfg.val_fraction if val_plan == "carve" else 0.0,
                      cfg.test_fraction if test_plan == "carve" else 0.0, folds=cfg.folds, fold=cfg.fold,
                      refit=cfg.refit)
        carved = {}
        for key, idx in zip(("train", "val", "test"), parts):
            carved[key] = [[] for _ in names]
            for i in idx:
                carved[key][labels[i]].append(flat[i])
        splits["train"] = carved["train"]
        if val_plan == "carve" or pool_only:
            splits["val"] = carved["val"]
        if test_plan == "carve":
            splits["test"] = carved["test"]
    if test_plan == "none":
        del splits["test"]
    return names, splits, test_from


def check_conversion(cfg: DataConfig, out: str, *, image_size: int, encoding: str, shard_mb: float
                     ) -> tuple[list[str], dict[str, list[list[str]]], str]:
    """Everything `research.data.convert.convert` refuses before it opens an image: the
    arguments, `out` (new or empty, in a writable place) and the folder's layout.

    Returns:
      `folder_splits(cfg)`.
    """
    if cfg.source.kind != "folder":
        raise UserError(f"--dataset={cfg.dataset}: the converter reads a folder:PATH dataset")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"--out={out}: exists and is not an empty directory")
    if not writable_dir(os.path.dirname(os.path.abspath(out))):
        raise UserError(f"--out={out}: its parent directory cannot be created or written into")
    if image_size < 0 or shard_mb <= 0:
        raise UserError(f"--image_size={image_size} must be >= 0 and --shard_mb={shard_mb} > 0")
    if encoding not in ("jpeg", "raw") or (encoding == "raw" and not image_size):
        raise UserError(f"--encoding={encoding}: jpeg, or raw with an --image_size (raw pixels of that side)")
    return folder_splits(cfg)
