"""Data sources: what the images are, before any batching.

Sources (`DataConfig.dataset`):
  * `digits`        scikit-learn's bundled 8x8 handwritten digits (1797 real images, offline)
  * `folder:PATH`   one sub-folder per class; PATH/train + PATH/val (or validation) if present
  * `tfds:NAME`     any TFDS image-classification dataset
  * `tfrecord:DIR`  TFRecord shards written by `python -m launch.convert`

Every source becomes a `Source`: two `tf.data.Dataset`s of `(uint8 image resized to
the model's input side, int32 label)`, their sizes and the class names.
`research/data/pipeline.py` turns them into the batched training and validation streams.

Folder images are checked once: the result of each file's check is remembered in
`CACHE_DIR/images.json`, keyed by path, size and modification time, so a resume
or a second run opens no image it has seen before.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import tensorflow as tf
from absl import logging

from research.data import images as images_lib
from research.config import DataConfig, UserError

IMAGE_EXTENSIONS = images_lib.IMAGE_EXTENSIONS
AUTOTUNE = tf.data.AUTOTUNE


@dataclass
class Source:
    """Decoded, resized, relabelled data of one dataset, before batching.

    `test` (None with `--test=none`) is for the final report only: no training
    decision reads it. `test_from` says what plays the test role.
    """

    train: tf.data.Dataset
    val: tf.data.Dataset
    num_train: int
    num_val: int
    class_names: list[str]
    image_size: int
    skipped: list[str] = field(default_factory=list)
    skipped_by_split: dict[str, list[str]] = field(default_factory=dict)
    test: tf.data.Dataset | None = None
    num_test: int = 0
    test_from: str = "none"
    train_counts: list[int] = field(default_factory=list)
    # What identifies each split's decoded images (the files, their sizes and times, the
    # labels): a disk cache is reused only by a split with the same fingerprint.
    fingerprints: dict[str, str] = field(default_factory=dict)
    # Multi-worker file sharding (`tfrecord:` only): this worker's index, the number of
    # workers, and the fewest training images any worker holds; `train` and `num_train`
    # are then this worker's own.
    shard: tuple[int, int] = (0, 1)
    min_worker_train: int = 0
    # Elements need no image decoding (raw-pixel shards): streaming them costs about what
    # reading a cache does, so the pipeline's thread pool is capped as for a cache.
    decoded: bool = False

    # Counts the training images of each class when `train_counts` was left empty
    # (a TFDS split sized from its metadata): only `--class_weight=balanced` and
    # `--sampler=balanced` need them.
    count_classes: Callable[[], list[int]] | None = None
    # Writes what the folder check learnt (`CACHE_DIR/images.json`); called once the run
    # may write, so that a user error leaves nothing behind.
    remember: Callable[[], None] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def split_train(self) -> int:
        """The training split's size: every worker's images, when each reads its own share."""
        return sum(self.train_counts) if self.shard[1] > 1 else self.num_train

    def class_counts(self) -> list[int]:
        """The training images of each class (counted on first use if the loader did not)."""
        if not self.train_counts and self.count_classes is not None:
            self.train_counts = [int(n) for n in self.count_classes()]
        return self.train_counts


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


def fingerprint(*parts) -> str:
    """A short stable hash of `parts` (strings, numbers, arrays, lists of them)."""
    h = hashlib.sha1()
    for p in parts:
        h.update(np.asarray(p).tobytes() if isinstance(p, np.ndarray) else repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


# --- Sources -------------------------------------------------------------------------

def _resize_uint8(image, size: int):
    return tf.cast(images_lib.resize(image, size), tf.uint8)


def _from_arrays(images: np.ndarray, labels: np.ndarray, size: int) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int32)))
    return ds.map(lambda x, y: (_resize_uint8(x, size), y), num_parallel_calls=AUTOTUNE)


def carve(labels: np.ndarray, val_fraction: float, test_fraction: float = 0.0
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Splits indices into (train, val, test): stratified, deterministic and independent
    of the training seed, so validation and test are the same across seeds and sweeps.

    A zero fraction carves nothing. Validation is taken first, so turning the test
    slice on or off leaves the validation images as they were.
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
    return tuple(np.sort(np.array(p, dtype=np.int64)) for p in parts)


def _plan(cfg: DataConfig, has_val: bool, has_test: bool, own: str) -> tuple[str, str, str]:
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


def load_digits_source(cfg: DataConfig, size: int) -> Source:
    from sklearn.datasets import load_digits
    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(images[..., None], 3, axis=-1)
    names = [str(i) for i in range(10)]
    keep = parse_classes(cfg.classes, names)
    _, test_plan, test_from = _plan(cfg, has_val=False, has_test=False, own="digits")
    # Carved over all ten classes, then subset (as folders are): a digit's split is the same
    # whatever --classes, so a run on 0-9 never trained on the test images of a run on 5-9.
    parts = carve(d.target, cfg.val_fraction, cfg.test_fraction if test_plan == "carve" else 0.0)
    tr, va, te = (idx[np.isin(d.target[idx], keep)] for idx in parts)
    labels = np.searchsorted(keep, d.target)
    return Source(_from_arrays(images[tr], labels[tr], size), _from_arrays(images[va], labels[va], size),
                  len(tr), len(va), [names[k] for k in keep], size,
                  test=_from_arrays(images[te], labels[te], size) if len(te) else None, num_test=len(te),
                  test_from=test_from, train_counts=np.bincount(labels[tr], minlength=len(keep)).tolist(),
                  fingerprints={k: fingerprint("digits", idx, labels[idx]) for k, idx in zip(("train", "val", "test"),
                                                                                          (tr, va, te))})


def _list_class_folder(root: str) -> tuple[list[str], list[list[str]]]:
    if not os.path.isdir(root):
        raise UserError(f"--dataset=folder:{root}: no such directory")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if len(classes) < 2:
        raise UserError(f"folder {root!r} must hold one sub-folder per class (at least 2); found {len(classes)}")
    files, ignored = [], []
    for c in classes:
        cdir = os.path.join(root, c)
        # scandir: file types from the directory entries, no stat per file (a 100k-image folder
        # is listed at every start).
        with os.scandir(cdir) as entries:
            names = [e.name for e in entries if e.is_file()]
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


def _stat(path: str) -> list[int]:
    try:
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return [-1, -1]


def _read_manifest(path: str | None) -> dict:
    if not path or not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)["images"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # unreadable: every image is checked again, and the file rewritten


def _write_json_atomically(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)  # a kill leaves the old manifest or the new one, never half of one


def check_images(paths: list[str], *, skip_bad: bool, known: dict | None = None
                 ) -> tuple[list[str], list[str], list[list[int]]]:
    """Decodes every image not checked before; adds the results to `known`.

    An image counts as checked when `known` (`{path: [size, mtime_ns, error or
    None]}`, the manifest's images) records it with its current size and
    modification time: a resume or a second run on the same folder decodes
    nothing, and a file replaced since is checked again.

    Returns:
      (good paths, bad paths, `[size, mtime_ns]` of every path).

    Raises:
      UserError: naming the first bad file, unless `skip_bad`.
    """
    known = {} if known is None else known
    stats = [_stat(p) for p in paths]
    errors: list[str | None] = [None] * len(paths)
    todo = []
    for i, (p, st) in enumerate(zip(paths, stats)):
        entry = known.get(p)
        if entry and entry[:2] == st and st[0] >= 0:
            errors[i] = entry[2]
        else:
            todo.append(i)
    if todo:
        bar = progress_bar(len(todo), f"checking {len(todo)} images" + (
            f" ({len(paths) - len(todo)} checked before)" if len(todo) < len(paths) else ""))
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
            for done, (i, error) in enumerate(zip(todo, pool.map(_readable, [paths[i] for i in todo])), 1):
                errors[i] = error
                if bar and (done % 200 == 0 or done == len(todo)):
                    bar.update(done)
        for i in todo:
            known[paths[i]] = stats[i] + [errors[i]]
    bad = [(p, e) for p, e in zip(paths, errors) if e]
    if bad and not skip_bad:
        p, e = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(f"unreadable or corrupt image {p!r}: {e}{more}; fix or remove it, "
                        "or pass --skip_bad_images to skip such files")
    bad_set = {p for p, _ in bad}
    return [p for p in paths if p not in bad_set], [p for p, _ in bad], stats


def _decode_file(path, label, size: int):
    # EXIF orientation and giant-JPEG downscaling as at predict and serving time.
    return _resize_uint8(images_lib.decode(tf.io.read_file(path), size), size), label


def _files_dataset(paths: list[str], labels: list[int], size: int) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string), tf.constant(labels, tf.int32)))
    return ds.map(lambda p, y: _decode_file(p, y, size), num_parallel_calls=AUTOTUNE)


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
        return _list_class_folder(os.path.join(path, dirs["train"]) if dirs else path)[0]
    if cfg.dataset.startswith("tfrecord:"):
        return list(read_tfrecord_manifest(cfg.dataset[len("tfrecord:"):])["class_names"])
    return load_source(dataclasses.replace(cfg, classes="", batch_size=1), 1).class_names


def folder_splits(cfg: DataConfig) -> tuple[list[str], dict[str, list[list[str]]], str]:
    """The files of each split of a folder dataset, before any image is opened.

    Returns:
      (class names, `{split: one file list per class}` for `train`, `val` and, unless
      `--test=none`, `test`; what plays the test role).

    Raises:
      UserError: a missing folder, split folders with different classes, `--test=val`
        without a validation folder.
    """
    path = cfg.dataset[len("folder:"):]
    if not os.path.isdir(path):
        raise UserError(f"--dataset=folder:{path}: no such directory")
    dirs = folder_split_dirs(path)
    names, train = _list_class_folder(os.path.join(path, dirs["train"]) if dirs else path)
    own = {}
    for key in ("val", "test"):
        if dirs and dirs[key]:
            other, files = _list_class_folder(os.path.join(path, dirs[key]))
            if other != names:
                raise UserError(f"class folders differ between {dirs['train']} and {dirs[key]}: {names} vs {other}")
            own[key] = files
    val_plan, test_plan, test_from = _plan(cfg, "val" in own, "test" in own, own=f"folder {path!r}")
    if test_plan == "own":
        test_from = os.path.join(path, dirs["test"])
    elif test_plan == "val":
        test_from = f"{os.path.join(path, dirs['val'])} (the source's validation split)"
    splits = {"train": train, "val": own.get("val"), "test": {"own": own.get("test"), "val": own.get("val")}.get(test_plan)}
    if "carve" in (val_plan, test_plan):
        flat = [f for fs in train for f in fs]
        labels = np.array([c for c, fs in enumerate(train) for _ in fs])
        parts = carve(labels, cfg.val_fraction if val_plan == "carve" else 0.0,
                      cfg.test_fraction if test_plan == "carve" else 0.0)
        carved = {}
        for key, idx in zip(("train", "val", "test"), parts):
            carved[key] = [[] for _ in names]
            for i in idx:
                carved[key][labels[i]].append(flat[i])
        splits["train"] = carved["train"]
        if val_plan == "carve":
            splits["val"] = carved["val"]
        if test_plan == "carve":
            splits["test"] = carved["test"]
    if test_plan == "none":
        del splits["test"]
    return names, splits, test_from


def load_folder_source(cfg: DataConfig, size: int, cache_dir: str | None = None) -> Source:
    path = cfg.dataset[len("folder:"):]
    names, splits, test_from = folder_splits(cfg)
    keep = parse_classes(cfg.classes, names)
    manifest = os.path.join(cache_dir, "images.json") if cache_dir else None
    known = _read_manifest(manifest)
    before = dict(known)
    out, skipped, prints = {}, {}, {}
    for key, per_class in splits.items():
        paths = [p for new, c in enumerate(keep) for p in per_class[c]]
        labels = [new for new, c in enumerate(keep) for _ in per_class[c]]
        good, bad, stats = check_images(paths, skip_bad=cfg.skip_bad_images, known=known)
        skipped[key] = bad
        bad_set = set(bad)
        kept = [i for i, p in enumerate(paths) if p not in bad_set]
        labels = [labels[i] for i in kept]
        if not paths and key == "test":  # a carved slice of a class folder or two
            logging.warning("%s: too few images to carve a test slice; the run has no test split", path)
            test_from = "none (too few images to carve a test slice)"
            continue
        if not good:
            raise UserError(f"no readable images in the {key} split of {path!r}")
        out[key] = (good, labels)
        prints[key] = fingerprint("folder", good, labels, [stats[i] for i in kept])
    test = out.get("test")
    return Source(_files_dataset(*out["train"], size), _files_dataset(*out["val"], size),
                  len(out["train"][0]), len(out["val"][0]), [names[k] for k in keep], size,
                  [p for bad in skipped.values() for p in bad], skipped,
                  test=_files_dataset(*test, size) if test else None, num_test=len(test[0]) if test else 0,
                  test_from=test_from, train_counts=np.bincount(out["train"][1], minlength=len(keep)).tolist(),
                  fingerprints=prints,
                  remember=(lambda: _write_json_atomically(manifest, {"version": 1, "images": known}))
                  if manifest and known != before else None)


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
    for flag, split in (("--val_split", cfg.val_split), ("--test_split", cfg.test_split)):
        if split and splits and split.split("[")[0] not in splits:
            raise UserError(f"{flag}={split!r} not in tfds:{name}; splits: {', '.join(splits)}")
    own_val = cfg.val_split or next((s for s in ("validation", "val") if s in splits), "")
    own_test = cfg.test_split or ("test" if "test" in splits else "")
    val_plan, test_plan, test_from = _plan(cfg, bool(own_val), bool(own_test), own=f"tfds:{name}")
    if val_plan == test_plan == "own" and own_val == own_test:
        raise UserError(f"tfds:{name}: {own_val!r} would be both the validation and the test split; pass another "
                        "--test_split, or --test=none to validate on it without a test split")
    if val_plan == test_plan == "own" and own_val.split("[")[0] == own_test.split("[")[0] and own_val != own_test:
        raise UserError(f"tfds:{name}: --val_split={own_val!r} and the test split {own_test!r} are slices of the same "
                        "split, which this code cannot check for overlap; name another --test_split, or --test=none")
    # Carved slices are TFDS percent slices of the training split: deterministic and
    # the same for every seed (TFDS shuffled the examples when it prepared them).
    # Validation is the last v %, test the t % before it: turning test on keeps validation.
    v = int(round(100 * cfg.val_fraction)) if val_plan == "carve" else 0
    t = int(round(100 * cfg.test_fraction)) if test_plan == "carve" else 0
    if (val_plan == "carve" and v < 1) or (test_plan == "carve" and t < 1):
        raise UserError(f"tfds:{name}: --val_fraction and --test_fraction carve whole percents of "
                        f"{cfg.train_split!r}; each must be at least 0.01")
    ts = cfg.train_split
    train_split = f"{ts}[:{100 - v - t}%]" if v + t else ts
    val_split = f"{ts}[{100 - v}%:]" if val_plan == "carve" else own_val
    test_split = {"own": own_test, "val": own_val, "carve": f"{ts}[{100 - v - t}%:{100 - v}%]", "none": ""}[test_plan]
    if test_plan == "own":
        test_from = f"tfds:{name} split {own_test!r}"
    elif test_plan == "val":
        test_from = f"tfds:{name} split {own_val!r} (the source's validation split)"
    keep = parse_classes(cfg.classes, names)
    table = np.full(len(names), -1, np.int32)
    table[keep] = np.arange(len(keep), dtype=np.int32)
    table_t = tf.constant(table)

    def count(split: str) -> np.ndarray:
        # Labels only: the images are not decoded.
        ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False,
                                decoders={"image": tfds.decode.SkipDecoding()})
        ds = ds.map(lambda x, y: tf.gather(table_t, tf.cast(y, tf.int32)))
        return ds.filter(lambda y: y >= 0).map(lambda y: tf.one_hot(y, len(keep), dtype=tf.int64)).reduce(
            tf.zeros([len(keep)], tf.int64), lambda a, b: a + b).numpy()

    def size_of(split: str) -> int | None:
        """The split's size from the builder's metadata, without reading it (all classes only)."""
        if len(keep) < len(names):
            return None
        try:
            return int(info.splits[split].num_examples) or None
        except Exception:  # no metadata (mock data), or a slice TFDS cannot size
            return None

    def make(split: str) -> tuple[tf.data.Dataset, int, list[int]]:
        try:
            ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
        except (ValueError, KeyError, tf.errors.OpError) as e:
            raise UserError(f"tfds:{name} split {split!r}: {str(e).splitlines()[0]}") from None
        ds = ds.map(lambda x, y: (x, tf.gather(table_t, tf.cast(y, tf.int32))))
        if len(keep) < len(names):
            ds = ds.filter(lambda x, y: y >= 0)
        ds = ds.map(lambda x, y: (_resize_uint8(_ensure_rgb(x), size), y), num_parallel_calls=AUTOTUNE)
        n = size_of(split)
        if n is not None:
            return ds, n, []
        counts = count(split)
        return ds, int(counts.sum()), counts.tolist()

    train, n_train, c_train = make(train_split)
    val, n_val, _ = make(val_split)
    test, n_test, _ = make(test_split) if test_split else (None, 0, [])
    version = str(getattr(info, "version", ""))
    return Source(train, val, n_train, n_val, [names[k] for k in keep], size, test=test,
                  num_test=n_test, test_from=test_from, train_counts=c_train,
                  count_classes=lambda: count(train_split),
                  fingerprints={k: fingerprint("tfds", name, version, cfg.data_dir, split, keep)
                                for k, split in (("train", train_split), ("val", val_split), ("test", test_split))})


# --- TFRecord shards (`python -m launch.convert`) ------------------------------------------

TFRECORD_MANIFEST = "manifest.json"
TFRECORD_FEATURES = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64),
                     "path": tf.io.FixedLenFeature([], tf.string)}


def read_tfrecord_manifest(root: str) -> dict:
    """The manifest `launch.convert` wrote into `root`.

    Raises:
      UserError: no such directory, no manifest, or one this code cannot read.
    """
    path = os.path.join(root, TFRECORD_MANIFEST)
    if not os.path.isdir(root):
        raise UserError(f"--dataset=tfrecord:{root}: no such directory")
    try:
        with open(path) as f:
            m = json.load(f)
        if m.get("format") != "research-tfrecord" or "train" not in m["splits"] or "val" not in m["splits"]:
            raise ValueError("not a manifest of launch.convert with train and val splits")
        for split in m["splits"].values():
            for shard in split["files"]:
                if not os.path.exists(os.path.join(root, shard["name"])):
                    raise ValueError(f"shard {shard['name']} is missing")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--dataset=tfrecord:{root}: {TFRECORD_MANIFEST} is missing or unreadable ({e}); "
                        "write the shards with python -m launch.convert --dataset=folder:PATH --out=DIR") from None
    return m


def tfrecord_records(files: list[str]) -> tf.data.Dataset:
    """The serialized records of `files`, in a fixed order: the files are read in
    parallel, one record from each in turn (deterministic interleave)."""
    names = tf.data.Dataset.from_tensor_slices(tf.constant(files, tf.string))
    return names.interleave(lambda f: tf.data.TFRecordDataset(f, buffer_size=1 << 20),
                            cycle_length=max(1, min(len(files), 8)), block_length=1,
                            num_parallel_calls=AUTOTUNE, deterministic=True)


def load_tfrecord_source(cfg: DataConfig, size: int, worker: tuple[int, int] = (0, 1)) -> Source:
    """Shards written by `launch.convert`: the splits it wrote, `--classes` applied.

    With `worker = (index, count)` and count > 1 (multi-worker training), this worker's
    training split is its own files (every count-th, from index), or every count-th
    record when there are fewer files than workers: the workers read disjoint shares
    that together cover the split once.
    """
    root = cfg.dataset[len("tfrecord:"):]
    m = read_tfrecord_manifest(root)
    names = list(m["class_names"])
    keep = parse_classes(cfg.classes, names)
    if cfg.test == "val":
        raise UserError(f"--test=val: tfrecord:{root} has the splits launch.convert wrote; convert with "
                        "--test=val to hold out the folder's validation split as test")
    table = np.full(len(names), -1, np.int32)
    table[keep] = np.arange(len(keep), dtype=np.int32)
    table_t = tf.constant(table)
    index, count = worker

    def parse(record):
        ex = tf.io.parse_single_example(record, TFRECORD_FEATURES)
        return ex["image"], tf.gather(table_t, tf.cast(ex["label"], tf.int32))

    def pixels(x):
        if m.get("encoding") == "raw":  # resized at conversion: resized again only to another side
            image = tf.ensure_shape(tf.io.parse_tensor(x, tf.uint8), [m["image_size"], m["image_size"], 3])
            return image if m["image_size"] == size else _resize_uint8(image, size)
        return _resize_uint8(images_lib.decode(x, size), size)

    def elements(records: tf.data.Dataset) -> tf.data.Dataset:
        ds = records.map(parse, num_parallel_calls=AUTOTUNE)
        if len(keep) < len(names):
            ds = ds.filter(lambda x, y: y >= 0)
        return ds.map(lambda x, y: (pixels(x), y), num_parallel_calls=AUTOTUNE)

    def split_counts(shards: list[dict]) -> np.ndarray:
        c = np.sum([s["class_counts"] for s in shards], axis=0) if shards else np.zeros(len(names), np.int64)
        return np.asarray(c)[keep]

    def worker_share(files: list[str], shards: list[dict]) -> tuple[tf.data.Dataset, list[int]]:
        """This worker's training records, and how many images each worker holds."""
        if len(files) >= count:
            per_worker = [int(split_counts(shards[w::count]).sum()) for w in range(count)]
            return tfrecord_records(files[index::count]), per_worker
        # Fewer files than workers: every count-th record (its labels read to count them).
        labels = np.fromiter(tfrecord_records(files).map(lambda r: parse(r)[1]).as_numpy_iterator(), np.int64)
        per_worker = [int(np.sum(labels[w::count] >= 0)) for w in range(count)]
        return tfrecord_records(files).shard(count, index), per_worker

    out, prints, fewest = {}, {}, 0
    for key in ("train", "val", "test"):
        if key not in m["splits"] or (key == "test" and cfg.test == "none"):
            continue
        shards = m["splits"][key]["files"]
        files = [os.path.join(root, s["name"]) for s in shards]
        counts = split_counts(shards)
        records, n, share = tfrecord_records(files), int(counts.sum()), ()
        if key == "train" and count > 1:
            records, per_worker = worker_share(files, shards)
            n, fewest, share = per_worker[index], min(per_worker), (index, count)
        out[key] = (elements(records), n, counts)
        prints[key] = fingerprint("tfrecord", files, [_stat(f) for f in files], keep, share)
    test = out.get("test")
    return Source(out["train"][0], out["val"][0], out["train"][1], out["val"][1], [names[k] for k in keep], size,
                  list(m.get("skipped", [])), test=test[0] if test else None, num_test=test[1] if test else 0,
                  test_from=(f"tfrecord:{root} split 'test' ({m.get('test_from', 'written by launch.convert')})"
                             if test else "none"),
                  train_counts=[int(c) for c in out["train"][2]], fingerprints=prints,
                  shard=(index, count) if count > 1 else (0, 1), min_worker_train=fewest,
                  decoded=m.get("encoding") == "raw")


def _ensure_rgb(x):
    x = tf.convert_to_tensor(x)
    if x.shape.rank == 2:
        x = x[..., None]
    if x.shape[-1] == 1:
        x = tf.image.grayscale_to_rgb(x)
    return x[..., :3]


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
    import json
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
                        f"{extra or 'none'}; the classes are {_show(class_names)}")
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
    if cfg.dataset == "digits":
        src = load_digits_source(cfg, image_size)
    elif cfg.dataset.startswith("folder:"):
        src = load_folder_source(cfg, image_size, cache_dir)
    elif cfg.dataset.startswith("tfds:"):
        src = load_tfds_source(cfg, image_size)
    elif cfg.dataset.startswith("tfrecord:"):
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
