"""`train_and_evaluate(config, workdir)`: one experiment, all its stages, resumable.

The recipe reads top to bottom in `train_and_evaluate`: validate, build
(research/run/build.py), restore or initialise (research/run/checkpoints.py),
run the stages (research/run/controller.py, with the options of
research/run/actions/), write the results. Its whole state is a `RunState`
(research/run/run_state.py); `results.json` and `trainable.json` are views of it.

Workdir layout (a contract other tools rely on):
  config.json  ckpt/  best/  train/  val/  test/  trainable.json  results.json  export/
  and, with their options: ema/ and val_ema/ (--ema_decay), block_grads/ (--log_block_grads),
  cache/ (the image check's results and the disk cache)
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
from absl import logging

from research.config import ExperimentConfig
from research.config.stage import schedule_span
from research import provenance
from research.errors import UserError
from research.run import actions as actions_lib
from research.run import build as build_lib
from research.run import checkpoints, distribute, head_features, preflight
from research.run import workdir as workdir_lib
from research.model import lora as lora_lib
from research.model import optim
from research.run.actions.base import Context
from research.run.controller import Controller
from research.run.loop import Trainer
from research.run.preemption import Preemption
from research.run.run_state import RunState, count, headline
from research.run.summaries import Summaries

__all__ = ["Preemption", "train_and_evaluate"]


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
      UserError: bad config, data, spec or weights; nothing is written to the
        workdir before they are checked.
      Interrupted: a signal arrived; a checkpoint was written.
      NonFiniteLoss: the loss diverged; the last good checkpoint is kept.
      StorageError: the workdir could not be written.
    """
    config = preflight.validate(config)
    workdir = os.path.abspath(workdir)
    strategy = distribute.setup(config.train)
    replicas = strategy.num_replicas_in_sync
    if config.data.batch_size % replicas:
        raise UserError(f"--batch_size={config.data.batch_size} is the global batch and must divide evenly over the "
                        f"{replicas} replicas; use a multiple of {replicas}")
    chief = distribute.is_chief(strategy)
    changes = preflight.check(config, workdir, allow_config_change=allow_config_change, chief=chief, data=False)
    source, pipeline = build_lib.build_inputs(config, strategy, cache_dir=build_lib.cache_dir(workdir, strategy, chief),
                                              verbose=verbose)
    _check_monitor(config, source.num_classes)
    weights = build_lib.class_weights(config, source)
    if weights and verbose:
        print("class weights: " + ", ".join(f"{c} {w:.3g}" for c, w in zip(source.class_names[:10], weights))
              + (", ..." if len(weights) > 10 else ""), flush=True)
    features = head_features.resolve(config, workdir, strategy, source, pipeline,
                                     say=print if verbose else lambda text: None)
    head_features.check_specs(config, features)
    built = build_lib.build(config, source.num_classes, strategy, features=features["resolved"])
    features = head_features.describe(features, config.model.backbone, built)
    if verbose and features["resolved"] != "top":
        kept, whole = features["backbone_params"], features["whole_backbone_params"]
        print(f"features: the head reads {' + '.join(features['blocks'])}"
              + (f"; the base keeps {kept:,} of its {whole:,} parameters" if kept < whole else ""), flush=True)
    if built.lora.layers and verbose:
        print(f"LoRA: rank {lora_lib.rank_of(config)} on {len(built.lora.layers)} layer(s)"
              + (f"; skipped, Keras has no LoRA for them: {', '.join(built.lora.skipped)}"
                 if built.lora.skipped else ""), flush=True)
    t = config.train
    steps_per_epoch = pipeline.steps_per_epoch // t.grad_accum_steps
    if steps_per_epoch < 1:
        raise UserError(f"one optimizer step needs batch_size*grad_accum_steps = "
                        f"{config.data.batch_size * t.grad_accum_steps} images but the training set has "
                        f"{source.num_train}")
    for stage in config.stages:
        optim.check_steps(stage, steps_per_epoch)
    trainer = Trainer(built.model, built.optimizer, strategy=strategy, grad_accum_steps=t.grad_accum_steps,
                      jit_compile=distribute.use_xla(t.jit_compile), label_smoothing=t.label_smoothing,
                      class_weights=weights)
    actions = actions_lib.for_config(config)
    with workdir_lib.workdir_lock(workdir, enabled=chief):
        scratch = None if chief else tempfile.mkdtemp(prefix="worker_ckpt_")
        ckpts = checkpoints.Checkpoints(workdir, model=built.model, base=built.base, optimizer=built.optimizer,
                                        keep=t.checkpoint_keep, scratch_dir=scratch,
                                        stage_optimizers=built.stage_optimizers)
        ctx = Context(config=config, workdir=workdir, strategy=strategy, chief=chief, verbose=verbose,
                      source=source, pipeline=pipeline, built=built, trainer=trainer, ckpts=ckpts,
                      class_weights=weights, listeners=actions)
        for action in actions:
            action.setup(ctx)
        ctl = Controller(ctx, actions, seed_vars=build_lib.seed_variables(built.model), preemption=preemption)
        try:
            run, resumed_from = checkpoints.restore_or_initialize(
                ckpts, init=lambda: build_lib.init_weights(config, built))
            head_features.start(run, features)
            built.whole = None  # the weights are in: the dropped blocks' variables can go
            if run.finished:
                return _report_finished(ctx, run, actions, changes)
            build_lib.prepare_inputs(pipeline)
            _start(ctx, ctl, run, resumed_from, changes, allow_config_change)
            for index in range(run.stage, len(config.stages)):
                ctl.run_stage(run, index)
            return _finish(ctx, run, actions)
        finally:
            if scratch:  # a non-chief worker's scratch checkpoints go, however the run ends
                shutil.rmtree(scratch, ignore_errors=True)


