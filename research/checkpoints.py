"""Checkpoint orchestration: `ckpt/` (latest N), `best/` (best by the monitor),
resume, and initialisation from another run.

A checkpoint holds the model, the optimizer (slots, iteration counter, loss
scale), the base model on its own (so another run can load just the backbone),
and `meta`: a JSON string with the run-control state (stage, epoch, step within
the epoch, running train sums, early-stopping state, history). Data order and
augmentation are functions of (seed, epoch), so they need no state of their own.

Crash safety comes from TensorFlow's checkpoint writer and `CheckpointManager`:
data is written under a temporary name and renamed, and the `checkpoint` index
file is replaced atomically after the data is complete, so a run killed while
saving still points at the previous complete checkpoint. A checkpoint whose
files are damaged later (truncated, say) fails to restore and the next older
one is used instead; none is ever half-restored, because a later full restore
overwrites every variable.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf
from absl import logging

from research.config import UserError


class StorageError(Exception):
    """The workdir cannot be written (disk full, permissions)."""


class Checkpoints:
    """The run's two checkpoint managers.

    Args:
      workdir: run directory; `ckpt/` and `best/` are created inside it.
      model: the classifier.
      base: its backbone (saved separately for `init_from_run`).
      optimizer: the single run optimizer.
      keep: how many latest checkpoints to keep.
      scratch_dir: where non-chief multi-worker replicas save (a throw-away
        directory, as TF's multi-worker guide prescribes); they still restore
        from `workdir/ckpt`.
    """

    def __init__(self, workdir: str, *, model, base, optimizer, keep: int = 3, scratch_dir: str | None = None):
        self.meta = tf.Variable("", dtype=tf.string, trainable=False, name="run_meta")
        root = scratch_dir or workdir
        # Every worker restores from the run's own ckpt/, even those that save elsewhere.
        self.restore_dir = os.path.join(workdir, "ckpt")
        self.full = tf.train.Checkpoint(model=model, base=base, optimizer=optimizer, meta=self.meta)
        self.weights_only = tf.train.Checkpoint(model=model, base=base, meta=self.meta)
        self.latest = tf.train.CheckpointManager(self.full, os.path.join(root, "ckpt"), max_to_keep=keep)
        self.best = tf.train.CheckpointManager(self.weights_only, os.path.join(root, "best"), max_to_keep=1)

    def _save(self, manager, meta: dict, number: int) -> str:
        self.meta.assign(json.dumps(meta))
        try:
            return manager.save(checkpoint_number=number)
        except (tf.errors.ResourceExhaustedError, tf.errors.PermissionDeniedError,
                tf.errors.UnknownError, tf.errors.FailedPreconditionError, OSError) as e:
            raise StorageError(f"could not write a checkpoint in {manager.directory!r} "
                               f"({type(e).__name__}: {str(e).splitlines()[0]}); disk full or not writable? "
                               "The previous checkpoints there are intact.") from None

    def save_latest(self, meta: dict, number: int) -> str:
        return self._save(self.latest, meta, number)

    def save_best(self, meta: dict, number: int) -> str:
        return self._save(self.best, meta, number)

    def restore_latest(self) -> dict | None:
        """Restores the newest readable checkpoint of `ckpt/`.

        Returns:
          Its meta dict, or None when there is no checkpoint to resume.
        """
        state = tf.train.get_checkpoint_state(self.restore_dir)
        paths = list(state.all_model_checkpoint_paths) if state else []
        for path in reversed(paths):
            if not os.path.isabs(path):
                path = os.path.join(self.restore_dir, path)
            try:
                self.full.restore(path).assert_existing_objects_matched()
            except Exception as e:  # noqa: BLE001  damaged files raise OpError, IndexError, ValueError...
                logging.warning("checkpoint %s is unreadable (%s: %s); trying an older one",
                                path, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                continue
            logging.info("restored checkpoint %s", path)
            return dict(json.loads(self.meta.numpy().decode()), path=path)
        if paths:
            raise UserError(f"no readable checkpoint in {self.restore_dir!r}; "
                            "move it aside to start the run again")
        return None

    def restore_best_weights(self) -> dict | None:
        """Restores the model (weights and BN statistics) from `best/`."""
        path = self.best.latest_checkpoint
        if not path:
            return None
        self.weights_only.restore(path).assert_existing_objects_matched()
        return dict(json.loads(self.meta.numpy().decode()), path=path)


def find_run_checkpoint(run_dir: str) -> str:
    """The checkpoint another run offers: its best one, else its latest one.

    Raises:
      UserError: when `run_dir` holds no checkpoint.
    """
    for sub in ("best", "ckpt"):
        path = tf.train.latest_checkpoint(os.path.join(run_dir, sub))
        if path:
            return path
    raise UserError(f"--weights=ckpt:{run_dir}: no checkpoint in {run_dir}/best or {run_dir}/ckpt")


def init_from_run(base, run_dir: str, *, first_blocks: list[str] | None = None,
                  block_of: dict[str, str] | None = None) -> str:
    """Loads another run's backbone into `base`, skipping its head.

    This is how a transfer study starts from a base pretrained on other classes.

    Args:
      base: the freshly built backbone.
      run_dir: the other run's workdir.
      first_blocks: copy only these blocks' layers (the rest keep their fresh
        initialisation); None copies everything.
      block_of: layer name -> block name, needed with `first_blocks`.

    Raises:
      UserError: no checkpoint, or one whose backbone does not fit this one.
    """
    import keras

    path = find_run_checkpoint(run_dir)
    target = base if first_blocks is None else keras.models.clone_model(base)
    try:
        tf.train.Checkpoint(base=target).restore(path).expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as e:
        raise UserError(f"--weights=ckpt:{run_dir}: checkpoint {path} does not hold a backbone compatible "
                        f"with this one (same --backbone and --alpha?): {str(e).splitlines()[0]}") from None
    if first_blocks is not None:
        wanted = set(first_blocks)
        for layer, source in zip(base.layers, target.layers):
            if block_of[layer.name] in wanted:
                for v, src in zip(layer.weights, source.weights):
                    v.assign(src)
    return path
