"""When things happen (Orbit's Controller): stages, epochs, evaluation, early stopping,
`best/` and `ckpt/`. What one step does is research/run/loop.py; every option
(EMA, AdaBN, `auto:` unfreezing, cached features, block gradients, histograms,
the test evaluation) is an action (research/run/actions/) called at fixed points:

    run_stage:  stage_start -> per epoch [inputs, trainable_set, describe_trainable]
                -> train -> train_metrics -> evaluate (+ variants) -> epoch_end
                -> checkpoints -> ... -> best_restored -> run_end (last stage)
"""

from __future__ import annotations

import os
import sys
import time

import keras
import numpy as np
import psutil
from absl import logging

from research.config import ExperimentConfig, StageConfig
from research.early_stopping import EarlyStopping
from research.errors import Interrupted, NonFiniteLoss
from research.model import unfreeze
from research.config.stage import schedule_span
from research.model.optim import current_lr, loss_scale_value
from research.run.actions.base import Action, Context, Inputs
from research.run.cadence import itstime
from research.run.loop import add_sums, metrics_from_sums
from research.run.run_state import RunState, numbered, prefixed
from research.run.stream import TrainingStream


class Controller:
    """Runs the stages of one run from where its `RunState` is.

    Args:
      ctx: the built run (research/run/actions/base.py:Context).
      actions: the enabled options, in registration order.
      seed_vars: the dropout generator states, saved in the run state.
      preemption: a `Preemption` whose flag ends the run with a checkpoint.
    """

    def __init__(self, ctx: Context, actions: list[Action], *, seed_vars: list, preemption=None):
        self.ctx, self.actions, self.seed_vars, self.preemption = ctx, actions, seed_vars, preemption
        self.config: ExperimentConfig = ctx.config
        self.accum = self.config.train.grad_accum_steps
        self.steps_per_epoch = ctx.pipeline.steps_per_epoch // self.accum
        self.stream = TrainingStream(ctx.strategy, batches_per_epoch=self.steps_per_epoch * self.accum,
                                     accum=self.accum)
        self.images = Inputs("images", ctx.trainer, ctx.pipeline, ctx.pipeline.val_dataset)
        # `best/` holds the weights the monitor scores: a `val_NAME/` monitor scores variant NAME.
        split = self.config.train.early_stopping.monitor.split("/")[0]
        self.best_variant = split.removeprefix("val_") if split.startswith("val_") else "trained"
        self._active_key, self._active = None, None
        self.t_start, self.wall_before = time.time(), 0.0
        self.first_step_seconds: float | None = None
        self.epoch_images_per_second: float | None = None  # None: no step ran (a resume at the epoch's end)
        self.epoch_seconds: float | None = None

    def _call(self, hook: str, *args) -> list:
        return [getattr(a, hook)(self.ctx, *args) for a in self.actions]

    def save_latest(self, run: RunState) -> str:
        run.seed_states = [np.asarray(v.numpy()).tolist() for v in self.seed_vars]
        run.wall_seconds = self.wall_before + time.time() - self.t_start
        return self.ctx.ckpts.save_latest(run)

    def save_best(self, run: RunState) -> None:
        with self.ctx.weights(self.best_variant):
            self.ctx.ckpts.save_best(run)

    def _evaluate_all(self, split: str, dataset_fn, trainer=None) -> dict[str, float]:
        """`split/...` of the trained weights, and `split_NAME/...` of each variant (none
        for a `--refit` run's empty validation)."""
        if split == "val" and not self.ctx.source.num_val:
            return {}
        out = prefixed(split, self.ctx.evaluate(dataset_fn(), trainer))
        for name in self.ctx.variants:
            with self.ctx.weights(name):
                out.update(prefixed(f"{split}_{name}", self.ctx.evaluate(dataset_fn(), trainer)))
        return out

    # -- a stage ----------------------------------------------------------------------------

    def run_stage(self, run: RunState, index: int) -> None:
        """Runs stage `index` from where `run` is to its end (or early stop)."""
        stage = self.config.stages[index]
        es = self._early_stopping(stage, run.early_stopping)
        if run.stage_start_step is None:
            run.stage_start_step = self.ctx.step()
        # The schedule counts the stage's own optimizer's steps, and all of the stage's are its.
        own_steps = int(self.ctx.built.optimizer_for(stage).iterations.numpy())
        self.ctx.built.schedule.set_stage(stage, start_step=own_steps - (self.ctx.step() - run.stage_start_step),
                                          steps_per_epoch=self.steps_per_epoch, stages=self.config.stages)
        self._call("stage_start", run, stage)  # e.g. AdaBN, an auto: spec's choice: before any update
        while run.epoch < stage.epochs and not run.stage_stopped:
            inputs, selection = self._activate(run, stage)
            train_m = self._train_epoch(run, stage, inputs)
            for extra in self._call("train_metrics", run, stage, inputs):
                train_m.update(extra)
            val_m = self._evaluate_all("val", inputs.val_dataset, inputs.trainer)
            self._end_epoch(run, stage, es, train_m, val_m, selection)
        self._end_stage(run, index, stage, es)

    def _early_stopping(self, stage: StageConfig, state: dict | None) -> EarlyStopping:
        """The stage's early stopping (its patience may override the run's), resumed from `state`."""
        c = self.config.train.early_stopping
        es = EarlyStopping(c.monitor, c.mode, c.min_delta, stage.patience if stage.patience is not None else c.patience,
                           c.baseline, c.start_from_epoch, c.restore_best_weights)
        if state:
            es.load_state(state)
        return es

    def _activate(self, run: RunState, stage: StageConfig) -> tuple[Inputs, unfreeze.Selection]:
        """The trainable set of this epoch of `stage`, and the inputs that train it.

        A new set (a stage start, or the next block of a gradual stage) gets a fresh
        traced step and a `trainable.json` record; otherwise the current one goes on.
        """
        limit = 1 + run.epoch // stage.gradual_every if stage.gradual_every else None
        if (stage.name, limit) == self._active_key:
            return self._active
        self._active_key = (stage.name, limit)
        ctx, cfg_m = self.ctx, self.config.model
        spec = stage.spec
        for a in self.actions:
            spec = a.unfreeze_spec(ctx, run, stage, spec)
        selection = unfreeze.select(ctx.built.model, cfg_m.backbone, spec, train_bn=cfg_m.train_bn,
                                    lr_decay_per_block=stage.lr_decay_per_block,
                                    base_lr_ratio=stage.base_lr_ratio, limit_top=limit)
        unfreeze.apply_policy(ctx.built.model, cfg_m.backbone, selection)
        inputs = next((i for i in self._call("inputs", run, stage, selection, limit) if i is not None), self.images)
        inputs.trainer.set_trainable(selection.variables, selection.lr_multipliers,
                                     optimizer=ctx.built.optimizer_for(stage))
        self._call("trainable_set", run, stage, selection, inputs)
        label = stage.name if limit is None else f"{stage.name}/top{len(selection.blocks)}"
        record = dict(unfreeze.describe(selection, ctx.built.model, stage=stage.name, bn=cfg_m.bn), key=label,
                      from_epoch=run.epoch, features=run.features.get("resolved", "top"))
        self._call("describe_trainable", run, stage, record)
        ctx.say("\n== " + unfreeze.summary_text(record, markdown=False))
        if not any(r["key"] == label for r in run.trainable):
            run.trainable.append(record)
            ctx.write_json("trainable.json", [numbered(r) for r in run.trainable])
            step = ctx.step()
            ctx.summaries.text("train", "trainable", unfreeze.summary_text(record), step)
            ctx.summaries.images("train", "augmented_inputs", ctx.pipeline.raw_train_batch(run.global_epoch), step)
        self._active = (inputs, selection)
        return self._active

    def _train_epoch(self, run: RunState, stage: StageConfig, inputs: Inputs) -> dict:
        """Trains the rest of the current epoch; returns its training metrics."""
        ctx, t = self.ctx, self.config.train
        remaining = sum(s.epochs for s in self.config.stages[run.stage:]) - run.epoch
        iterator = self.stream.iterator(inputs.stream_source, inputs.kind, run.global_epoch, remaining,
                                        skip_steps=run.step_in_epoch)
        sums, every = dict(run.epoch_sums), t.checkpoint_every_steps
        # A live bar on a terminal; one plain line per epoch in a redirected log
        # (no ANSI codes or carriage returns in files).
        bar = keras.utils.Progbar(self.steps_per_epoch, stateful_metrics=["loss", "accuracy"],
                                  verbose=(1 if sys.stdout.isatty() else 2) if ctx.verbose else 0)
        ctx.say(f"stage {stage.name} epoch {run.epoch + 1}/{stage.epochs}")
        images = seconds = 0.0
        whole = run.step_in_epoch == 0  # not resumed part-way: its time is the epoch's
        while run.step_in_epoch < self.steps_per_epoch:
            n = min(t.steps_per_loop, self.steps_per_epoch - run.step_in_epoch)
            if every:  # stop the call at the next checkpoint step
                n = min(n, every - ctx.step() % every)
            t0 = time.perf_counter()
            loop_sums, bad = inputs.trainer.train(iterator, n)
            dt = time.perf_counter() - t0
            if self.first_step_seconds is None:
                # Everything a launch does before it trains: imports, the data check, the cache,
                # the model, the restore, the shuffle buffer's first fill.
                self.first_step_seconds = time.time() - psutil.Process().create_time()
                logging.info("first training steps done %.1fs after the process started", self.first_step_seconds)
            if bad >= 0:
                raise NonFiniteLoss(
                    f"non-finite training loss at step {ctx.step() - n + bad + 1} (stage {stage.name}, epoch "
                    f"{run.epoch + 1}); the last good checkpoint is kept in {os.path.join(ctx.workdir, 'ckpt')}; "
                    "lower the learning rate or enable --clipnorm")
            sums = add_sums(sums, loop_sums)
            run.step_in_epoch += n
            run.train_images += float(loop_sums["count"])
            run.train_seconds += dt
            run.epoch_sums = dict(sums)
            m = metrics_from_sums(sums)
            bar.update(run.step_in_epoch, [("loss", m["loss"]), ("accuracy", m["accuracy"])])
            images, seconds = images + float(loop_sums["count"]), seconds + dt
            if self.preemption is not None and self.preemption.signum:
                raise Interrupted(self.preemption.signum, self.save_latest(run))
            # The epoch's own end saves its last step.
            if itstime(ctx.step(), every) and run.step_in_epoch < self.steps_per_epoch:
                self.save_latest(run)
        # Said beside the epoch's validation line: Progbar prints every value with 4 decimals.
        self.epoch_images_per_second = images / seconds if seconds else None
        self.epoch_seconds = seconds if whole else None
        return metrics_from_sums(sums)

    def _end_epoch(self, run: RunState, stage: StageConfig, es: EarlyStopping, train_m: dict,
                   val_m: dict[str, float], selection: unfreeze.Selection) -> None:
        """Early stopping, the best record, summaries, history, checkpoints."""
        ctx, step = self.ctx, self.ctx.step()
        top5 = ctx.source.num_classes > 5
        metrics = {k: v for k, v in {**prefixed("train", train_m), **val_m}.items()
                   if top5 or not k.endswith("/top5_accuracy")}
        optimizer = ctx.built.optimizer_for(stage)
        metrics.update({"learning_rate": current_lr(optimizer), "images_per_second": run.images_per_second()})
        scale = loss_scale_value(optimizer)
        if scale is not None:
            metrics["loss_scale"] = scale

        value = metrics.get(es.monitor)
        # The run's best: early stopping's own improvement rule, against every earlier
        # epoch of every stage (for a one-stage run, exactly Keras's best weights).
        improved = (value is not None and run.epoch >= es.start_from_epoch
                    and (run.best is None or es.is_improvement(value, run.best["value"])))
        stop = es.update(run.epoch, value) and self.config.train.early_stopping.enabled
        last = run.stage == len(self.config.stages) - 1 and (stop or run.epoch + 1 == stage.epochs)

        splits = sorted({k.split("/")[0] for k in val_m})
        ctx.summaries.scalars("train", {k.removeprefix("train/"): v for k, v in metrics.items()
                                        if k.split("/")[0] not in splits}, step)
        for split in splits:
            ctx.summaries.scalars(split, {k.removeprefix(f"{split}/"): v for k, v in metrics.items()
                                          if k.startswith(f"{split}/")}, step)
        self._call("epoch_end", run, stage, metrics, selection, last)
        ctx.summaries.flush()
        # The epoch's training time (None for an epoch resumed part-way).
        run.history.append({"stage": stage.name, "epoch": run.epoch, "global_epoch": run.global_epoch,
                            "step": step, **metrics, "train_seconds": self.epoch_seconds})
        shown = (f"val/loss {metrics['val/loss']:.4f}  val/accuracy {metrics['val/accuracy']:.4f}" if val_m
                 else f"train/loss {metrics['train/loss']:.4f} (no validation)")
        rate = self.epoch_images_per_second
        ctx.say(f"  {shown}" + (f"  ({rate:.0f} img/s)" if rate is not None else ""))
        if improved:
            run.best = {"stage": stage.name, "stage_index": run.stage, "epoch": run.epoch,
                        "global_epoch": run.global_epoch, "monitor": es.monitor, "value": value,
                        **{f"{s}/{m}": metrics[f"{s}/{m}"] for s in splits for m in ("loss", "accuracy")},
                        "weights": self.best_variant,
                        "checkpoint": os.path.join("best", f"ckpt-{run.global_epoch + 1}")}
        run.next_epoch(es.state())
        self.stream.epoch_done()
        if stop:
            run.stage_stopped = True
            logging.info("early stopping in stage %s at epoch %d (best epoch %d, %s=%.5f)",
                         stage.name, run.epoch, es.best_epoch + 1, es.monitor, es.best)
            ctx.say(f"  early stopping: stage best epoch {es.best_epoch + 1} ({es.monitor}={es.best:.4f})")
        # ckpt/ first: its run state names the best checkpoint, which a kill between
        # the two saves leaves for the resumed run to write (`repair_best`).
        path = self.save_latest(run)
        if improved:
            self.save_best(run)
        if self.preemption is not None and self.preemption.signum:
            raise Interrupted(self.preemption.signum, path)

    def _end_stage(self, run: RunState, index: int, stage: StageConfig, es: EarlyStopping) -> None:
        """Restores the run's best weights if asked, records the stage, saves."""
        ctx, weights_from = self.ctx, "last epoch"
        if es.restore_best_weights and run.best is not None:
            path = ctx.ckpts.restore_best_weights()
            if path is not None:
                b = run.best
                weights_from = f"{os.path.relpath(path, ctx.workdir)} (stage {b['stage']}, epoch {b['epoch'] + 1})"
                self._call("best_restored")
        final_val = self._evaluate_all("val", ctx.pipeline.val_dataset)
        run.stages.append({
            "name": stage.name, "unfreeze": stage.unfreeze, "epochs_run": len(run.stage_history(stage.name)),
            # A stage that continues another's schedule runs at that stage's rate.
            "epochs_max": stage.epochs, "lr": schedule_span(self.config.stages, index)[0].lr,
            "optimizer": stage.optimizer_of(self.config.train.optimizer),
            "early_stopped": bool(run.stage_stopped),
            # The stage's own early-stopping state; the run's best epoch is results.json's `best`.
            "early_stopping": {"stopped_epoch": es.stopped_epoch if run.stage_stopped else None,
                               "stage_best_epoch": es.best_epoch if es.best is not None else None,
                               "stage_best_value": es.best},
            "final": final_val, "weights_from": weights_from,
        })
        run.next_stage()
        if index == len(self.config.stages) - 1:
            run.final, run.finished = dict(final_val), True
            self._call("run_end", run)
        self.save_latest(run)
