"""`train_and_evaluate(config, workdir)`: one experiment, all its stages, resumable.

The recipe reads top to bottom in `train_and_evaluate`; `Controller` decides
*when* things happen (Orbit's Controller): per stage it resolves the trainable
set, then per epoch trains in calls of `steps_per_loop` steps (research/run/loop.py
decides *what* a step does), evaluates, writes summaries, updates early
stopping and the run's best record, and checkpoints. Its whole state is a
`RunState` (research/run/run_state.py); `results.json` and `trainable.json` are
views of it.

Workdir layout (a contract, see DESIGN.md):
  config.json  ckpt/  best/  train/  val/  trainable.json  results.json  export/
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass

import keras
import numpy as np
import psutil
import tensorflow as tf
from absl import logging

from research.model import backbones, probe, unfreeze
from research.run import checkpoints, distribute, ema
from research.data import pipeline as data, sources
from research.config import ExperimentConfig, StageConfig, UserError, config_diff, validate
from research.early_stopping import EarlyStopping
from research.run.features import FeatureCache
from research.run.loop import COUNT, Trainer, metrics_from_sums
from research.model.optim import StageSchedule, build_optimizer, current_lr, loss_scale_value
from research.run.run_state import RunState, prefixed
from research.run.summaries import Summaries

class Interrupted(Exception):
    """SIGTERM/SIGINT: a checkpoint was saved and the run can be resumed."""

    def __init__(self, signum: int, path: str):
        super().__init__(f"interrupted by {signal.Signals(signum).name}; checkpoint saved at {path}; "
                         "run the same command again to resume")
        self.signum = signum


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite."""


class Preemption:
    """Turns SIGTERM/SIGINT into a flag the loop checks between step calls, so the
    current steps finish and a checkpoint is written before exiting."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        if self.signum:  # a second signal: give up waiting
            raise KeyboardInterrupt
        self.signum = signum
        logging.warning("received %s: finishing the current steps, then saving a checkpoint",
                        signal.Signals(signum).name)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


def itstime(step: int, every: int, total: int | None = None) -> bool:
    """big_vision's cadence rule: every `every` steps (0: never), and always at `total`."""
    return every > 0 and (step % every == 0 or step == total)


# --- config changes --------------------------------------------------------------------

def _changes_on_resume(workdir: str, config: ExperimentConfig, allow: bool) -> list[str]:
    """Compares `config` with the run already in `workdir` (reads only).

    Raises:
      UserError: the config changed, without `allow`.
    """
    path = os.path.join(workdir, "config.json")
    if not (os.path.exists(path) and checkpoints.has_checkpoint(workdir)):
        return []  # nothing trained yet: the new config simply replaces the old one
    with open(path) as f:
        old = json.load(f)
    diff = config_diff(old, config.to_dict())
    # The optimizer's slots are checkpointed by position: another optimizer, or an EMA turned
    # on or off, would load one slot's values into another (or fail to load at all).
    layout = [d for d in diff if d.startswith("train.optimizer:") or (
        d.startswith("train.ema_decay:") and bool(old.get("train", {}).get("ema_decay", 0)) != bool(config.train.ema_decay))]
    if layout:
        raise UserError(f"--workdir={workdir!r}: {'; '.join(layout)} changes the optimizer's checkpointed state, "
                        "which cannot be resumed even with --allow_config_change; start a new run from its "
                        f"weights: --workdir=NEW --weights=ckpt:{workdir}")
    if diff and not allow:
        raise UserError(f"--workdir={workdir!r} holds a run with a different config; changed: {'; '.join(diff)}; "
                        "use another --workdir, or pass --allow_config_change to resume with the new config")
    return diff


# --- building ----------------------------------------------------------------------------

def build_inputs(config: ExperimentConfig, strategy, *, cache_dir: str | None = None,
                 verbose: bool = True) -> tuple[sources.Source, data.Pipeline]:
    """Loads the data (every image not checked before is checked) and builds the input
    pipeline; says what it found. Writes nothing: `Pipeline.prepare` does, later.

    Args:
      cache_dir: the disk cache and the folder check's results, unless `--cache_dir`
        names one (None: neither is kept; `disk` then falls back to `none`).

    Raises:
      UserError: missing or unreadable data, unknown classes or splits.
    """
    cfg_d = config.data
    entry = backbones.get(config.model.backbone)
    size = backbones.input_size(config.model.backbone, cfg_d.image_size)
    cache_dir = cfg_d.cache_dir or cache_dir
    source = sources.load_source(cfg_d, size, cache_dir=cache_dir, worker=distribute.worker_of(strategy))
    if source.skipped:
        logging.warning("skipped %d unreadable image(s), e.g. %s", len(source.skipped), source.skipped[0])
    mode, why = data.choose_cache(cfg_d.cache, source.num_train + source.num_val, size)
    if mode == "disk" and not cache_dir:
        mode, why = "none", why + "; no cache directory here, so none"
    if verbose:
        names = ", ".join(source.class_names[:10]) + (", ..." if source.num_classes > 10 else "")
        shard = (f" (worker {source.shard[0]} of {source.shard[1]} reads its own {source.num_train})"
                 if source.shard[1] > 1 else "")
        print(f"data: {cfg_d.dataset}: {source.num_classes} classes ({names}); {source.num_train} training{shard}, "
              f"{source.num_val} validation and {source.num_test} test images at {size}x{size} px"
              + (f"; skipped {len(source.skipped)} unreadable" if source.skipped else ""), flush=True)
        print(f"cache: {mode}" + (f" in {cache_dir}" if mode == "disk" else "")
              + (f" ({why})" if cfg_d.cache != mode or cfg_d.cache == "auto" else ""), flush=True)
        print(f"test: {source.test_from}" + ("; evaluated once, at the end of the run" if source.test else
                                             "; the run reports validation numbers only"), flush=True)
        print(f"model: {config.model.backbone} (weights {config.model.weights}); "
              f"{distribute.describe(strategy)}, {config.train.precision}", flush=True)
    pipeline = data.Pipeline(source, batch_size=cfg_d.batch_size, preprocess=entry.preprocess,
                             augment=config.augment, seed=config.train.seed, cache=mode, cache_dir=cache_dir,
                             shuffle_buffer=cfg_d.shuffle_buffer,
                             threads=data.pipeline_threads(cfg_d.threads, cached=mode != "none" or source.decoded),
                             deterministic=config.train.deterministic, sampler=cfg_d.sampler,
                             eval_crop=cfg_d.eval_crop, replicas=strategy.num_replicas_in_sync)
    return source, pipeline


