"""Optimizers, learning-rate schedules with warmup, loss scaling.

One optimizer serves the whole run (see DESIGN: Keras checkpoints optimizer
slots by position), and one more for each other optimizer a stage names
(`StageConfig.optimizer`), each built once on every variable its stages train.
Stages differ in their learning-rate settings, which live in `StageSchedule`'s
variables and are set eagerly at each stage start, so the traced step reads them
and needs no retrace for a new learning rate.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from research.config import OPTIMIZERS, StageConfig, TrainConfig, UserError
from research.config.stage import schedule_span


class StageSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `peak`, then constant or cosine decay to 0, over one stage.

    The step is the stepping optimizer's own `iterations` counter; `start` is its
    value at the start of the stage (of the stage's schedule, when it continues
    another's: then it can be negative). The stage's first `hold` steps (`zero_lr_steps`) are at
    learning rate 0, and the warmup and decay run over the steps after them. Stages
    that `continue_schedule` share the schedule of the stage they continue: it spans
    the planned steps of them all, and each starts at its planned place in it.
    """

    def __init__(self):
        self.start = tf.Variable(0, dtype=tf.int64, trainable=False, name="stage_start_step")
        self.peak = tf.Variable(1e-3, dtype=tf.float32, trainable=False, name="stage_peak_lr")
        self.warmup = tf.Variable(0, dtype=tf.int64, trainable=False, name="stage_warmup_steps")
        self.total = tf.Variable(1, dtype=tf.int64, trainable=False, name="stage_total_steps")
        self.cosine = tf.Variable(False, trainable=False, name="stage_cosine")
        self.hold = tf.Variable(0, dtype=tf.int64, trainable=False, name="stage_zero_lr_steps")

    def set_stage(self, stage: StageConfig, *, start_step: int, steps_per_epoch: int,
                  stages: tuple[StageConfig, ...] = ()) -> None:
        """Sets the schedule of `stage`, which starts at optimizer step `start_step`.

        `stages`: the run's, when a stage may continue another's schedule (`stage` among them).

        Raises UserError: as `check_steps`.
        """
        group = schedule_span(stages, stages.index(stage)) if stage in stages else [stage]
        lead, planned = group[0], [s.epochs * steps_per_epoch for s in group]
        check_steps(lead, steps_per_epoch)
        self.start.assign(start_step - sum(planned[:group.index(stage)]))
        self.peak.assign(lead.lr)
        self.warmup.assign(int(round(lead.warmup_epochs * steps_per_epoch)))
        self.hold.assign(lead.zero_lr_steps)
        self.total.assign(max(1, sum(planned) - lead.zero_lr_steps))
        self.cosine.assign(lead.schedule == "cosine")

    def __call__(self, step):
        step = tf.cast(step, tf.int64) - self.start - self.hold
        return tf.where(step < 0, tf.constant(0.0), self._after_hold(step))

    def _after_hold(self, step):
        peak = self.peak
        warm = tf.cast(self.warmup, tf.float32)
        s = tf.cast(step, tf.float32)
        # Warmup reaches the peak at the end of step `warmup` (step counts from 0).
        warm_factor = tf.where(self.warmup > 0, tf.minimum(1.0, (s + 1.0) / tf.maximum(warm, 1.0)), 1.0)
        decay_span = tf.cast(tf.maximum(self.total - self.warmup, 1), tf.float32)
        progress = tf.clip_by_value((s - warm) / decay_span, 0.0, 1.0)
        cos_factor = 0.5 * (1.0 + tf.cos(math.pi * progress))
        factor = tf.where(self.cosine & (step >= self.warmup), cos_factor, 1.0)
        return peak * warm_factor * factor

    def get_config(self):
        return {}


def check_steps(stage: StageConfig, steps_per_epoch: int) -> None:
    """Raises UserError when zero-LR steps and the warmup leave the stage no step at its rate
    (known once the data gives the steps per epoch)."""
    steps, warm = stage.epochs * steps_per_epoch, int(round(stage.warmup_epochs * steps_per_epoch))
    if stage.zero_lr_steps and stage.zero_lr_steps + warm >= steps:
        raise UserError(f"stage {stage.name!r}: zero_lr_steps={stage.zero_lr_steps} and its warmup ({warm} steps) "
                        f"take all of its {steps} steps ({stage.epochs} epoch(s) of {steps_per_epoch} steps); "
                        "use fewer")


# Every name of research.config's OPTIMIZERS (which the flags are checked against before
# TensorFlow starts), with the TrainConfig fields its optimizer takes.
_OPTIMIZERS = {
    "adam": lambda lr, cfg, **kw: keras.optimizers.Adam(lr, **kw),
    "sgd": lambda lr, cfg, **kw: keras.optimizers.SGD(lr, momentum=cfg.momentum, **kw),
    "adamw": lambda lr, cfg, **kw: keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay, **kw),
}


def build_optimizer(cfg: TrainConfig, schedule, *, name: str = "",
                    loss_scale: bool = False) -> keras.optimizers.Optimizer:
    """Builds the run's optimizer, or a stage's own.

    Args:
      cfg: optimizer name, momentum, weight decay, clipping.
      schedule: a learning rate or schedule.
      name: the optimizer (empty: `cfg.optimizer`).
      loss_scale: wrap in `LossScaleOptimizer` (dynamic loss scaling, for
        mixed_float16). Clipping stays on the inner optimizer, which then sees
        unscaled gradients.
    """
    clip = {"global_clipnorm": cfg.clipnorm} if cfg.clipnorm > 0 else {}
    if cfg.ema_decay:
        # The average covers every variable the optimizer was built on (any stage's); each
        # step it moves them all, so a block frozen so far is averaged as its constant value.
        clip.update(use_ema=True, ema_momentum=cfg.ema_decay)
    name = name or cfg.optimizer
    if name not in _OPTIMIZERS:
        raise UserError(f"--optimizer={name!r} is not valid; allowed values: {', '.join(OPTIMIZERS)}")
    opt = _OPTIMIZERS[name](schedule, cfg, **clip)
    if loss_scale:
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


def current_lr(optimizer) -> float:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    lr = inner.learning_rate
    return float(lr.numpy() if hasattr(lr, "numpy") else lr)


def loss_scale_value(optimizer) -> float | None:
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return float(optimizer.dynamic_scale.numpy())
    return None
