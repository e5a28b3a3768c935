"""The custom loop is exactly Keras's maths: same weights as `model.fit` after one epoch."""

import numpy as np
import pytest
import tensorflow as tf
import keras

from research.model import backbones, unfreeze
from research.config import StageConfig, TrainConfig
from research.run.loop import Trainer, add_sums
from research.model.optim import StageSchedule, build_optimizer


def _digits(n=256, size=16):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = np.repeat(d.images[:n, :, :, None], 3, -1).astype("float32") / 16.0
    x = tf.image.resize(x, (size, size)).numpy()
    return x, d.target[:n].astype("int32")


def _small_cnn():
    keras.utils.set_random_seed(1)
    return backbones.build_classifier(backbones.build_base("small_cnn", image_size=16), 10, dropout=0.0)


def _model(train_bn: bool, spec: str = "all", make_model=_small_cnn):
    model = make_model()
    sel = unfreeze.select(model, "small_cnn", spec, train_bn=train_bn)
    unfreeze.apply_policy(model, "small_cnn", sel)
    return model, sel


# Class weights far from 1, so a loop that ignored them would end far outside the tolerance.
CLASS_WEIGHT = {c: w for c, w in enumerate([3.0, 0.2, 1.0, 0.5, 2.0, 1.5, 0.3, 1.0, 4.0, 0.7])}


@pytest.mark.parametrize("opt,train_bn,smoothing,weighted", [
    ("sgd", False, 0.0, False), ("adam", False, 0.0, False), ("adam", True, 0.0, False), ("sgd", True, 0.0, False),
    ("adam", False, 0.1, False), ("sgd", False, 0.0, True)])
def test_one_epoch_equals_model_fit(opt, train_bn, smoothing, weighted):
    _one_epoch_equals_model_fit(opt, train_bn, smoothing, weighted)


def test_norm_spec_equals_model_fit_with_only_the_normalisation_layers_trainable():
    """`norm` with `--bn=train` is what `model.fit` does when only the BatchNorm layers (and the head)
    are trainable: gamma/beta learn, batch statistics, moving averages updated."""
    ref = _one_epoch_equals_model_fit("adam", True, 0.0, False, spec="norm")
    paths = {v.path for v in ref.trainable_variables}
    assert paths == {v.path for v in ref.weights if v.path.split("/")[-1] in ("gamma", "beta")} | {
        "head/kernel", "head/bias"}, paths


def _one_epoch_equals_model_fit(opt, train_bn, smoothing, weighted, spec="all"):
    ref, ours = fit_and_our_loop(_small_cnn, opt, spec, train_bn=train_bn, smoothing=smoothing, weighted=weighted)
    for a, b, v in zip(ref.get_weights(), ours.get_weights(), ref.weights):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=v.path)
    return ref


def fit_and_our_loop(make_model, opt, spec, *, train_bn=False, smoothing=0.0, weighted=False):
    """One epoch of `model.fit` and one of the loop, from the same small_cnn classifier
    (`make_model`: the same weights on every call); returns (fit's model, ours) to compare."""
    x, y = _digits()
    ref, _ = _model(train_bn, spec, make_model)
    ours, sel = _model(train_bn, spec, make_model)
    ours.set_weights(ref.get_weights())
    # A moderate SGD step: with BN training, lr 0.05 + momentum amplifies float32
    # rounding (the order of reductions) past the tolerance within 8 steps.
    lr = 0.01 if opt == "sgd" else 1e-3
    cfg = TrainConfig(optimizer=opt, momentum=0.9)

    if smoothing:  # Keras's own label smoothing needs one-hot targets
        loss, targets = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=smoothing), np.eye(10)[y]
    else:
        loss, targets = keras.losses.SparseCategoricalCrossentropy(from_logits=True), y
    ref.compile(optimizer=build_optimizer(cfg, lr), loss=loss, jit_compile=False)
    history = ref.fit(x, targets, batch_size=32, epochs=1, shuffle=False, verbose=0,
                      class_weight=CLASS_WEIGHT if weighted else None)

    schedule = StageSchedule()
    schedule.set_stage(StageConfig(lr=lr, epochs=1, schedule="constant"), start_step=0, steps_per_epoch=8)
    optimizer = build_optimizer(cfg, schedule)
    optimizer.build(sel.variables)
    trainer = Trainer(ours, optimizer, strategy=tf.distribute.get_strategy(), label_smoothing=smoothing,
                      class_weights=[CLASS_WEIGHT[c] for c in range(10)] if weighted else None)
    trainer.set_trainable(sel.variables)
    it = iter(tf.data.Dataset.from_tensor_slices((x, y)).batch(32, drop_remainder=True))
    sums = add_sums(trainer.train(it, 5)[0], trainer.train(it, 3)[0])  # two calls: steps_per_loop boundaries must not matter
    # The reported training loss is the objective fit reports (smoothed when smoothing).
    assert sums["loss_sum"] / sums["count"] == pytest.approx(history.history["loss"][0], rel=1e-4)

    # Sanity: training moved the weights a lot compared with the tolerance.
    assert trainer.tracing_count() == 1
    moved = max(np.abs(a - b).max() for a, b in zip(ref.get_weights(), make_model().get_weights()))
    assert moved > 1e-3
    return ref, ours
