"""Data sources: what the images are, before any batching.

Sources (`DataConfig.dataset`):
  * `digits`        scikit-learn's bundled 8x8 handwritten digits (1797 real images, offline)
  * `folder:PATH`   one sub-folder per class; PATH/train + PATH/val (or validation) if present
  * `tfds:NAME`     any TFDS image-classification dataset

Every source becomes a `Source`: two `tf.data.Dataset`s of `(uint8 image resized to
the model's input side, int32 label)`, their sizes and the class names.
`research/data.py` turns them into the batched training and validation streams.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf
from absl import logging

from research import images as images_lib
from research.config import DataConfig, UserError

IMAGE_EXTENSIONS = images_lib.IMAGE_EXTENSIONS
AUTOTUNE = tf.data.AUTOTUNE


@dataclass
class Source:
    """Decoded, resized, relabelled data of one dataset, before batching."""

    train: tf.data.Dataset
    val: tf.data.Dataset
    num_train: int
    num_val: int
    class_names: list[str]
    image_size: int
    skipped: list[str] = field(default_factory=list)
    skipped_by_split: dict[str, list[str]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# --- Class subsets -------------------------------------------------------------------

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
                            f"classes are: {_show(class_names)}")
    bad = sorted(i for i in chosen if i >= len(class_names))
    if bad:
        raise UserError(f"--classes: index {bad[0]} is out of range; the dataset has "
                        f"{len(class_names)} classes (0-{len(class_names) - 1})")
    if len(chosen) < 2:
        raise UserError(f"--classes={spec!r} selects {len(chosen)} class; at least 2 are needed")
    return sorted(chosen)


def _show(names: list[str], n: int = 20) -> str:
    s = ", ".join(names[:n])
    return s + (f", ... ({len(names)} in all)" if len(names) > n else "")


# --- Sources -------------------------------------------------------------------------

def _resize_uint8(image, size: int):
    return tf.cast(images_lib.resize(image, size), tf.uint8)


def _from_arrays(images: np.ndarray, labels: np.ndarray, size: int) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int32)))
    return ds.map(lambda x, y: (_resize_uint8(x, size), y), num_parallel_calls=AUTOTUNE)


def _split_indices(labels: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic, stratified split, independent of the training seed, so the
    validation set is the same across seeds and sweeps."""
    rng = np.random.RandomState(12345)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = max(1, int(round(len(idx) * val_fraction))) if len(idx) > 1 else 0
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))


def load_digits_source(cfg: DataConfig, size: int) -> Source:
    from sklearn.datasets import load_digits
    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(images[..., None], 3, axis=-1)
    names = [str(i) for i in range(10)]
    keep = parse_classes(cfg.classes, names)
    mask = np.isin(d.target, keep)
    images, labels = images[mask], np.searchsorted(keep, d.target[mask])
    tr, va = _split_indices(labels, cfg.val_fraction)
    return Source(_from_arrays(images[tr], labels[tr], size), _from_arrays(images[va], labels[va], size),
                  len(tr), len(va), [names[k] for k in keep], size)


