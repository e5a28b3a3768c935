"""TensorBoard writers: one per split (`train/`, `val/`, `test/`), stable tag names.

Tags are the metric names without a split prefix (`loss`, `accuracy`, ...):
the writer's directory is the split, so TensorBoard shows `train` and `val`
runs side by side on each chart.
"""

from __future__ import annotations

import os
import re

import numpy as np
import tensorflow as tf


def drop_events_after(workdir: str, wall_time: float) -> int:
    """Removes from every TensorBoard events file under `workdir` the events written after
    `wall_time`, as TensorFlow 1's `purge_step` did. Returns how many.

    A resumed run repeats what followed its checkpoint, summaries included; without
    this, an epoch whose summaries were written before its checkpoint failed (a full
    disk, a kill between the two) would show twice at the same step. Each file is
    rewritten whole (a temporary file, then renamed); a record cut off by a kill ends it.
    """
    from tensorflow.core.util import event_pb2

    dropped = 0
    # The run's own writers only (train/, val/, test/, and a variant's val_NAME/, test_NAME/):
    # eval/ holds launch.evaluate's events, which a resumed run does not write again.
    own = [d for d in (os.listdir(workdir) if os.path.isdir(workdir) else [])
           if re.fullmatch(r"(train|val|test)(_\w+)?", d) and os.path.isdir(os.path.join(workdir, d))]
    for root in (os.path.join(workdir, d) for d in own):
        for name in os.listdir(root):
            if ".tfevents." not in name or name.endswith(".tmp"):
                continue
            path = os.path.join(root, name)
            records = []
            try:
                for r in tf.data.TFRecordDataset(path):
                    records.append(r.numpy())
            except tf.errors.DataLossError:
                pass  # the last record was cut off
            keep = [r for r in records if event_pb2.Event.FromString(r).wall_time <= wall_time]
            if len(keep) == len(records):
                continue
            dropped += len(records) - len(keep)
            if not keep:
                os.remove(path)
                continue
            with tf.io.TFRecordWriter(path + ".tmp") as w:
                for r in keep:
                    w.write(r)
            os.replace(path + ".tmp", path)
    return dropped


class Summaries:
    """Writers for one run; a no-op when `enabled` is False (non-chief workers).

    Args:
      resumed_at: the `saved_at` of the checkpoint a resumed run starts from: events
        written after it are dropped first (`drop_events_after`).
    """

    def __init__(self, workdir: str, *, enabled: bool = True, resumed_at: float | None = None):
        self.enabled = enabled
        self.workdir = workdir
        self.writers = {}
        if enabled and resumed_at is not None:
            drop_events_after(workdir, resumed_at)
        if enabled:
            for split in ("train", "val"):
                self.writers[split] = tf.summary.create_file_writer(os.path.join(workdir, split))

    def scalars(self, split: str, values: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        if split not in self.writers:  # test/: written once, at the end of a run
            self.writers[split] = tf.summary.create_file_writer(os.path.join(self.workdir, split))
        with self.writers[split].as_default(step=step):
            for name, value in values.items():
                if value is not None:
                    tf.summary.scalar(name, float(value))

    def text(self, split: str, name: str, markdown: str, step: int) -> None:
        if self.enabled:
            with self.writers[split].as_default(step=step):
                tf.summary.text(name, markdown)

    def images(self, split: str, name: str, images, step: int, max_outputs: int = 16) -> None:
        """Images in [0, 255] float, as a grid of single images."""
        if self.enabled:
            with self.writers[split].as_default(step=step):
                tf.summary.image(name, tf.cast(tf.clip_by_value(images, 0, 255), tf.uint8), max_outputs=max_outputs)

    def histograms(self, split: str, variables, step: int) -> None:
        if self.enabled:
            with self.writers[split].as_default(step=step):
                for v in variables:
                    tf.summary.histogram(v.path, np.asarray(v.numpy(), dtype=np.float32))

    def flush(self) -> None:
        for w in self.writers.values():
            w.flush()
