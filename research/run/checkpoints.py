"""Checkpoint orchestration: `ckpt/` (latest N), `best/` (the run's best epoch),
`ema/`, resuming, reading weights out of a run, and the workdir lock.

A checkpoint holds the model, the optimizer (slots, iteration counter, loss
scale; and each stage's own, `optimizer_NAME`), the base model on its own (so
another run can load just the backbone), and `meta`: the `RunState` as JSON (research/run/run_state.py). Data order and
augmentation are functions of (seed, epoch), so they need no state of their own.

How weights are read, and by whom:
  * resuming (`restore_or_initialize`): the whole state of the newest readable
    checkpoint of `ckpt/` (model, optimizer, run state), else the initialisation
    (`imagenet`, a file, another run's backbone), which therefore never runs,
    reads or downloads anything on resume;
  * everything else goes through `restore(workdir, latest|best|ema|PATH, ...)`:
    the model alone (`restore_best_weights`; evaluation and export through
    `load_run`), or with `skip=("head",)` the backbone alone (`--weights=ckpt:`);
  * pretrained ImageNet or `.h5` weights are Keras's own loaders
    (research/model/backbones.py:load_pretrained), and exported models Keras's
    `load_model` (research/serve/predict.py).

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
import re
import time
from typing import Callable

import tensorflow as tf
from absl import logging
from tensorflow.core.protobuf import trackable_object_graph_pb2

from research.config import ExperimentConfig
from research.errors import StorageError, UserError
from research.run.run_state import RunState


class Checkpoints:
    """The run's two checkpoint managers.

    Args:
      workdir: run directory; `ckpt/` and `best/` are created inside it.
      model: the classifier.
      base: its backbone (saved separately for `init_from_run`).
      optimizer: the run's optimizer.
      keep: how many latest checkpoints to keep.
      scratch_dir: where non-chief multi-worker replicas save (a throw-away
        directory, as TF's multi-worker guide prescribes); they still restore
        from `workdir/ckpt`.
      stage_optimizers: the stages' own optimizers, by name (`optimizer_NAME` in the checkpoint).
    """

    def __init__(self, workdir: str, *, model, base, optimizer, keep: int = 3, scratch_dir: str | None = None,
                 stage_optimizers: dict | None = None):
        self.meta = tf.Variable("", dtype=tf.string, trainable=False, name="run_meta")
        self.model = model
        root = scratch_dir or workdir
        # Every worker restores from the run's own ckpt/, even those that save elsewhere.
        self.restore_dir = os.path.join(workdir, "ckpt")
        self.run_best_dir = os.path.join(workdir, "best")
        self.optimizers = {"optimizer": optimizer,
                           **{f"optimizer_{name}": o for name, o in (stage_optimizers or {}).items()}}
        self.full = tf.train.Checkpoint(model=model, base=base, meta=self.meta, **self.optimizers)
        self.weights_only = tf.train.Checkpoint(model=model, base=base, meta=self.meta)
        self.latest = tf.train.CheckpointManager(self.full, os.path.join(root, "ckpt"), max_to_keep=keep)
        self.best = tf.train.CheckpointManager(self.weights_only, os.path.join(root, "best"), max_to_keep=1)
        self.root = root
        self.variant_managers: dict[str, tf.train.CheckpointManager] = {}

    def _save(self, manager, run: RunState, number: int) -> str:
        run.saved_at = time.time()  # after every summary of what this checkpoint holds
        self.meta.assign(run.to_json())
        try:
            return manager.save(checkpoint_number=number)
        except (tf.errors.ResourceExhaustedError, tf.errors.PermissionDeniedError,
                tf.errors.UnknownError, tf.errors.FailedPreconditionError, OSError) as e:
            raise StorageError(f"could not write a checkpoint in {manager.directory!r} "
                               f"({type(e).__name__}: {str(e).splitlines()[0]}); disk full or not writable? "
                               "The previous checkpoints there are intact.") from None

    def save_latest(self, run: RunState) -> str:
        run.saves += 1
        return self._save(self.latest, run, run.saves)

    def save_best(self, run: RunState) -> str:
        return self._save(self.best, run, run.global_epoch)

    def save_variant(self, name: str, run: RunState) -> str:
        """A weight variant's final weights (`ema`: the average of `--ema_decay`) in `NAME/`,
        swapped into the model by the caller; `restore(workdir, NAME)` reads them back."""
        if name not in self.variant_managers:
            self.variant_managers[name] = tf.train.CheckpointManager(
                self.weights_only, os.path.join(self.root, name), max_to_keep=1)
        return self._save(self.variant_managers[name], run, run.global_epoch)

    def restore_latest(self) -> tuple[RunState, str] | None:
        """Restores the newest readable checkpoint of `ckpt/`.

        Returns:
          (its run state, its path), or None when there is no checkpoint to resume.
        """
        paths = listed_checkpoints(self.restore_dir)
        for path in reversed(paths):
            try:
                changed = self._optimizer_changes(path)
                if not changed:
                    self.full.restore(path).assert_existing_objects_matched()
            except Exception as e:  # noqa: BLE001  damaged files raise OpError, IndexError, ValueError...
                logging.warning("checkpoint %s is unreadable (%s: %s); trying an older one",
                                path, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                continue
            if changed:
                workdir = os.path.dirname(self.restore_dir)
                raise UserError(f"the run in {workdir!r} cannot resume with this config: {'; '.join(changed)} (a "
                                "stage added, or another unfreeze spec); an optimizer's slots are checkpointed by "
                                f"position; start a new run from its weights: --workdir=NEW --weights=ckpt:{workdir}")
            logging.info("restored checkpoint %s", path)
            return RunState.from_json(self.meta.numpy().decode()), path
        if paths:
            raise UserError(f"no readable checkpoint in {self.restore_dir!r}; "
                            "move it aside to start the run again")
        return None

    def _optimizer_changes(self, path: str) -> list[str]:
        """Each optimizer that steps another number of variables than in the checkpoint at
        `path`: its stages' trainable sets changed, and its slots would restore into the wrong
        variables (or fail on a shape), so no checkpoint of the run could be read."""
        graph = trackable_object_graph_pb2.TrackableObjectGraph()
        graph.ParseFromString(tf.train.load_checkpoint(path).get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))

        def child(node: int | None, name: str) -> int | None:
            if node is None:
                return None
            return next((c.node_id for c in graph.nodes[node].children if c.local_name == name), None)

        out = []
        for key, optimizer in self.optimizers.items():
            saved = child(child(0, key), "_trainable_variables")  # what Keras's `build` was given
            if saved is None:
                continue
            before, now = len(graph.nodes[saved].children), len(optimizer._trainable_variables)
            if before != now:
                name = "the run's optimizer" if key == "optimizer" else f"the stages' {key.split('_', 1)[1]}"
                out.append(f"{name} steps {now} variables, {before} in the checkpoint")
        return out

    def restore_best_weights(self) -> str | None:
        """Restores the model (weights and BN statistics) from `best/`; returns its path.
        The run state stays the controller's: the best checkpoint's is not read."""
        # A non-chief worker restarted since the best epoch has no best/ of its own
        # yet: the chief's holds the same weights (the replicas are in sync).
        path = self.best.latest_checkpoint or tf.train.latest_checkpoint(self.run_best_dir)
        if not path:
            return None
        return restore(os.path.dirname(self.run_best_dir), path, model=self.model)


def listed_checkpoints(directory: str) -> list[str]:
    """The checkpoints `directory`'s index lists, oldest first, as paths in `directory`."""
    state = tf.train.get_checkpoint_state(directory)
    # Relative entries are as the saving process named them (relative to its working
    # directory); the files are always in this directory.
    return [path if os.path.isabs(path) else os.path.join(directory, os.path.basename(path))
            for path in (state.all_model_checkpoint_paths if state else [])]


def restore_or_initialize(ckpts: Checkpoints, init: Callable[[], None]) -> tuple[RunState, str | None]:
    """A run's start: resume, or initialise (Orbit's checkpoint manager with an `init_fn`).

    Args:
      ckpts: the run's checkpoints.
      init: loads the initial weights (pretrained backbone); called only when
        `ckpt/` holds no checkpoint.

    Returns:
      (run state, path of the checkpoint resumed or None for a new run).
    """
    restored = ckpts.restore_latest()
    if restored is not None:
        return restored
    init()
    return RunState(), None


# --- loading a run (evaluate, export, predict) ---------------------------------------

def load_config(workdir: str) -> ExperimentConfig:
    """The run's resolved config (`config.json`).

    Raises:
      UserError: no run in `workdir`.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise UserError(f"--workdir={workdir!r} holds no run (no config.json)")
    with open(path) as f:
        return ExperimentConfig.from_dict(json.load(f))


def checkpoint_path(workdir: str, which: str) -> str:
    """`best` (the run's best epoch; `latest` when there is none yet), `latest`, a weight
    variant's final weights by name (`ema`: the average of a run with `--ema_decay`;
    `Checkpoints.save_variant`), or a checkpoint path.

    Raises:
      UserError: no such checkpoint.
    """
    if which not in ("best", "latest") and re.fullmatch(r"\w+", which) and not tf.io.gfile.exists(which + ".index"):
        path = tf.train.latest_checkpoint(os.path.join(workdir, which))
        if not path:
            raise UserError(f"no checkpoint in {workdir}/{which}: a weight variant's directory is written at the end "
                            "of a run with its option (ema/: --ema_decay)")
        return path
    if which in ("best", "latest"):
        for sub in (("best", "ckpt") if which == "best" else ("ckpt",)):
            path = tf.train.latest_checkpoint(os.path.join(workdir, sub))
            if path:
                return path
        raise UserError(f"no checkpoint in {workdir}/{'best or ckpt' if which == 'best' else 'ckpt'}")
    if not tf.io.gfile.exists(which + ".index"):
        raise UserError(f"--checkpoint={which!r} is not a checkpoint (no {which}.index); use best, latest, "
                        "a weight variant (ema) or a path")
    return which


def restore(workdir: str, which: str = "best", *, model=None, base=None, skip: tuple[str, ...] = ()) -> str:
    """The one way weights come out of a run's checkpoint: `which` (`latest`, `best`, `ema`
    or a path, `checkpoint_path`'s vocabulary) into `model`, or, with `skip=("head",)`,
    only its backbone into `base` (the head of another task is not read).

    Every checkpoint of a run holds `model` (the classifier), `base` (its backbone, on
    its own) and the run state; what is not asked for is left unread.

    Returns:
      The checkpoint's path.

    Raises:
      UserError: no such checkpoint, or one that does not fit.
    """
    unknown = set(skip) - {"head"}
    if unknown:
        raise ValueError(f"restore: cannot skip {sorted(unknown)}; only the head can be skipped")
    path = checkpoint_path(workdir, which)
    graph = tf.train.Checkpoint(base=base) if "head" in skip else tf.train.Checkpoint(model=model)
    try:
        graph.restore(path).expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as e:
        what = "a backbone compatible with this one (same --backbone and --alpha?)" if "head" in skip else \
            "the run's model"
        raise UserError(f"checkpoint {path} does not fit {what}: {str(e).splitlines()[0]}") from None
    return path


def run_state_of(path: str) -> RunState | None:
    """The run state a checkpoint carries (None: not one of a run's)."""
    try:
        text = tf.train.load_checkpoint(path).get_tensor("meta/.ATTRIBUTES/VARIABLE_VALUE")
    except (tf.errors.OpError, ValueError, IndexError):  # damaged files raise any of these
        return None
    try:
        return RunState.from_json(text.decode() if isinstance(text, bytes) else str(text))
    except (UserError, ValueError, TypeError):
        return None


def saved_step(path: str) -> int:
    """The run's step when `ckpt/` checkpoint `path` was saved: the sum of its optimizers'
    steps (the run's and each stage's own; a loss-scaled one counts in its inner optimizer)."""
    reader = tf.train.load_checkpoint(path)
    keys = reader.get_variable_to_shape_map()
    total = 0
    for top in sorted({k.split("/")[0] for k in keys if re.match(r"optimizer(_\w+)?/", k)}):
        inner = f"{top}/inner_optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"
        total += int(reader.get_tensor(inner if inner in keys else f"{top}/_iterations/.ATTRIBUTES/VARIABLE_VALUE"))
    return total


def load_run(workdir: str, *, checkpoint: str = "best", class_names: list[str] | None = None):
    """Rebuilds a run's classifier and restores a checkpoint into it; reads the run's
    files only (`config.json`, `results.json` or the checkpoint), never its dataset.

    Returns:
      (config, model, class names, checkpoint path).

    Raises:
      UserError: no run, no such checkpoint, or one that does not fit.
    """
    from research.model import backbones

    config = load_config(workdir)
    path = checkpoint_path(workdir, checkpoint)
    if class_names is None:
        results_path = os.path.join(workdir, "results.json")
        if os.path.exists(results_path):
            with open(results_path) as f:
                class_names = json.load(f).get("class_names")
    if class_names is None:  # an unfinished run: its checkpoint's run state names them
        state = run_state_of(path)
        class_names = (state.data.get("class_names") if state else None)
    if not class_names:
        raise UserError(f"cannot tell the class names of the run in {workdir}: no results.json, and checkpoint "
                        f"{path} carries no run state")
    from research.model import lora

    size = backbones.input_size(config.model.backbone, config.data.image_size)
    model, _ = backbones.classifier_for(config.model, image_size=size, num_classes=len(class_names),
                                        features=run_features(config, path))
    lora.enable(model, config.model.backbone, config)  # the run's LoRA factors are in its checkpoints
    restore(workdir, path, model=model)
    return config, model, class_names, path


def run_features(config: ExperimentConfig, path: str) -> str:
    """What the head of a run reads, resolved: `--features`, or, for `auto`, the blocks it
    chose, which its checkpoint `path` records (research/run/head_features.py).

    Raises:
      UserError: an `auto` run whose checkpoint records no choice.
    """
    if config.model.features != "auto":
        return config.model.features
    state = run_state_of(path)
    if not state or not state.features:
        raise UserError(f"checkpoint {path} does not record which blocks --features=auto chose")
    return state.features["resolved"]


def find_run_checkpoint(run_dir: str) -> str:
    """The checkpoint another run offers: its best one, else its latest one.

    Raises:
      UserError: when `run_dir` holds no checkpoint.
    """
    try:
        return checkpoint_path(run_dir, "best")
    except UserError:
        raise UserError(f"--weights=ckpt:{run_dir}: no checkpoint in {run_dir}/best or {run_dir}/ckpt") from None


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
        restore(run_dir, path, base=target, skip=("head",))
    except UserError as e:
        raise UserError(f"--weights=ckpt:{run_dir}: {e}") from None
    if first_blocks is not None:
        wanted = set(first_blocks)
        for layer, source in zip(base.layers, target.layers):
            if block_of[layer.name] in wanted:
                for v, src in zip(layer.weights, source.weights):
                    v.assign(src)
    return path
