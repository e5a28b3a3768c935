"""What every data source shares: the `Source` record, class subsets, the carve of
validation and test slices from the training images, and the fingerprints that tell a
cache whether its data changed."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import tensorflow as tf

from research.data import images as images_lib

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
