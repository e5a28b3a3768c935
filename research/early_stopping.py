"""Early stopping as a small state machine with Keras 3.15's exact decisions.

`update(epoch, value)` is `keras.callbacks.EarlyStopping.on_epoch_end` without a
model: same improvement test (beat the best by more than |min_delta|, compared
in float32 as Keras's `ops.less`/`ops.greater` do), same `wait` bookkeeping
(incremented on every monitored epoch, reset only by an improvement that also
beats `baseline`), same stop rule (`wait >= patience and epoch > 0`), same
warm-up (`epoch < start_from_epoch` ignored). Restoring the best weights is the
caller's job (the loop restores the `best/` checkpoint, BN statistics included).
"""

from __future__ import annotations

import numpy as np

from research.errors import UserError

_MAX_METRICS = ("accuracy", "top5_accuracy", "acc", "auc", "precision", "recall")


def resolve_mode(monitor: str, mode: str) -> str:
    """Keras's `mode="auto"`: `loss` minimises, accuracy-like metrics maximise.

    Raises:
      UserError: when the direction of `monitor` cannot be inferred.
    """
    if mode in ("min", "max"):
        return mode
    name = monitor.split("/", 1)[1] if "/" in monitor else monitor.removeprefix("val_")
    if name == "loss" or name.endswith("loss"):
        return "min"
    if name in _MAX_METRICS or name.endswith("accuracy"):
        return "max"
    raise UserError(f"cannot infer whether {monitor!r} should be minimised or maximised; "
                    "pass --early_stopping_mode=min or max")


class EarlyStopping:
    """Keras-exact early stopping.

    Args and attributes follow `keras.callbacks.EarlyStopping`; `best` is None
    until the first monitored epoch. The run's best record (`best/`) is the
    controller's, judged with `is_improvement` across stages.
    """

    def __init__(self, monitor: str = "val/loss", mode: str = "auto", min_delta: float = 0.0,
                 patience: int = 0, baseline: float | None = None, start_from_epoch: int = 0,
                 restore_best_weights: bool = False):
        self.monitor = monitor
        self.mode = resolve_mode(monitor, mode)
        self.patience = patience
        self.baseline = baseline
        self.start_from_epoch = start_from_epoch
        self.restore_best_weights = restore_best_weights
        # Keras keeps min_delta negative for "min" and compares value - min_delta.
        self.min_delta = abs(min_delta) * (-1 if self.mode == "min" else 1)
        self.reset()

    def reset(self) -> None:
        self.wait = 0
        self.stopped_epoch = 0
        self.best: float | None = None
        self.best_epoch = 0

    def is_improvement(self, value: float, reference: float | None) -> bool:
        """Keras's test: `value` beats `reference` by more than |min_delta| in this mode."""
        if reference is None:
            return True
        op = np.less if self.mode == "min" else np.greater
        return bool(op(np.float32(value - self.min_delta), np.float32(reference)))

    def update(self, epoch: int, value: float | None) -> bool:
        """Records the monitored value of `epoch` (0-based within the stage).

        Returns:
          True when training should stop now.
        """
        if value is None or epoch < self.start_from_epoch:
            return False
        self.wait += 1
        if self.is_improvement(value, self.best):
            self.best = value
            self.best_epoch = epoch
            if self.baseline is None or self.is_improvement(value, self.baseline):
                self.wait = 0
            return False
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            return True
        return False

    def state(self) -> dict:
        return {"wait": self.wait, "stopped_epoch": self.stopped_epoch, "best": self.best,
                "best_epoch": self.best_epoch}

    def load_state(self, state: dict) -> None:
        self.wait = int(state["wait"])
        self.stopped_epoch = int(state["stopped_epoch"])
        self.best = None if state["best"] is None else float(state["best"])
        self.best_epoch = int(state["best_epoch"])
