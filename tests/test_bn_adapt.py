"""`--bn=adapt` (AdaBN): statistics against Keras's own BatchNorm, and what they leave alone."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from research.model import backbones
from research.run.actions import adabn as bn_adapt
from tests.conftest import run_module


def _base():
    keras.utils.set_random_seed(0)
    base = backbones.build_base("small_cnn", image_size=16)
    for layer in bn_adapt.bn_layers(base):
        layer.trainable = False  # the frozen policy the run starts from
    return base


def _batches(n=4, batch=8, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.uniform(-1, 1, (n * batch, 16, 16, 3)).astype(np.float32) * np.linspace(0.5, 2, 3)
    return tf.data.Dataset.from_tensor_slices((x, np.zeros(n * batch, np.int32))).batch(batch)


def _keras_batch_statistics(base, x):
    """What Keras's BN itself records from one batch in training mode with momentum 0."""
    layers = bn_adapt.bn_layers(base)
    saved = [(layer.momentum, layer.trainable) for layer in layers]
    for layer in layers:
        layer.momentum, layer.trainable = 0.0, True
    try:
        base(x, training=True)
        return [(layer.moving_mean.numpy().copy(), layer.moving_variance.numpy().copy()) for layer in layers]
    finally:
        for layer, (m, t) in zip(layers, saved):
            layer.momentum, layer.trainable = m, t


def test_adapted_statistics_are_the_average_of_kerass_batch_statistics():
    base = _base()
    layers = bn_adapt.bn_layers(base)
    assert len(layers) == 3
    batches = _batches()
    # The reference: Keras's own update with momentum 0, one batch at a time, averaged.
    ref_base = _base()
    per_batch = [_keras_batch_statistics(ref_base, x) for x, _ in batches]
    expected = [(np.mean([b[i][0] for b in per_batch], axis=0), np.mean([b[i][1] for b in per_batch], axis=0))
                for i in range(len(layers))]

    before = {v.path: v.numpy().copy() for v in base.weights}
    assert bn_adapt.adapt(base, batches) == 32
    for layer, (mean, var) in zip(layers, expected):
        np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6, err_msg=layer.name)
        np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-5, atol=1e-6, err_msg=layer.name)
        assert not np.allclose(layer.moving_mean.numpy(), before[layer.moving_mean.path])
    # Nothing else moves: kernels, biases, gamma, beta; and the layers stay frozen.
    for v in base.weights:
        if "moving_" not in v.path:
            assert np.array_equal(v.numpy(), before[v.path]), v.path
    assert not any(layer.trainable for layer in layers)
    # The result depends on the weights and data only, not on the statistics it replaces.
    first = [layer.moving_variance.numpy().copy() for layer in layers]
    bn_adapt.adapt(base, batches)
    assert all(np.array_equal(a, layer.moving_variance.numpy()) for a, layer in zip(first, layers))


@pytest.mark.slow
def test_recipe_options_under_mirrored_equal_one_device(tmp_path):
    """--bn=adapt (re-estimated at each stage start), --ema_decay, --label_smoothing, mixup and
    CutMix, class weights, RandAugment, the evaluation crop: two mirrored CPU replicas end with the same weights, BN statistics and
    EMA slots as one device."""
    common = ["--classes=0-4", "--image_size=16", "--deterministic", "--dropout=0", "--noexport", "--bn=adapt",
              "--ema_decay=0.9", "--label_smoothing=0.1", "--mixup=0.4", "--cutmix=1", "--class_weight=balanced",
              "--randaugment=1", "--eval_crop=0.875",
              "--stages=name=head unfreeze=none epochs=1 lr=3e-3; name=ft unfreeze=all epochs=1 lr=1e-3"]
    runs = {}
    for name, extra in (("one", ["--strategy=default"]), ("two", ["--strategy=mirrored", "--cpu_devices=2"])):
        wd = tmp_path / name
        r = run_module("launch.train", f"--workdir={wd}", *common, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("BatchNorm statistics re-estimated on") == 2
        runs[name] = wd
    res = json.loads((runs["one"] / "results.json").read_text())
    assert [a["stage"] for a in res["bn_adapted"]] == ["head", "ft"]
    reader = {n: tf.train.load_checkpoint(tf.train.latest_checkpoint(str(wd / "ckpt"))) for n, wd in runs.items()}
    names = [k for k in reader["one"].get_variable_to_shape_map() if "moving_" in k and "VARIABLE_VALUE" in k]
    assert len(names) == 6
    # Adam's two slots and the EMA average per variable: the averages are compared too.
    keys = reader["one"].get_variable_to_shape_map()
    slots = [k for k in keys if k.startswith("optimizer/_variables/")]
    assert len(slots) == 3 * len([k for k in keys if k.startswith("optimizer/_trainable_variables/")])
    for k in reader["one"].get_variable_to_shape_map():
        if "VARIABLE_VALUE" in k and not k.startswith(("meta/", "save_counter/")):
            np.testing.assert_allclose(reader["two"].get_tensor(k), reader["one"].get_tensor(k), rtol=1e-4, atol=1e-5,
                                       err_msg=k)


@pytest.mark.parametrize("flags,message", [(["--bn=sometimes"], "--bn"),
                                           (["--bn=adapt", "--train_bn"], "contradicts --bn=adapt")])
def test_bad_bn_flags_exit_2(tmp_path, flags, message):
    r = run_module("launch.train", f"--workdir={tmp_path / 'run'}", *flags)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-1000:]


def test_train_bn_is_an_alias_and_old_configs_read_back():
    from launch.train import config_from_args
    from research.config import ExperimentConfig

    assert config_from_args(["--train_bn"]).model.bn == "train"
    assert config_from_args(["--bn=adapt"]).model.bn == "adapt" and config_from_args([]).model.bn == "frozen"
    old = ExperimentConfig().to_dict()
    del old["model"]["bn"]
    for value, policy in ((True, "train"), (False, "frozen")):
        old["model"]["train_bn"] = value  # a config.json written before --bn existed
        assert ExperimentConfig.from_dict(old).model.bn == policy
