"""TFRecord sources (`tfrecord:DIR`): the shards and `manifest.json` the converter wrote
(research/data/convert.py), each worker of a multi-worker run reading its own files."""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf

from research.config import DataConfig, UserError
from research.data import images as images_lib
from research.data.layout import parse_classes
from research.data.splits import AUTOTUNE, Source, _resize_uint8, _stat, fingerprint


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
            raise ValueError("not a shard manifest with train and val splits")
        for split in m["splits"].values():
            for shard in split["files"]:
                if not os.path.exists(os.path.join(root, shard["name"])):
                    raise ValueError(f"shard {shard['name']} is missing")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--dataset=tfrecord:{root}: {TFRECORD_MANIFEST} is missing or unreadable ({e}); "
                        "write the shards with the converter (README: Datasets larger than memory)") from None
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
    root = cfg.source.arg
    m = read_tfrecord_manifest(root)
    names = list(m["class_names"])
    keep = parse_classes(cfg.classes, names)
    if cfg.test == "val":
        raise UserError(f"--test=val: tfrecord:{root} has the splits the converter wrote; convert with "
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
                  test_from=(f"tfrecord:{root} split 'test' ({m.get('test_from', 'written by the converter')})"
                             if test else "none"),
                  train_counts=[int(c) for c in out["train"][2]], fingerprints=prints,
                  shard=(index, count) if count > 1 else (0, 1), min_worker_train=fewest,
                  decoded=m.get("encoding") == "raw")