def _cache_dir(workdir: str, strategy, chief: bool) -> str:
    """`WORKDIR/cache`; a non-chief worker, which writes nothing into the workdir, keeps
    its own under the system's temporary directory (the same one on every resume)."""
    if chief:
        return os.path.join(workdir, "cache")
    index, _ = distribute.worker_of(strategy)
    return os.path.join(tempfile.gettempdir(), f"research-cache-{sources.fingerprint(workdir)}-worker{index}")


def prepare_inputs(pipeline: data.Pipeline) -> None:
    """`Pipeline.prepare`, logged: the check's results and the disk cache written,
    the memory cache filled."""
    seconds = pipeline.prepare()
    if seconds > 1:
        logging.info("prepared the %s cache of %d training images in %.1fs", pipeline.cache,
                     pipeline.source.num_train, seconds)


@dataclass
class Model:
    """The run's classifier, its backbone, its one optimizer and the per-stage LR schedule."""

    model: keras.Model
    base: keras.Model
    optimizer: keras.optimizers.Optimizer
    schedule: StageSchedule
    image_size: int


def build(config: ExperimentConfig, num_classes: int, strategy: tf.distribute.Strategy) -> Model:
    """Builds the classifier (freshly initialised) and the run's one optimizer.

    The optimizer is built on the union of every stage's variables, inside the
    strategy scope (keras issue 23085), so its slot layout is the same for
    every stage and every checkpoint.

    Raises:
      UserError: an unfreeze spec that does not fit the backbone, in any stage
        (checked before anything is written or trained).
    """
    cfg_m = config.model
    size = backbones.input_size(cfg_m.backbone, config.data.image_size)
    with strategy.scope():
        base = backbones.build_base(cfg_m.backbone, image_size=size, alpha=cfg_m.alpha)
        model = backbones.build_classifier(base, num_classes, dropout=cfg_m.dropout)
        selections = [unfreeze.select(model, cfg_m.backbone, s.unfreeze, train_bn=cfg_m.train_bn)
                       for s in config.stages]
        schedule = StageSchedule()
        optimizer = build_optimizer(config.train, schedule, loss_scale=config.train.precision == "mixed_float16")
        optimizer.build(unfreeze.trainable_union(model, selections))
    return Model(model, base, optimizer, schedule, size)


def init_weights(config: ExperimentConfig, m: Model) -> None:
    """The initialisation of a new run: pretrained weights into the backbone, head skipped.

    Raises:
      UserError: weights that cannot be fetched, read or fitted.
    """
    cfg_m = config.model
    w = cfg_m.weights
    if w in ("none", ""):
        return
    if not w.startswith("ckpt:"):
        backbones.load_pretrained(m.base, cfg_m.backbone, w, image_size=m.image_size, alpha=cfg_m.alpha)
        return
    first = None
    if cfg_m.init_blocks:
        names = backbones.blocks(m.base, cfg_m.backbone)
        if cfg_m.init_blocks > len(names):
            raise UserError(f"--init_blocks={cfg_m.init_blocks} exceeds the {len(names)} blocks of "
                            f"{cfg_m.backbone}: {', '.join(names)}")
        first = names[:cfg_m.init_blocks]
    path = checkpoints.init_from_run(m.base, w[len("ckpt:"):], first_blocks=first,
                                     block_of=backbones.get(cfg_m.backbone).block_of(m.base))
    logging.info("initialised the backbone from %s%s", path, f" (blocks {first})" if first else "")


def _seed_variables(model) -> list:
    """The model's random-generator states (dropout): not part of a
    tf.train.Checkpoint, so they travel in the run state."""
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights]


# `auto:rgn:K` measures gradients on this many training batches (no update).
AUTO_RGN_BATCHES = 8


# --- the recipe ------------------------------------------------------------------------------