def _list_class_folder(root: str) -> tuple[list[str], list[list[str]]]:
    if not os.path.isdir(root):
        raise UserError(f"--dataset=folder:{root}: no such directory")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if len(classes) < 2:
        raise UserError(f"folder {root!r} must hold one sub-folder per class (at least 2); found {len(classes)}")
    files, ignored = [], []
    for c in classes:
        cdir = os.path.join(root, c)
        names = [f for f in os.listdir(cdir) if os.path.isfile(os.path.join(cdir, f))]
        fs = sorted(os.path.join(cdir, f) for f in names if images_lib.has_image_extension(f))
        ignored += [os.path.join(cdir, f) for f in names
                    if not images_lib.has_image_extension(f) and not f.startswith(".")]  # .DS_Store & co.
        if not fs:
            raise UserError(f"class folder {cdir!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        files.append(fs)
    if ignored:
        # Said, not silent: a class of HEIC phone photos would otherwise just shrink.
        kinds = sorted({os.path.splitext(p)[1].lower() or "no extension" for p in ignored})
        logging.warning("ignored %d file(s) in %s that are not %s images (%s), e.g. %s", len(ignored), root,
                        "/".join(e[1:].upper() for e in IMAGE_EXTENSIONS), ", ".join(kinds), ignored[0])
    return classes, files


def _readable(path: str) -> str | None:
    """Returns an error string if `path` cannot be fully decoded, else None."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.format == "WEBP" and getattr(im, "is_animated", False):
                # TF decodes animated WebP only as RGBA (and crashed on channels=0).
                return "animated WebP is not supported; save its first frame as a still image"
            # A JPEG is checked at 1/8 scale: every byte is still decoded (truncation
            # is caught) but a giant photo needs 1/64 of the memory and time.
            im.draft(None, (1, 1))
            im.load()  # a full decode: verify() misses truncated JPEGs
            if im.width < 1 or im.height < 1:
                return "empty image"
    except Exception as e:  # PIL raises many types for bad files
        return f"{type(e).__name__}: {e}"
    return None


def progress_bar(total: int, what: str, *, threshold: int = 2000):
    """A progress bar with an ETA for a long start-up step, or None for a short one.

    A live bar on a terminal; one plain line when it ends in a redirected log.
    """
    import sys

    import keras
    if total < threshold:
        return None
    print(f"{what} ...", flush=True)
    return keras.utils.Progbar(total, verbose=1 if sys.stdout.isatty() else 2)


def check_images(paths: list[str], *, skip_bad: bool) -> tuple[list[str], list[str]]:
    """Decodes every image once before training starts.

    Returns:
      (good paths, bad paths).

    Raises:
      UserError: naming the first bad file, unless `skip_bad`.
    """
    bar = progress_bar(len(paths), f"checking {len(paths)} images")
    errors = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        for error in pool.map(_readable, paths):
            errors.append(error)
            if bar and (len(errors) % 200 == 0 or len(errors) == len(paths)):
                bar.update(len(errors))
    bad = [(p, e) for p, e in zip(paths, errors) if e]
    if bad and not skip_bad:
        p, e = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(f"unreadable or corrupt image {p!r}: {e}{more}; fix or remove it, "
                        "or pass --skip_bad_images to skip such files")
    bad_set = {p for p, _ in bad}
    return [p for p in paths if p not in bad_set], [p for p, _ in bad]


def _decode_file(path, label, size: int):
    # EXIF orientation and giant-JPEG downscaling as at predict and serving time.
    return _resize_uint8(images_lib.decode(tf.io.read_file(path), size), size), label


def _files_dataset(paths: list[str], labels: list[int], size: int) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string), tf.constant(labels, tf.int32)))
    return ds.map(lambda p, y: _decode_file(p, y, size), num_parallel_calls=AUTOTUNE)


def folder_split_dirs(path: str) -> tuple[str, str] | None:
    """The (train, val) sub-folder names of a folder dataset, or None if it has no such split.

    `val` may also be spelled `validation`, in any case.
    """
    sub = {d.lower(): d for d in os.listdir(path)}
    val_dir = sub.get("val") or sub.get("validation")
    return (sub["train"], val_dir) if "train" in sub and val_dir else None


def class_names(cfg: DataConfig) -> list[str]:
    """Every class name of the configured dataset, in label order, ignoring `cfg.classes`.

    A folder's classes are its sub-folder names: no image is opened.

    Raises:
      UserError: as `load_source`.
    """
    if cfg.dataset.startswith("folder:"):
        path = cfg.dataset[len("folder:"):]
        if not os.path.isdir(path):
            raise UserError(f"--dataset=folder:{path}: no such directory")
        dirs = folder_split_dirs(path)
        return _list_class_folder(os.path.join(path, dirs[0]) if dirs else path)[0]
    return load_source(dataclasses.replace(cfg, classes="", batch_size=1), 1).class_names


def load_folder_source(cfg: DataConfig, size: int) -> Source:
    path = cfg.dataset[len("folder:"):]
    if not os.path.isdir(path):
        raise UserError(f"--dataset=folder:{path}: no such directory")
    dirs = folder_split_dirs(path)
    if dirs:
        train_dir, val_dir = dirs
        names, train_files = _list_class_folder(os.path.join(path, train_dir))
        val_names, val_files = _list_class_folder(os.path.join(path, val_dir))
        if val_names != names:
            raise UserError(f"class folders differ between train and {val_dir}: {names} vs {val_names}")
        splits = {"train": train_files, "val": val_files}
    else:
        names, files = _list_class_folder(path)
        flat = [f for fs in files for f in fs]
        labels = np.array([c for c, fs in enumerate(files) for _ in fs])
        tr, va = _split_indices(labels, cfg.val_fraction)
        splits = {}
        for key, idx in (("train", tr), ("val", va)):
            per_class = [[] for _ in names]
            for i in idx:
                per_class[labels[i]].append(flat[i])
            splits[key] = per_class
    keep = parse_classes(cfg.classes, names)
    out, skipped = {}, {}
    for key, per_class in splits.items():
        paths = [p for new, c in enumerate(keep) for p in per_class[c]]
        labels = [new for new, c in enumerate(keep) for _ in per_class[c]]
        good, bad = check_images(paths, skip_bad=cfg.skip_bad_images)
        skipped[key] = bad
        good_set = set(good)
        labels = [y for p, y in zip(paths, labels) if p in good_set]
        if not good:
            raise UserError(f"no readable images in the {key} split of {path!r}")
        out[key] = (good, labels)
    return Source(_files_dataset(*out["train"], size), _files_dataset(*out["val"], size),
                  len(out["train"][0]), len(out["val"][0]), [names[k] for k in keep], size,
                  skipped["train"] + skipped["val"], skipped)


def load_tfds_source(cfg: DataConfig, size: int) -> Source:
    import tensorflow_datasets as tfds
    name = cfg.dataset[len("tfds:"):]
    try:
        # A name with no builder code but prepared files under data_dir/NAME/VERSION/
        # (a dataset prepared elsewhere) loads from those files: tfds.builder falls back.
        builder = tfds.builder(name, data_dir=cfg.data_dir)
        builder.download_and_prepare()
    except ImportError as e:
        # An installation problem, not a data one (issue 13: importlib_resources).
        raise UserError(f"--dataset=tfds:{name}: TFDS needs the Python module {e.name or str(e)!r}, which is not "
                        f"installed; reinstall this project's dependencies (pip install -e .)") from None
    except tfds.core.registered.DatasetNotFoundError:
        where = f"--data_dir={cfg.data_dir}" if cfg.data_dir else "TFDS's default data_dir"
        raise UserError(f"--dataset=tfds:{name}: no such TFDS dataset, and no prepared copy in {where} "
                        f"(expected {name}/VERSION/dataset_info.json there); check the name in the TFDS "
                        "catalog or pass the --data_dir it was prepared into") from None
    except Exception as e:  # no network, bad data_dir, a failing builder
        raise UserError(f"--dataset=tfds:{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    info = builder.info
    keys = list(info.features.keys()) if hasattr(info.features, "keys") else []
    label_feature = info.features["label"] if "label" in keys else None
    if label_feature is None or not hasattr(label_feature, "names") or "image" not in keys:
        raise UserError(f"tfds:{name} is not an image-classification dataset (needs 'image' and 'label' features)")
    names = list(label_feature.names)
    # An empty split list means TFDS has no metadata to check against (e.g. under
    # tfds.testing.mock_data); as_dataset then reports a bad split name itself.
    splits = list(info.splits.keys())
    if splits and cfg.train_split.split("[")[0] not in splits:
        raise UserError(f"--train_split={cfg.train_split!r} not in tfds:{name}; splits: {', '.join(splits)}")
    train_split, val_split = cfg.train_split, cfg.val_split
    if not val_split:
        val_split = next((s for s in ("validation", "val", "test") if s in splits), "")
    if not val_split:
        pct = int(round(100 * (1 - cfg.val_fraction)))
        train_split, val_split = f"{cfg.train_split}[:{pct}%]", f"{cfg.train_split}[{pct}%:]"
    elif splits and val_split.split("[")[0] not in splits:
        raise UserError(f"--val_split={val_split!r} not in tfds:{name}; splits: {', '.join(splits)}")
    keep = parse_classes(cfg.classes, names)
    table = np.full(len(names), -1, np.int32)
    table[keep] = np.arange(len(keep), dtype=np.int32)
    table_t = tf.constant(table)

    def make(split: str) -> tuple[tf.data.Dataset, int]:
        try:
            ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
        except (ValueError, KeyError, tf.errors.OpError) as e:
            raise UserError(f"tfds:{name} split {split!r}: {str(e).splitlines()[0]}") from None
        ds = ds.map(lambda x, y: (x, tf.gather(table_t, tf.cast(y, tf.int32))))
        if len(keep) < len(names):
            ds = ds.filter(lambda x, y: y >= 0)
        n = int(ds.map(lambda x, y: 1).reduce(0, lambda a, b: a + b))
        ds = ds.map(lambda x, y: (_resize_uint8(_ensure_rgb(x), size), y), num_parallel_calls=AUTOTUNE)
        return ds, n

    train, n_train = make(train_split)
    val, n_val = make(val_split)
    return Source(train, val, n_train, n_val, [names[k] for k in keep], size)


def _ensure_rgb(x):
    x = tf.convert_to_tensor(x)
    if x.shape.rank == 2:
        x = x[..., None]
    if x.shape[-1] == 1:
        x = tf.image.grayscale_to_rgb(x)
    return x[..., :3]


def load_source(cfg: DataConfig, image_size: int) -> Source:
    """Loads the configured dataset, resized to `image_size`.

    Raises:
      UserError: unknown source, missing folder, class folder without images,
        unreadable image, unknown TFDS name or split.
    """
    if cfg.dataset == "digits":
        src = load_digits_source(cfg, image_size)
    elif cfg.dataset.startswith("folder:"):
        src = load_folder_source(cfg, image_size)
    elif cfg.dataset.startswith("tfds:"):
        src = load_tfds_source(cfg, image_size)
    else:
        raise UserError(f"--dataset={cfg.dataset!r} is not valid; allowed values: digits, folder:PATH, tfds:NAME")
    if src.num_train < cfg.batch_size:
        raise UserError(f"--batch_size={cfg.batch_size} is larger than the training set "
                        f"({src.num_train} images); lower it")
    return src
