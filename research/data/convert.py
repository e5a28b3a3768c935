"""A class-folder dataset as TFRecord shards, for `--dataset=tfrecord:DIR`.

    python -m launch.convert --dataset=folder:/data/food-101 --out=/data/food-101-shards

Every image is checked first (a corrupt file is named, or skipped with
`--skip_bad_images` and listed in the manifest); nothing is written until all are.
The splits are the ones `--dataset=folder:PATH` would train on (its own
`val/` and `test/` folders, or the same deterministic carve of `train/`), each
written as `SPLIT-NNNNN.tfrecord` shards of about `shard_mb` MB in a fixed shuffled
order, so that a bounded shuffle buffer draws every class and each worker's files
(multi-worker training) hold every class. A record keeps the file's own bytes, or,
with `image_size`, the image resized to that side and re-encoded as JPEG, or with
`encoding="raw"` its decoded pixels (no decoding while training, at ~5x the bytes
of a JPEG); its label and original path go with it. `manifest.json` records the class names, the
split plan and, for every shard, its number of images of each class.

The output appears whole or not at all: it is written into `OUT.tmp-PID` and
renamed when complete.
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import tensorflow as tf

from research.data import images as images_lib
from research.data import sources
from research.data import tfrecords
from research.data import folders
from research.data import layout
from research.config import DataConfig, UserError

FORMAT = "research-tfrecord"
ORDER_SEED = 0  # the fixed shuffle of the records within each split


def _feature(value) -> tf.train.Feature:
    if isinstance(value, bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def _encoded(paths: list[str], image_size: int, encoding: str) -> tf.data.Dataset:
    """Each file's bytes, or its image resized to `image_size` and re-encoded as JPEG
    or as raw pixels, in order."""
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string)).map(
        tf.io.read_file, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if image_size:
        def encode(data):
            pixels = tf.cast(images_lib.resize(images_lib.decode(data, image_size), image_size), tf.uint8)
            return tf.io.serialize_tensor(pixels) if encoding == "raw" else tf.io.encode_jpeg(pixels, quality=95)
        ds = ds.map(encode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def _write_split(out: str, key: str, paths: list[str], labels: list[int], num_classes: int, *, image_size: int,
                 encoding: str, shard_bytes: int, bar, done: int) -> tuple[list[dict], int]:
    shards, writer, size, counts = [], None, 0, None

    def close():
        if writer is not None:
            writer.close()
            shards[-1]["class_counts"] = counts.tolist()
            shards[-1]["count"] = int(counts.sum())
            shards[-1]["bytes"] = os.path.getsize(os.path.join(out, shards[-1]["name"]))

    for path, label, data in zip(paths, labels, _encoded(paths, image_size, encoding).as_numpy_iterator()):
        if writer is None or size >= shard_bytes:
            close()
            shards.append({"name": f"{key}-{len(shards):05d}.tfrecord"})
            writer = tf.io.TFRecordWriter(os.path.join(out, shards[-1]["name"]))
            size, counts = 0, np.zeros(num_classes, np.int64)
        record = tf.train.Example(features=tf.train.Features(feature={
            "image": _feature(data), "label": _feature(int(label)), "path": _feature(path.encode())}))
        writer.write(record.SerializeToString())
        size += len(data)
        counts[label] += 1
        done += 1
        if bar and (done % 200 == 0):
            bar.update(done)
    close()
    return shards, done


def convert(cfg: DataConfig, out: str, *, image_size: int = 0, encoding: str = "jpeg", shard_mb: float = 128,
            log=print) -> dict:
    """Writes the splits of `cfg.dataset` (a `folder:`) as shards in `out`; returns the manifest.

    Raises:
      UserError: not a folder dataset, `out` not empty, a corrupt image (unless
        `cfg.skip_bad_images`), a split without readable images.
    """
    t0 = time.perf_counter()
    names, splits, test_from = layout.check_conversion(cfg, out, image_size=image_size, encoding=encoding,
                                                       shard_mb=shard_mb)
    plan, skipped = {}, []
    for key, per_class in splits.items():  # every image checked before anything is written
        paths = [p for fs in per_class for p in fs]
        labels = [c for c, fs in enumerate(per_class) for _ in fs]
        good, bad, _ = folders.check_images(paths, skip_bad=cfg.skip_bad_images)
        skipped += bad
        bad_set = set(bad)
        labels = [y for p, y in zip(paths, labels) if p not in bad_set]
        if not good and key != "test":
            raise UserError(f"no readable images in the {key} split of {cfg.dataset}")
        if good:
            order = np.random.RandomState(ORDER_SEED).permutation(len(good))
            plan[key] = ([good[i] for i in order], [labels[i] for i in order])
    out = os.path.abspath(out)
    tmp = f"{out.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    total = sum(len(p) for p, _ in plan.values())
    bar = sources.progress_bar(total, f"writing {total} images as TFRecord shards", threshold=1)
    manifest = {"format": FORMAT, "version": 1, "source": cfg.dataset, "class_names": names,
                "image_size": image_size, "encoding": encoding,
                "image": {"raw": "resized pixels (tf.io.serialize_tensor of uint8 [S, S, 3])",
                          "jpeg": "resized JPEG" if image_size else "the file's own bytes"}[encoding],
                "val_fraction": cfg.val_fraction, "test": cfg.test, "test_fraction": cfg.test_fraction,
                "test_from": test_from, "skipped": skipped, "splits": {}}
    done = 0
    try:
        os.makedirs(tmp)
        for key, (paths, labels) in plan.items():
            shards, done = _write_split(tmp, key, paths, labels, len(names), image_size=image_size,
                                        encoding=encoding, shard_bytes=int(shard_mb * 2**20), bar=bar, done=done)
            manifest["splits"][key] = {"count": len(paths), "class_counts": np.bincount(labels, minlength=len(names))
                                       .tolist(), "files": shards}
        if bar and done % 200:
            bar.update(total)
        folders._write_json_atomically(os.path.join(tmp, tfrecords.TFRECORD_MANIFEST), manifest)
        if os.path.isdir(out):
            os.rmdir(out)  # empty: checked above
        os.rename(tmp, out)
    except (OSError, tf.errors.OpError) as e:  # a full disk; --out made by another process meanwhile
        raise UserError(f"--out={out}: could not write the shards ({str(e).splitlines()[0]}); nothing was kept") \
            from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_files = sum(len(s["files"]) for s in manifest["splits"].values())
    log(f"{out}: {len(names)} classes; " + ", ".join(f"{k} {v['count']} images in {len(v['files'])} shard(s)"
                                                    for k, v in manifest["splits"].items())
        + (f"; skipped {len(skipped)} unreadable" if skipped else "")
        + f"; {n_files} files in {time.perf_counter() - t0:.1f}s")
    return manifest