def train_and_evaluate(config: ExperimentConfig, workdir: str, *, allow_config_change: bool = False,
                       preemption: Preemption | None = None, verbose: bool = True) -> dict:
    """Runs (or resumes, or reports a finished) experiment.

    Args:
      config: the experiment.
      workdir: run directory; running again with the same one resumes.
      allow_config_change: resume an unfinished run with a changed config
        (recorded in `results.json` under `config_changes`).
      preemption: a `Preemption` whose flag stops the run with a checkpoint.
      verbose: print progress.

    Returns:
      The `results.json` dict.

    Raises:
      UserError: bad config, data, spec or weights (exit status 2 in
        `launch/train.py`); nothing is written to the workdir before they are checked.
      Interrupted: a signal arrived; a checkpoint was written.
      NonFiniteLoss: the loss diverged; the last good checkpoint is kept.
      checkpoints.StorageError: the workdir could not be written.
    """
    config = validate(config)
    workdir = os.path.abspath(workdir)
    strategy = distribute.setup(config.train)
    chief = distribute.is_chief(strategy)
    if chief:
        checkpoints.check_unlocked(workdir)  # fail fast, before the data is read
    changes = _changes_on_resume(workdir, config, allow_config_change)
    source, pipeline = build_inputs(config, strategy, cache_dir=_cache_dir(workdir, strategy, chief), verbose=verbose)
    _check_monitor(config, source.num_classes)
    weights = sources.class_weights(config.train.class_weight, source.class_names,
                                    source.class_counts() if config.train.class_weight == "balanced" else [])
    if weights and verbose:
        print("class weights: " + ", ".join(f"{c} {w:.3g}" for c, w in zip(source.class_names[:10], weights))
              + (", ..." if len(weights) > 10 else ""), flush=True)
    built = build(config, source.num_classes, strategy)
    with checkpoints.workdir_lock(workdir, enabled=chief):
        ctl = Controller(config, workdir, strategy, source, pipeline, built, chief=chief, verbose=verbose,
                         preemption=preemption, class_weights=weights)
        try:
            run, resumed_from = checkpoints.restore_or_initialize(ctl.ckpts, init=lambda: init_weights(config, built))
            if run.finished:
                return ctl.report_finished(run, changes)
            prepare_inputs(pipeline)
            ctl.start(run, resumed_from, changes, allow_config_change)
            for index in range(run.stage, len(config.stages)):
                ctl.run_stage(run, index)
            return ctl.finish(run)
        finally:
            ctl.close()


def _check_monitor(config: ExperimentConfig, num_classes: int) -> None:
    """Raises UserError for a monitor the run will never compute."""
    monitor = config.train.early_stopping.monitor
    if monitor.endswith("top5_accuracy") and num_classes <= 5:
        raise UserError(f"--early_stopping_monitor={monitor} needs more than 5 classes (top-5 accuracy is "
                        f"always 1 with {num_classes}); monitor val/loss or val/accuracy")