def _check_monitor(config: ExperimentConfig, num_classes: int) -> None:
    """Raises UserError for a monitor the run will never compute."""
    monitor = config.train.early_stopping.monitor
    if monitor.endswith("top5_accuracy") and num_classes <= 5:
        raise UserError(f"--early_stopping_monitor={monitor} needs more than 5 classes (top-5 accuracy is "
                        f"always 1 with {num_classes}); monitor val/loss or val/accuracy")


def _start(ctx: Context, ctl: Controller, run: RunState, resumed_from: str | None, changes: list[str],
           allow_change: bool) -> None:
    """Records what the run starts from, and the config it runs with.

    Raises:
      UserError: a resumed run whose splits changed size (images added or
        removed, another `--test`), without `allow_change`.
    """
    config, src = ctx.config, ctx.source
    now = {"num_train": src.split_train, "num_val": src.num_val, "num_test": src.num_test}
    if resumed_from:
        if run.stage >= len(config.stages):
            raise UserError(f"the run in {ctx.workdir!r} has reached stage {run.stage + 1}, but the config "
                            f"has {len(config.stages)} stage(s); stages that have run cannot be removed")
        data_changes = [f"data.{k}: {run.data[k]} -> {v}" for k, v in now.items() if k in run.data and run.data[k] != v]
        if data_changes and not allow_change:
            raise UserError(f"the data of the run in {ctx.workdir!r} changed since it started: "
                            f"{'; '.join(data_changes)}; use another --workdir, or pass --allow_config_change "
                            "to resume with the new data")
        changes = changes + data_changes
    ctx.summaries = Summaries(ctx.workdir, enabled=ctx.chief, resumed_at=run.saved_at if resumed_from else None)
    # The whole plan before the first step: --head_epochs alone also adds a fine-tuning stage.
    stages, run_opt = config.stages, config.train.optimizer
    ctx.say("stages: " + "; ".join(f"{i + 1}. {s.name}: {s.describe(run_opt, schedule_span(stages, i)[0])}"
                                   for i, s in enumerate(stages)))
    if resumed_from:
        ctl.wall_before = run.wall_seconds
        for v, value in zip(ctl.seed_vars, run.seed_states):
            v.assign(np.asarray(value, dtype=v.dtype))
        stage = config.stages[run.stage]
        ctx.say(f"Resuming from {resumed_from}: stage {stage.name} ({run.stage + 1}/{len(config.stages)}), "
                f"epoch {run.epoch + 1}/{stage.epochs}, step {run.step_in_epoch}/{ctl.steps_per_epoch} of the epoch")
        if changes:
            run.config_changes.append({"global_epoch": run.global_epoch, "changed": changes})
            logging.warning("resuming with a changed config: %s", "; ".join(changes))
        _repair_best(ctx, ctl, run)
    # The whole split, as every worker counts it (a worker reading its own shards holds a share).
    run.data = {"num_train": src.split_train, "num_val": src.num_val, "num_test": src.num_test,
                "test_from": src.test_from, "class_names": src.class_names, "train_counts": src.train_counts,
                "class_weights": ctx.class_weights, "skipped_images": src.skipped, "cache": ctx.pipeline.cache}
    run.sessions.append(provenance.provenance(ctx.strategy, config.train.precision))
    ctx.write_json("config.json", config.to_dict())


def _repair_best(ctx: Context, ctl: Controller, run: RunState) -> None:
    """`ckpt/` is saved before `best/`: a run killed between the two resumes from the
    end of its best epoch, whose weights are the ones just restored, and saves them."""
    if not (ctx.chief and run.best):
        return
    if os.path.exists(os.path.join(ctx.workdir, run.best["checkpoint"] + ".index")):
        return
    if run.global_epoch == run.best["global_epoch"] + 1 and run.step_in_epoch == 0:
        ctl.save_best(run)
    else:
        logging.warning("best/ lacks %s and cannot be rebuilt from this checkpoint", run.best["checkpoint"])


def _results(ctx: Context, run: RunState, actions) -> dict:
    extra = {}
    for a in actions:
        extra.update(a.results(run))
    return run.results(ctx.config.to_dict(), extra)


def _finish(ctx: Context, run: RunState, actions) -> dict:
    """Exports the final weights and writes `results.json`."""
    if run.sessions:
        run.sessions[-1].update(ended=provenance.now(), peak_memory_mb=provenance.peak_memory_mb())
    results = _results(ctx, run, actions)
    if ctx.chief:
        if ctx.config.train.export:
            from research.serve.export import export_run
            # The final weights: the latest checkpoint (the best epoch's, with restore_best_weights).
            export_run(ctx.workdir, checkpoint="latest", class_names=ctx.source.class_names)
        ctx.write_json("results.json", results)
    ctx.summaries.flush()
    return results


def _report_finished(ctx: Context, run: RunState, actions, changes: list[str]) -> dict:
    """A finished run is not trained, exported or timed again; it says so."""
    if changes:
        raise UserError(f"the run in {ctx.workdir!r} is finished; a changed config cannot be recorded for "
                        f"it (changed: {'; '.join(changes)}). To train further, start a new run from its "
                        f"weights: --workdir=NEW --weights=ckpt:{ctx.workdir}")
    results = _results(ctx, run, actions)
    if ctx.chief and not os.path.exists(os.path.join(ctx.workdir, "results.json")):
        ctx.write_json("results.json", results)  # killed after its last checkpoint
    ctx.say(f"The run in {ctx.workdir} is finished ({count(len(run.history), 'epoch')}, {headline(run.final)}); "
            f"nothing to do. To train further, start a new run from its weights: --workdir=NEW "
            f"--weights=ckpt:{ctx.workdir}")
    return results
