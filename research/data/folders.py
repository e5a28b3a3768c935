"""Folder sources (`folder:PATH`): one sub-folder per class, PATH/train + PATH/val (or
validation) and PATH/test if present, every image checked before training.

Folder images are checked once: the result of each file's check is remembered in
`CACHE_DIR/images.json`, keyed by path, size and modification time, so a resume
or a second run opens no image it has seen before.
"""

from __future__ import annotations

import concurrent.futures
import json
import os

import numpy as np
import tensorflow as tf
from absl import logging

from research.config import DataConfig, UserError
from research.data import images as images_lib
from research.data.layout import folder_split_dirs, folder_splits  # noqa: F401  (the folder source's layout)
from research.data.layout import parse_classes
from research.data.splits import AUTOTUNE, Source, _resize_uint8, _stat, fingerprint, progress_bar


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


def load_folder_source(cfg: DataConfig, size: int, cache_dir: str | None = None) -> Source:
    path = cfg.source.arg
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
        if not paths and key == "val" and cfg.refit:  # a refit trains on every pool image
            out[key], prints[key] = ([], []), fingerprint("folder", [], [], [])
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
