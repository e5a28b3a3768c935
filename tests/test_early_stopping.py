"""`research.early_stopping.EarlyStopping` decides exactly as `keras.callbacks.EarlyStopping`."""

import math

import keras
import numpy as np
import pytest

from research.config import UserError
from research.early_stopping import EarlyStopping, resolve_mode


@pytest.fixture(scope="module")
def dummy_model():
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(loss="mse", metrics=["accuracy"])
    # Builds the compiled metrics, which Keras's mode="auto" inspects.
    model.evaluate(np.zeros((2, 1)), np.zeros((2, 1)), verbose=0)
    return model


def _keras_run(model, values, monitor, **kw):
    cb = keras.callbacks.EarlyStopping(monitor=monitor, **kw)
    cb.set_model(model)
    cb.on_train_begin()
    stop = None
    for epoch, v in enumerate(values):
        model.stop_training = False
        cb.on_epoch_end(epoch, {monitor: v})
        if model.stop_training:
            stop = epoch
            break
    return stop, cb


def _ours_run(values, monitor, **kw):
    es = EarlyStopping(monitor=monitor, **kw)
    stop = None
    for epoch, v in enumerate(values):
        if es.update(epoch, v):
            stop = epoch
            break
    return stop, es


def _same(a, b):
    if a is None or b is None:
        return a is None and b is None
    return (math.isnan(a) and math.isnan(b)) or a == b


def _values(rng, n):
    kind = rng.randint(4)
    if kind == 0:
        v = rng.normal(size=n)
    elif kind == 1:  # many exact ties
        v = rng.choice([0.1, 0.2, 0.3, 0.30000001], size=n)
    elif kind == 2:  # a trend with noise: realistic losses
        v = np.linspace(1, 0.2, n) + rng.normal(scale=0.05, size=n)
    else:
        v = rng.uniform(0, 1, size=n).round(2)
    v = v.astype(float)
    if rng.rand() < 0.2:
        v[rng.randint(n)] = float("nan")
    return [float(x) for x in v]


def test_property_matches_keras_on_random_sequences(dummy_model):
    rng = np.random.RandomState(0)
    for trial in range(400):
        monitor_keras = rng.choice(["val_loss", "val_accuracy", "loss"])
        monitor_ours = {"val_loss": "val/loss", "val_accuracy": "val/accuracy", "loss": "train/loss"}[monitor_keras]
        kw = dict(
            mode=rng.choice(["auto", "min", "max"]),
            min_delta=float(rng.choice([0.0, 0.01, -0.01, 0.05, 1e-9])),
            patience=int(rng.randint(0, 5)),
            baseline=None if rng.rand() < 0.5 else float(rng.normal()),
            start_from_epoch=int(rng.randint(0, 4)),
        )
        values = _values(rng, int(rng.randint(1, 25)))
        k_stop, k = _keras_run(dummy_model, values, monitor_keras, **kw)
        o_stop, o = _ours_run(values, monitor_ours, **kw)
        ctx = f"trial {trial}: {monitor_keras} {kw} {values}"
        assert o_stop == k_stop, ctx
        assert _same(o.best, k.best), ctx
        assert o.best_epoch == k.best_epoch, ctx
        assert o.wait == k.wait, ctx
        assert o.stopped_epoch == k.stopped_epoch, ctx


def test_state_round_trip_continues_identically():
    values = [1.0, 0.9, 0.95, 0.97, 0.96, 0.99, 0.5]
    full_stop, full = _ours_run(values, "val/loss", patience=3)
    first = EarlyStopping("val/loss", patience=3)
    for e, v in enumerate(values[:3]):
        first.update(e, v)
    resumed = EarlyStopping("val/loss", patience=3)
    resumed.load_state(first.state())
    stop = None
    for e, v in enumerate(values[3:], start=3):
        if resumed.update(e, v):
            stop = e
            break
    assert stop == full_stop and resumed.state() == full.state()


def test_auto_mode_resolution():
    assert resolve_mode("val/loss", "auto") == "min"
    assert resolve_mode("val/accuracy", "auto") == "max"
    assert resolve_mode("val/top5_accuracy", "auto") == "max"
    with pytest.raises(UserError, match="--early_stopping_mode"):
        resolve_mode("val/widgets", "auto")
