"""TensorBoard writers: one per split (`train/`, `val/`, `test/`), stable tag names.

Tags are the metric names without a split prefix (`loss`, `accuracy`, ...):
the writer's directory is the split, so TensorBoard shows `train` and `val`
runs side by side on each chart.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf


class Summaries:
    """Writers for one run; a no-op when `enabled` is False (non-chief workers)."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self.workdir = workdir
        self.writers = {}
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
