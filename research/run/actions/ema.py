"""The exponential moving average of the weights (`--ema_decay`): Keras's own.

The optimizer keeps the average (`use_ema=True`, one slot per variable it was
built on, saved in every checkpoint with the other slots), so resume is exact
and MirroredStrategy averages the same synchronised weights on every replica.
What Keras leaves to `model.fit` callbacks (`keras.callbacks.SwapEMAWeights`)
this action does: swap the averages in to score or save them, and back.
"""

from __future__ import annotations

import contextlib

import numpy as np

from research.config.specs import check
from research.run.actions.base import Action, Context


def pairs(optimizer) -> list:
    """(variable, its average) for every variable the optimizer averages; [] without EMA."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if not getattr(inner, "use_ema", False):
        return []
    # Keras 3.15 keeps them aligned in these two lists (BaseOptimizer.build); its own
    # SwapEMAWeights callback reads the averages the same way.
    return list(zip(inner._trainable_variables, inner._model_variables_moving_average))


def reset_to_weights(optimizer) -> None:
    """Sets every average to its variable's current value (after `restore_best_weights`)."""
    for v, average in pairs(optimizer):
        average.assign(v)


@contextlib.contextmanager
def swapped_in(optimizer):
    """The averaged weights in the model for the duration of the block, the trained ones after."""
    ps = pairs(optimizer)
    trained = [np.array(v.numpy()) for v, _ in ps]
    for v, average in ps:
        v.assign(average)
    try:
        yield
    finally:
        for (v, _), value in zip(ps, trained):
            v.assign(value)


class Ema(Action):
    """`--ema_decay`: the averaged weights are a variant the run scores (`val_ema/`,
    `test_ema/`), can monitor for `best/`, and saves in `ema/` at the end."""

    name = "ema"
    variants = ("ema",)

    @classmethod
    def enabled(cls, config) -> bool:
        return config.train.ema_decay > 0

    @classmethod
    def check(cls, config) -> None:
        decay = config.train.ema_decay
        check(0.0 <= decay < 1.0, f"--ema_decay={decay} must be in [0, 1) (0: off); 0.999 is common")
        monitor = config.train.early_stopping.monitor
        check(decay or not monitor.startswith("val_ema/"),
              f"--early_stopping_monitor={monitor} needs --ema_decay (the averaged weights it scores)")
        scaled = [k for s in config.stages for k in s.rescaled_updates]
        check(not (decay and scaled), f"--ema_decay with {scaled[0] if scaled else ''} is not supported: the "
              "average would miss the per-variable rescaling of the updates")
        own = [s.name for s in config.stages if s.optimizer_of(config.train.optimizer) != config.train.optimizer]
        check(not (decay and own), f"--ema_decay with an optimizer of its own in stage {own[0] if own else ''!r} "
              "is not supported: the average lives in the run's optimizer, which that stage does not step")

    @classmethod
    def resume_conflict(cls, old: dict, config) -> str | None:
        # The optimizer keeps the average as one slot per variable, checkpointed by
        # position: turned on or off, one slot's values would load into another.
        was = float(old["train"].get("ema_decay", 0.0))
        if bool(was) != cls.enabled(config):
            return f"train.ema_decay: {was!r} -> {config.train.ema_decay!r} (the average turned {'off' if was else 'on'})"
        return None

    def setup(self, ctx: Context) -> None:
        ctx.variants["ema"] = lambda: swapped_in(ctx.built.optimizer)

    def best_restored(self, ctx: Context) -> None:
        # The average restarts from the restored weights: it would otherwise keep the
        # epochs that were just discarded.
        reset_to_weights(ctx.built.optimizer)

    def run_end(self, ctx: Context, run) -> None:
        # Before the checkpoint that marks the run finished: a kill in between repeats
        # the stage end, and ema/ is written again from the same averages.
        with swapped_in(ctx.built.optimizer):
            ctx.ckpts.save_variant("ema", run)