class Controller:
    """When things happen: epochs, evaluation, summaries, early stopping, checkpoints."""

    def __init__(self, config: ExperimentConfig, workdir: str, strategy, source: sources.Source,
                 pipeline: data.Pipeline, built: Model, *, chief: bool, verbose: bool,
                 preemption: Preemption | None, class_weights: list[float] | None = None):
        self.config, self.workdir, self.strategy = config, workdir, strategy
        self.source, self.pipeline, self.m = source, pipeline, built
        self.chief, self.verbose, self.preemption = chief, verbose, preemption
        t = config.train
        self.accum = t.grad_accum_steps
        self.steps_per_epoch = pipeline.steps_per_epoch // self.accum
        if self.steps_per_epoch < 1:
            raise UserError(f"one optimizer step needs batch_size*grad_accum_steps = "
                            f"{config.data.batch_size * self.accum} images but the training set has {source.num_train}")
        self.jit = distribute.use_xla(t.jit_compile)
        self.ema = t.ema_decay > 0
        self.best_is_ema = t.early_stopping.monitor.startswith("val_ema/")
        self.trainer = Trainer(built.model, built.optimizer, strategy=strategy, grad_accum_steps=self.accum,
                               jit_compile=self.jit, label_smoothing=t.label_smoothing,
                               class_weights=class_weights)
        self.class_weights = class_weights
        self.scratch = None if chief else tempfile.mkdtemp(prefix="worker_ckpt_")
        self.ckpts = checkpoints.Checkpoints(workdir, model=built.model, base=built.base, optimizer=built.optimizer,
                                             keep=t.checkpoint_keep, scratch_dir=self.scratch)
        self.summaries: Summaries | None = None  # opened by `start`: nothing is written before the init succeeds
        self.seed_vars = _seed_variables(built.model)
        self.stream = TrainingStream(strategy, batches_per_epoch=self.steps_per_epoch * self.accum, accum=self.accum)
        self._features: FeatureCache | None = None
        self._head_trainer: Trainer | None = None
        self._active_key = None
        # --log_block_grads: the variables a run could train, by block, and their values at the stage start.
        self._blocks = (probe.block_variables(built.model, config.model.backbone, train_bn=config.model.train_bn)
                        if t.log_block_grads else {})
        self._block_start: dict[str, list[np.ndarray]] = {}
        self.t_start = time.time()
        self.wall_before = 0.0
        self.first_step_seconds: float | None = None

    # -- small helpers ------------------------------------------------------------------

    def say(self, text: str) -> None:
        if self.verbose:
            print(text, flush=True)

    def step(self) -> int:
        return int(self.m.optimizer.iterations.numpy())

    def save_latest(self, run: RunState) -> str:
        run.seed_states = [np.asarray(v.numpy()).tolist() for v in self.seed_vars]
        run.wall_seconds = self.wall_before + time.time() - self.t_start
        return self.ckpts.save_latest(run)

    def _write_json(self, name: str, obj) -> None:
        if self.chief:
            checkpoints.atomic_write_json(os.path.join(self.workdir, name), obj)

    def _evaluate_images(self) -> dict:
        return self.trainer.evaluate(self.strategy.experimental_distribute_dataset(self.pipeline.val_dataset()))

    # -- start and end of the run ---------------------------------------------------------

    def start(self, run: RunState, resumed_from: str | None, changes: list[str], allow_change: bool) -> None:
        """Records what the run starts from, and the config it runs with.

        Raises:
          UserError: a resumed run whose splits changed size (images added or
            removed, another `--test`), without `allow_change`.
        """
        if resumed_from:
            if run.stage >= len(self.config.stages):
                raise UserError(f"the run in {self.workdir!r} has reached stage {run.stage + 1}, but the config "
                                f"has {len(self.config.stages)} stage(s); stages that have run cannot be removed")
            data_changes = self._data_changes(run)
            if data_changes and not allow_change:
                raise UserError(f"the data of the run in {self.workdir!r} changed since it started: "
                                f"{'; '.join(data_changes)}; use another --workdir, or pass --allow_config_change "
                                "to resume with the new data")
            changes = changes + data_changes
        self.summaries = Summaries(self.workdir, enabled=self.chief)
        if resumed_from:
            for v, value in zip(self.seed_vars, run.seed_states):
                v.assign(np.asarray(value, dtype=v.dtype))
            self.wall_before = run.wall_seconds
            stage = self.config.stages[run.stage]
            self.say(f"Resuming from {resumed_from}: stage {stage.name} ({run.stage + 1}/{len(self.config.stages)}), "
                     f"epoch {run.epoch + 1}/{stage.epochs}, step {run.step_in_epoch}/{self.steps_per_epoch} "
                     "of the epoch")
            if changes:
                run.config_changes.append({"global_epoch": run.global_epoch, "changed": changes})
                logging.warning("resuming with a changed config: %s", "; ".join(changes))
            self._repair_best(run)
        src = self.source
        # The whole split, as every worker counts it (a worker reading its own shards holds a share).
        run.data = {"num_train": src.split_train, "num_val": src.num_val, "num_test": src.num_test,
                    "test_from": src.test_from, "class_names": src.class_names, "train_counts": src.train_counts,
                    "class_weights": self.class_weights, "skipped_images": src.skipped, "cache": self.pipeline.cache}
        self._write_json("config.json", self.config.to_dict())

    def _save_best(self, run: RunState) -> None:
        """`best/` holds the weights the monitor scored: the average with a `val_ema/` monitor."""
        if self.best_is_ema:
            with ema.swapped_in(self.m.optimizer):
                self.ckpts.save_best(run)
        else:
            self.ckpts.save_best(run)

    def _data_changes(self, run: RunState) -> list[str]:
        src = self.source
        now = {"num_train": src.split_train, "num_val": src.num_val, "num_test": src.num_test}
        return [f"data.{k}: {run.data[k]} -> {v}" for k, v in now.items() if k in run.data and run.data[k] != v]

    def _repair_best(self, run: RunState) -> None:
        """`ckpt/` is saved before `best/`: a run killed between the two resumes from the
        end of its best epoch, whose weights are the ones just restored, and saves them."""
        if not (self.chief and run.best):
            return
        if os.path.exists(os.path.join(self.workdir, run.best["checkpoint"] + ".index")):
            return
        if run.global_epoch == run.best["global_epoch"] + 1 and run.step_in_epoch == 0:
            self._save_best(run)
        else:
            logging.warning("best/ lacks %s and cannot be rebuilt from this checkpoint", run.best["checkpoint"])

    def close(self) -> None:
        """A non-chief worker's scratch checkpoints go, however the run ends."""
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def finish(self, run: RunState) -> dict:
        """Exports the final weights and writes `results.json`."""
        results = run.results(self.config.to_dict())
        if self.chief:
            if self.config.train.export:
                from research.serve.export import export_run
                # The final weights: the latest checkpoint (the best epoch's, with restore_best_weights).
                export_run(self.workdir, checkpoint="latest", class_names=self.source.class_names)
            self._write_json("results.json", results)
        self.summaries.flush()
        return results

    def report_finished(self, run: RunState, changes: list[str]) -> dict:
        """A finished run is not trained, exported or timed again; it says so."""
        if changes:
            raise UserError(f"the run in {self.workdir!r} is finished; a changed config cannot be recorded for "
                            f"it (changed: {'; '.join(changes)}). To train further, start a new run from its "
                            f"weights: --workdir=NEW --weights=ckpt:{self.workdir}")
        results = run.results(self.config.to_dict())
        if self.chief and not os.path.exists(os.path.join(self.workdir, "results.json")):
            self._write_json("results.json", results)  # killed after its last checkpoint
        self.say(f"The run in {self.workdir} is finished ({len(run.history)} epochs, {_headline(run.final)}); "
                 f"nothing to do. To train further, start a new run from its weights: --workdir=NEW "
                 f"--weights=ckpt:{self.workdir}")
        return results

    # -- a stage ----------------------------------------------------------------------------

    def run_stage(self, run: RunState, index: int) -> None:
        """Runs stage `index` from where `run` is to its end (or early stop)."""
        stage = self.config.stages[index]
        es = self._early_stopping(stage, run.early_stopping)
        if run.stage_start_step is None:
            run.stage_start_step = self.step()
        self.m.schedule.set_stage(stage, start_step=run.stage_start_step, steps_per_epoch=self.steps_per_epoch)
        if self.config.model.bn == "adapt" and run.epoch == 0 and run.step_in_epoch == 0:
            self._adapt_bn(run, stage)
        self._spec(run, stage)  # an auto: spec measures and chooses now, before any update
        while run.epoch < stage.epochs and not run.stage_stopped:
            trainer, kind, selection = self._activate(run, stage)
            train_m = self._train_epoch(run, stage, trainer, kind)
            if self._blocks and kind == "images":
                train_m.update(self._block_grad_metrics(trainer))
            val_ds = self._features.val_dataset() if kind == "features" else self.pipeline.val_dataset()
            val_m = {"val": trainer.evaluate(self.strategy.experimental_distribute_dataset(val_ds))}
            if self.ema:
                with ema.swapped_in(self.m.optimizer):
                    val_m["val_ema"] = trainer.evaluate(self.strategy.experimental_distribute_dataset(val_ds))
            self._end_epoch(run, stage, es, train_m, val_m, selection)
        self._end_stage(run, index, stage, es)

    def _adapt_bn(self, run: RunState, stage: StageConfig) -> None:
        """`--bn=adapt`: BN statistics re-estimated on the training images (no augmentation)
        before the stage trains. A run killed before the stage's first checkpoint does
        it again on resume, from the same weights: the same statistics."""
        from research.model import bn_adapt
        t0 = time.perf_counter()
        n = bn_adapt.adapt(self.m.base, self.pipeline.train_dataset(run.global_epoch, augment=False))
        self._features = None  # cached base features were computed with the old statistics
        self._active_key = None
        self.say(f"stage {stage.name}: BatchNorm statistics re-estimated on {n} training images "
                 f"({time.perf_counter() - t0:.1f}s)")
        run.bn_adapted.append({"stage": stage.name, "images": n})

    def _spec(self, run: RunState, stage: StageConfig) -> str:
        """The stage's unfreeze spec; an `auto:` one resolved to `blocks:...` at the stage's
        start and recorded, so a resumed stage trains the same blocks without measuring."""
        auto = unfreeze.parse_auto(stage.unfreeze)
        if auto is None:
            return stage.unfreeze
        record = next((r for r in run.auto_unfreeze if r["stage"] == stage.name and r["spec"] == stage.unfreeze),
                      None)
        if record is None:
            record = self._choose_blocks(run, stage, *auto)
            run.auto_unfreeze.append(record)
        return record["resolved"]

    def _choose_blocks(self, run: RunState, stage: StageConfig, method: str, k: int) -> dict:
        """Scores every block on the training data (validation too, for probes) with the
        weights the stage starts from, and picks K (research/model/probe.py). Test is never read."""
        t0 = time.perf_counter()
        backbone = self.config.model.backbone
        names = backbones.blocks(self.m.base, backbone)
        if method == "rgn":
            batches = self.pipeline.train_dataset(run.global_epoch, augment=False).take(AUTO_RGN_BATCHES)
            scores = probe.relative_gradient_norms(self.m.model, backbone, batches,
                                                   train_bn=self.config.model.train_bn)
            blocks = probe.choose_by_rgn(scores, names, k)
        else:
            feats, labels = probe.split_features(probe.tap_model(self.m.base, backbone), {
                "train": (self.pipeline.cached_train, self.pipeline.train_preprocess, self.source.num_train),
                "val": (self.pipeline.cached_val, self.pipeline.eval_preprocess, self.source.num_val)})
            rows = probe.probe_curve(feats, labels, names, log=lambda text: None)
            scores = {r["block"]: r["val_accuracy"] for r in rows}
            blocks = probe.choose_by_probe(rows, names, k)
        seconds = time.perf_counter() - t0
        self.say(f"stage {stage.name}: {stage.unfreeze} chose {', '.join(blocks)} by {method} "
                 f"({', '.join(f'{b} {s:.3g}' for b, s in scores.items())}; {seconds:.1f}s)")
        return {"stage": stage.name, "spec": stage.unfreeze, "method": method, "k": k, "scores": scores,
                "blocks": blocks, "resolved": "blocks:" + ",".join(blocks), "seconds": seconds}

    def _early_stopping(self, stage: StageConfig, state: dict | None) -> EarlyStopping:
        """The stage's early stopping (its patience may override the run's), resumed from `state`."""
        c = self.config.train.early_stopping
        es = EarlyStopping(c.monitor, c.mode, c.min_delta, stage.patience if stage.patience is not None else c.patience,
                           c.baseline, c.start_from_epoch, c.restore_best_weights)
        if state:
            es.load_state(state)
        return es

    def _activate(self, run: RunState, stage: StageConfig):
        """The trainable set of this epoch of `stage`, and the trainer and input kind that train it.

        A new set (a stage start, or the next block of a gradual stage) gets a
        fresh traced step and a `trainable.json` record; otherwise the current
        one goes on.
        """
        limit = 1 + run.epoch // stage.gradual_every if stage.gradual_every else None
        key = (stage.name, limit)
        if key == self._active_key:
            return self._active
        self._active_key = key
        cfg_m = self.config.model
        selection = unfreeze.select(self.m.model, cfg_m.backbone, self._spec(run, stage), train_bn=cfg_m.train_bn,
                                    lr_decay_per_block=stage.lr_decay_per_block, limit_top=limit)
        unfreeze.apply_policy(self.m.model, cfg_m.backbone, selection)
        head_only = len(selection.variables) == len(unfreeze.head_variables(self.m.model))
        aug = self.config.augment
        # Features are extracted from this worker's images only when it reads its own shards,
        # and FeatureCache streams them as if every worker had every image.
        use_cache = (self.config.train.cache_features and head_only and not (aug.enabled or aug.mixes)
                     and not self.pipeline.sharded)
        if self.config.train.cache_features and not use_cache and run.epoch == 0 and limit in (None, 1):
            logging.warning("stage %s: --cache_features applies to head-only stages without augmentation, on "
                            "data not sharded by worker; training through the base", stage.name)
        trainer = self._feature_trainer() if use_cache else self.trainer
        if self._blocks and not use_cache:
            block_of = {v.path: i for i, vs in enumerate(self._blocks.values()) for v in vs}
            trainer.set_trainable(selection.variables, selection.lr_multipliers, block_of=block_of,
                                  num_blocks=len(self._blocks))
            self._block_start = self._stage_start_weights(run, stage)
        else:
            trainer.set_trainable(selection.variables, selection.lr_multipliers)
        label = stage.name if limit is None else f"{stage.name}/top{len(selection.blocks)}"
        record = dict(unfreeze.describe(selection, self.m.model, stage=stage.name), key=label, from_epoch=run.epoch)
        auto = next((r for r in run.auto_unfreeze if r["stage"] == stage.name and r["spec"] == stage.unfreeze), None)
        if auto is not None:  # why these blocks: the scores and the choice
            record["auto"] = {k: auto[k] for k in ("spec", "method", "k", "scores", "seconds")}
        self.say("\n== " + unfreeze.summary_text(record, markdown=False))
        if not any(r["key"] == label for r in run.trainable):
            run.trainable.append(record)
            self._write_json("trainable.json", run.trainable)
            step = self.step()
            self.summaries.text("train", "trainable", unfreeze.summary_text(record), step)
            self.summaries.images("train", "augmented_inputs", self.pipeline.raw_train_batch(run.global_epoch), step)
        self._active = (trainer, "features" if use_cache else "images", selection)
        return self._active

    def _stage_start_weights(self, run: RunState, stage: StageConfig) -> dict[str, list[np.ndarray]]:
        """`--log_block_grads`: every block's weights when the stage began, kept in
        `block_grads/STAGE.npz` with the stage's start step, so that a resumed stage
        measures change from the same point. A file of another start (a run begun
        again without a checkpoint), or of other variables, is replaced."""
        path = os.path.join(self.workdir, "block_grads", f"{stage.name}.npz")
        keys = {f"{b}/{i}": tuple(v.shape) for b, vs in self._blocks.items() for i, v in enumerate(vs)}
        if os.path.exists(path):
            with np.load(path) as f:
                if (int(f["stage_start_step"]) == run.stage_start_step
                        and {k: f[k].shape for k in f.files if k != "stage_start_step"} == keys):
                    return {b: [f[f"{b}/{i}"] for i in range(len(vs))] for b, vs in self._blocks.items()}
        start = {b: [np.array(v.numpy()) for v in vs] for b, vs in self._blocks.items()}
        if self.chief:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = path + ".tmp.npz"
            np.savez(tmp, stage_start_step=run.stage_start_step,
                     **{f"{b}/{i}": w for b, ws in start.items() for i, w in enumerate(ws)})
            os.replace(tmp, path)
        return start

    def _block_grad_metrics(self, trainer: Trainer) -> dict[str, float]:
        """The epoch's per-block RGN and relative weight change (`--log_block_grads`)."""
        sq, steps = trainer.take_block_sums()
        if not steps:
            return {}
        out = {}
        for i, (b, vs) in enumerate(self._blocks.items()):
            now = [v.numpy() for v in vs]
            norm = float(np.sqrt(sum(np.sum(np.square(w, dtype=np.float64)) for w in now)))
            start = self._block_start[b]
            moved = float(np.sqrt(sum(np.sum(np.square(w - w0, dtype=np.float64)) for w, w0 in zip(now, start))))
            start_norm = float(np.sqrt(sum(np.sum(np.square(w0, dtype=np.float64)) for w0 in start)))
            out[f"block_rgn/{b}"] = float(np.sqrt(sq[i] / steps)) / max(norm, 1e-12)
            out[f"block_change/{b}"] = moved / max(start_norm, 1e-12)
        return out

    def _feature_trainer(self) -> Trainer:
        if self._features is None:
            self._features = FeatureCache(self.m.model, self.pipeline)
            self._head_trainer = Trainer(self._features.head, self.m.optimizer, strategy=self.strategy,
                                         grad_accum_steps=self.accum, jit_compile=self.jit,
                                         label_smoothing=self.config.train.label_smoothing,
                                         class_weights=self.class_weights)
            self.say(f"cached base features of {len(self._features.train_y)} training and "
                     f"{len(self._features.val_y)} validation images in {self._features.seconds:.1f}s")
        return self._head_trainer

    def _train_epoch(self, run: RunState, stage: StageConfig, trainer: Trainer, kind: str) -> dict:
        """Trains the rest of the current epoch; returns its training metrics."""
        remaining = sum(s.epochs for s in self.config.stages[run.stage:]) - run.epoch
        iterator = self.stream.iterator(self._features if kind == "features" else self.pipeline, kind,
                                        run.global_epoch, remaining, skip_steps=run.step_in_epoch)
        sums = np.asarray(run.epoch_sums, dtype=np.float64)
        every = self.config.train.checkpoint_every_steps
        # A live bar on a terminal; one plain line per epoch in a redirected log
        # (no ANSI codes or carriage returns in files).
        bar = keras.utils.Progbar(self.steps_per_epoch, stateful_metrics=["loss", "accuracy", "img/s"],
                                  verbose=(1 if sys.stdout.isatty() else 2) if self.verbose else 0)
        self.say(f"stage {stage.name} epoch {run.epoch + 1}/{stage.epochs}")
        while run.step_in_epoch < self.steps_per_epoch:
            n = min(self.config.train.steps_per_loop, self.steps_per_epoch - run.step_in_epoch)
            if every:  # stop the call at the next checkpoint step
                n = min(n, every - self.step() % every)
            t0 = time.perf_counter()
            loop_sums, bad = trainer.train(iterator, n)
            dt = time.perf_counter() - t0
            if self.first_step_seconds is None:
                # Everything a launch does before it trains: imports, the data check, the cache,
                # the model, the restore, the shuffle buffer's first fill.
                self.first_step_seconds = time.time() - psutil.Process().create_time()
                logging.info("first training steps done %.1fs after the process started", self.first_step_seconds)
            if bad >= 0:
                raise NonFiniteLoss(
                    f"non-finite training loss at step {self.step() - n + bad + 1} (stage {stage.name}, epoch "
                    f"{run.epoch + 1}); the last good checkpoint is kept in {os.path.join(self.workdir, 'ckpt')}; "
                    "lower the learning rate or enable --clipnorm")
            sums += loop_sums
            run.step_in_epoch += n
            run.train_images += float(loop_sums[COUNT])
            run.train_seconds += dt
            run.epoch_sums = sums.tolist()
            m = metrics_from_sums(sums)
            bar.update(run.step_in_epoch, [("loss", m["loss"]), ("accuracy", m["accuracy"]),
                                           ("img/s", loop_sums[COUNT] / max(dt, 1e-9))])
            if self.preemption is not None and self.preemption.signum:
                raise Interrupted(self.preemption.signum, self.save_latest(run))
            # The epoch's own end saves its last step.
            if itstime(self.step(), every) and run.step_in_epoch < self.steps_per_epoch:
                self.save_latest(run)
        return metrics_from_sums(sums)

    def _end_epoch(self, run: RunState, stage: StageConfig, es: EarlyStopping, train_m: dict,
                   val_m: dict[str, dict], selection: unfreeze.Selection) -> None:
        """Early stopping, the best record, summaries, history, checkpoints.

        `val_m` holds the validation metrics of the trained weights (`val`) and,
        with `--ema_decay`, of their average (`val_ema`).
        """
        t = self.config.train
        step = self.step()
        top5 = self.source.num_classes > 5
        metrics = {**prefixed("train", {k: v for k, v in train_m.items() if top5 or k != "top5_accuracy"})}
        for split, m in val_m.items():
            metrics.update(prefixed(split, {k: v for k, v in m.items() if top5 or k != "top5_accuracy"}))
        metrics.update({"learning_rate": current_lr(self.m.optimizer), "images_per_second": run.images_per_second()})
        scale = loss_scale_value(self.m.optimizer)
        if scale is not None:
            metrics["loss_scale"] = scale

        value = metrics.get(es.monitor)
        # The run's best: early stopping's own improvement rule, against every earlier
        # epoch of every stage (for a one-stage run, exactly Keras's best weights).
        improved = (value is not None and run.epoch >= es.start_from_epoch
                    and (run.best is None or es.is_improvement(value, run.best["value"])))
        stop = es.update(run.epoch, value) and t.early_stopping.enabled
        last = run.stage == len(self.config.stages) - 1 and (stop or run.epoch + 1 == stage.epochs)

        self.summaries.scalars("train", {k.removeprefix("train/"): v for k, v in metrics.items()
                                         if not k.startswith(("val/", "val_ema/"))}, step)
        for split in val_m:
            self.summaries.scalars(split, {k.removeprefix(f"{split}/"): v for k, v in metrics.items()
                                           if k.startswith(f"{split}/")}, step)
        epoch_number = run.global_epoch + 1
        if itstime(epoch_number, t.histogram_every_epochs, epoch_number if last else None):
            self.summaries.histograms("train", selection.variables, step)
        self.summaries.flush()
        run.history.append({"stage": stage.name, "epoch": run.epoch, "global_epoch": run.global_epoch,
                            "step": step, **metrics})
        self.say(f"  val/loss {metrics['val/loss']:.4f}  val/accuracy {metrics['val/accuracy']:.4f}")

        if improved:
            run.best = {"stage": stage.name, "stage_index": run.stage, "epoch": run.epoch,
                        "global_epoch": run.global_epoch, "monitor": es.monitor, "value": value,
                        **{f"{s}/{m}": metrics[f"{s}/{m}"] for s in val_m for m in ("loss", "accuracy")},
                        "weights": "ema" if self.best_is_ema else "trained",
                        "checkpoint": os.path.join("best", f"ckpt-{run.global_epoch + 1}")}
        run.next_epoch(es.state())
        self.stream.epoch_done()
        if stop:
            run.stage_stopped = True
            logging.info("early stopping in stage %s at epoch %d (best epoch %d, %s=%.5f)",
                         stage.name, run.epoch, es.best_epoch + 1, es.monitor, es.best)
            self.say(f"  early stopping: stage best epoch {es.best_epoch + 1} ({es.monitor}={es.best:.4f})")
        # ckpt/ first: its run state names the best checkpoint, which a kill between
        # the two saves leaves for the resumed run to write (`_repair_best`).
        path = self.save_latest(run)
        if improved:
            self._save_best(run)
        if self.preemption is not None and self.preemption.signum:
            raise Interrupted(self.preemption.signum, path)

    def _end_stage(self, run: RunState, index: int, stage: StageConfig, es: EarlyStopping) -> None:
        """Restores the run's best weights if asked, records the stage, saves."""
        weights_from = "last epoch"
        if es.restore_best_weights and run.best is not None:
            path = self.ckpts.restore_best_weights()
            if path is not None:
                b = run.best
                weights_from = f"{os.path.relpath(path, self.workdir)} (stage {b['stage']}, epoch {b['epoch'] + 1})"
                # The average restarts from the restored weights: it would otherwise keep the
                # epochs that were just discarded.
                ema.reset_to_weights(self.m.optimizer)
        final_val = prefixed("val", self._evaluate_images())
        if self.ema:
            with ema.swapped_in(self.m.optimizer):
                final_val.update(prefixed("val_ema", self._evaluate_images()))
        history = run.stage_history(stage.name)
        run.stages.append({
            "name": stage.name, "unfreeze": stage.unfreeze, "epochs_run": len(history),
            "epochs_max": stage.epochs, "lr": stage.lr, "early_stopped": bool(run.stage_stopped),
            # The stage's own early-stopping state; the run's best epoch is results.json's `best`.
            "early_stopping": {"stopped_epoch": es.stopped_epoch if run.stage_stopped else None,
                               "stage_best_epoch": es.best_epoch if es.best is not None else None,
                               "stage_best_value": es.best},
            "final": final_val, "weights_from": weights_from,
        })
        run.next_stage()
        if index == len(self.config.stages) - 1:
            run.final, run.finished = dict(final_val), True
            self._evaluate_test(run)
            if self.ema:
                # Before the checkpoint that marks the run finished: a kill in between
                # repeats this stage end, and ema/ is written again from the same averages.
                with ema.swapped_in(self.m.optimizer):
                    self.ckpts.save_ema(run)
        self.save_latest(run)

    def _evaluate_test(self, run: RunState) -> None:
        """Scores the final weights, and the run's best weights if they differ, on test.

        Runs once, after the last epoch, so no decision of the run can depend on
        it; the last checkpoint, which marks the run finished, carries the scores
        (a kill before it repeats only the stage end).
        """
        ds = self.pipeline.test_dataset()
        if ds is None:
            return
        def score() -> dict:
            return self.trainer.evaluate(self.strategy.experimental_distribute_dataset(ds))

        final = prefixed("test", score())
        if self.ema:
            with ema.swapped_in(self.m.optimizer):
                final.update(prefixed("test_ema", score()))
        run.final.update(final)
        best = run.best
        if best is not None:
            restored = run.stages[-1]["weights_from"] != "last epoch"
            if restored or (best["global_epoch"] == run.global_epoch - 1 and not self.best_is_ema):
                best.update({k: v for k, v in final.items() if k.startswith("test/")})  # the same weights
            else:
                kept = self.m.model.get_weights()
                if self.ckpts.restore_best_weights() is None:
                    logging.warning("best/ holds no checkpoint; its weights are not scored on test")
                else:
                    best.update(prefixed("test", score()))
                self.m.model.set_weights(kept)
        for split in ("test", "test_ema"):
            scalars = {k.removeprefix(f"{split}/"): v for k, v in final.items() if k.startswith(f"{split}/")}
            if scalars:  # no empty test_ema/ run without --ema_decay
                self.summaries.scalars(split, scalars, self.step())
        self.say(f"  test (final weights): {_headline(final)}"
                 + (f"; best epoch's: {_headline(best)}" if best and "test/accuracy" in best else ""))


