"""The exponential moving average of the weights (`--ema_decay`): Keras's own.

The optimizer keeps the average (`use_ema=True`, one slot per variable it was
built on, saved in every checkpoint with the other slots), so resume is exact
and MirroredStrategy averages the same synchronised weights on every replica.
What Keras leaves to `model.fit` callbacks (`keras.callbacks.SwapEMAWeights`)
the controller does here: swap the averages in to score or save them, and back.
"""

from __future__ import annotations

import contextlib

import numpy as np


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