def _headline(metrics: dict | None) -> str:
    """`test/accuracy 0.91, val/accuracy 0.93`: the accuracies a record has."""
    items = [(k, v) for k, v in (metrics or {}).items() if k.endswith("/accuracy") and k.count("/") == 1]
    items.sort(key=lambda kv: not kv[0].startswith("test/"))
    return ", ".join(f"{k} {v:.4f}" for k, v in items) or "no metrics"


class TrainingStream:
    """One training iterator across epochs and stages.

    The next epoch's batches are prepared while this one trains; the iterator is
    rebuilt only when it would not deliver the wanted epoch next: at start, on
    resume, and when switching to or from cached features.
    """

    def __init__(self, strategy, *, batches_per_epoch: int, accum: int):
        self.strategy = strategy
        self.batches_per_epoch = batches_per_epoch
        self.accum = accum
        self._at = None  # (kind, global epoch the iterator delivers next)
        self._iterator = None

    def iterator(self, source, kind: str, global_epoch: int, num_epochs: int, *, skip_steps: int):
        """The iterator that delivers `global_epoch` next (`skip_steps` into it when rebuilt)."""
        if self._at != (kind, global_epoch):
            self._iterator = iter(source.distribute(self.strategy, lambda: source.train_stream(
                global_epoch, num_epochs, batches_per_epoch=self.batches_per_epoch, skip=skip_steps * self.accum)))
            self._at = (kind, global_epoch)
        return self._iterator

    def epoch_done(self) -> None:
        if self._at is not None:
            self._at = (self._at[0], self._at[1] + 1)
