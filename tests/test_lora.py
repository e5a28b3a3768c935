"""LoRA specs (`lora:R`, `lora:R@SPEC`): Keras's maths, kernels untouched, merged export."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from research.config import (DataConfig, ExperimentConfig, ModelConfig, StageConfig, TrainConfig, UserError)
from research.model import backbones, lora, unfreeze
from research.config import validate as validate_config
from research.model.optim import build_optimizer
from research.run.loop import Trainer
from tests.conftest import run_module


def _config(*specs, alpha=0.0):
    return ExperimentConfig(data=DataConfig(image_size=16, classes="0-2"), model=ModelConfig(lora_alpha=alpha),
                            stages=tuple(StageConfig(name=f"s{i}", unfreeze=s, epochs=1) for i, s in enumerate(specs)))


def _model(config):
    keras.utils.set_random_seed(0)
    model = backbones.build_classifier(backbones.build_base("small_cnn", image_size=16), 3, dropout=0.0)
    plan = lora.enable(model, "small_cnn", config)
    return model, plan


def _digits(n=64):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = np.repeat(d.images[:n, :, :, None], 3, -1).astype("float32") / 16.0
    return tf.image.resize(x, (16, 16)).numpy(), d.target[:n] % 3


def test_a_lora_layer_computes_kernel_plus_the_scaled_product_of_its_factors():
    """The reference is the formula: conv(x, W + (A @ B) * alpha / R) + b, with factors set at random
    (B is zero when enabled), and --lora_alpha reaching the scale."""
    model, plan = _model(_config("lora:4", alpha=2.0))
    assert plan.layers == ["block1_conv", "block2_conv", "block3_conv"] and plan.skipped == []
    layer = model.get_layer("small_cnn").get_layer("block2_conv")
    rng = np.random.default_rng(0)
    for v in (layer.lora_kernel_a, layer.lora_kernel_b):
        v.assign(rng.normal(size=v.shape).astype("float32"))
    x = rng.normal(size=(2, 8, 8, 32)).astype("float32")
    w = layer._kernel.numpy() + np.einsum("hwir,ro->hwio", layer.lora_kernel_a.numpy(),
                                          layer.lora_kernel_b.numpy()) * (2.0 / 4)
    expected = tf.nn.conv2d(x, w, 1, "SAME").numpy()
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("spec,blocks", [("lora:4", {"block1", "block2", "block3"}), ("lora:4@top:1", {"block3"}),
                                         ("lora:4@top:1+norm", {"block3"})])
def test_a_lora_stage_trains_only_its_factors_and_leaves_kernels_and_statistics_bit_identical(spec, blocks):
    config = _config("none", spec, "all")  # LoRA on every layer any stage names; this stage its own blocks'
    model, _ = _model(config)
    sel = unfreeze.select(model, "small_cnn", spec)
    unfreeze.apply_policy(model, "small_cnn", sel)
    opt = build_optimizer(TrainConfig(optimizer="adam"), 1e-2)
    opt.build(sel.variables)
    trainer = Trainer(model, opt, strategy=tf.distribute.get_strategy())
    trainer.set_trainable(sel.variables)
    before = {v.path: v.numpy().copy() for v in model.weights}
    x, y = _digits()
    trainer.train(iter(tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat()), 4)
    after = {v.path: v.numpy() for v in model.weights}
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    factors = {f"block{b[-1]}_conv/{f}" for b in blocks for f in lora.FACTORS}
    norms = {p for p in before if "+norm" in spec and p.split("/")[-1] in ("gamma", "beta")}
    assert changed == factors | norms | {"head/kernel", "head/bias"}
    assert set(sel.kinds["lora"]) == factors
    record = unfreeze.describe(sel, model, stage="s1")
    assert record["backbone_params"] == backbones.build_base("small_cnn", image_size=16).count_params()
    assert record["backbone_trained_params"] == sum(after[p].size for p in factors | norms)


def test_mixed_precision_keeps_the_factors_in_float32():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model, _ = _model(_config("lora:4"))
        factors = [v for v in model.weights if lora.is_factor(v)]
        assert len(factors) == 6 and {v.dtype for v in factors} == {"float32"}
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("specs,extra,message", [
    (("lora:4", "lora:8"), {}, "a run has one LoRA rank"),
    (("top:1",), {"alpha": 4.0}, "needs a lora:R unfreeze spec"),
    (("lora:4@norm",), {}, "after '@' comes the blocks"),
])
def test_lora_settings_are_checked_before_tensorflow_work(specs, extra, message):
    with pytest.raises(UserError, match=message):
        validate_config(_config(*specs, **extra))


def test_a_lora_run_exports_merged_kernels_that_give_the_lora_models_probabilities(tmp_path):
    """launch.train with head -> lora:4 -> all: the exported model.keras and SavedModel have no LoRA
    layer and give the probabilities of the run's own (LoRA) model, restored from its checkpoint."""
    from research.run.checkpoints import load_run
    from research.serve import export

    r = run_module("launch.train", f"--workdir={tmp_path}", "--image_size=16", "--classes=0-2", "--lora_alpha=8",
                   "--stages=name=head unfreeze=none epochs=1 lr=3e-3; name=lora unfreeze=lora:4 epochs=2 lr=1e-2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LoRA: rank 4 on 3 layer(s)" in r.stdout
    record = json.loads((tmp_path / "trainable.json").read_text())[-1]
    assert record["parameter_kinds"]["lora"] == {"variables": 6, "params": 4460, "skipped_layers": []}
    config, model, names, _ = load_run(str(tmp_path), checkpoint="latest")
    assert len(lora.enabled_layers(model)) == 3
    assert any(np.abs(v.numpy()).max() > 0 for v in model.weights if v.path.endswith("lora_kernel_b"))
    x = np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 3)).astype("float32")
    expected = export.inference_model(model, "small_cnn")(x).numpy()
    exported = keras.models.load_model(tmp_path / "export" / "model.keras")
    layers = list(exported._flatten_layers(include_self=False, recursive=True))
    assert any(layer.name == "block2_conv" for layer in layers)
    assert not any(getattr(layer, "lora_enabled", False) for layer in layers)
    assert not any(lora.is_factor(v) for v in exported.weights)
    np.testing.assert_allclose(exported(x).numpy(), expected, rtol=1e-5, atol=1e-6)
    sm = tf.saved_model.load(str(tmp_path / "export" / "saved_model")).signatures["predict_float"]
    np.testing.assert_allclose(sm(tf.constant(x))["probabilities"].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_a_lora_run_from_another_runs_backbone_keeps_its_kernels_and_statistics_to_the_bit(tmp_path):
    """--weights=ckpt:RUN into a model with LoRA (loaded into a plain twin, then copied), then a lora:
    stage: every kernel and BatchNorm statistic in the final checkpoint is the other run's."""
    args = ["--image_size=16", "--classes=0-2", "--finetune_epochs=1", "--noexport"]
    r = run_module("launch.train", f"--workdir={tmp_path / 'a'}", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_module("launch.train", f"--workdir={tmp_path / 'b'}", *args, f"--weights=ckpt:{tmp_path / 'a'}",
                   "--unfreeze=lora:2", "--lr=1e-2")
    assert r.returncode == 0, r.stderr[-3000:]

    from research.run.checkpoints import load_run

    _, a, _, _ = load_run(str(tmp_path / "a"), checkpoint="best")
    _, b, _, _ = load_run(str(tmp_path / "b"), checkpoint="latest")
    a = {v.path: v.numpy() for v in backbones.base_of(a).weights}
    b = {v.path: v.numpy() for v in backbones.base_of(b).weights}
    factors = {k for k in b if k not in a}
    assert len(factors) == 6 and any(np.abs(b[k]).max() > 0 for k in factors)  # B moved off zero
    assert a.keys() <= b.keys() and len(a) >= 15
    for k in a:
        assert np.array_equal(a[k], b[k]), k


@pytest.mark.slow  # a run and two evaluations; restore_best_weights' test keeps best/ in the default suite
def test_best_and_the_ema_variant_carry_the_lora_factors(tmp_path):
    """A lora: stage under --ema_decay: best/ and ema/ hold factors (ema/'s averaged, not the trained
    ones) that, evaluated by launch.evaluate's library, give the scores the run recorded for them."""
    from research.serve.evaluate import evaluate_run

    r = run_module("launch.train", f"--workdir={tmp_path}", "--image_size=16", "--classes=0-4", "--noexport",
                   "--ema_decay=0.9",
                   "--stages=name=head unfreeze=none epochs=1 lr=3e-3; name=lora unfreeze=lora:4 epochs=3 lr=1e-2")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    from research.run.checkpoints import load_run
    factors = {which: {v.path: v.numpy() for v in load_run(str(tmp_path), checkpoint=which)[1].weights
                       if lora.is_factor(v)} for which in ("latest", "ema")}
    assert len(factors["ema"]) == 6 and factors["ema"].keys() == factors["latest"].keys()
    assert any(not np.array_equal(factors["ema"][k], factors["latest"][k]) for k in factors["ema"])  # averaged
    best = evaluate_run(str(tmp_path), split="val", checkpoint="best", name="best_val")
    assert best["accuracy"] == pytest.approx(res["best"]["val/accuracy"], abs=1e-9)
    ema = evaluate_run(str(tmp_path), split="test", checkpoint="ema", name="ema_test")
    assert ema["accuracy"] == pytest.approx(res["final"]["test_ema/accuracy"], abs=1e-9)


@pytest.mark.slow  # 4 runs; test_a_lora_run_from_another_runs_backbone_... covers ckpt: into LoRA by default
def test_another_lora_runs_backbone_comes_merged_and_what_is_not_copied_keeps_the_seeds_initialisation(tmp_path):
    """--weights=ckpt:RUN where RUN trained LoRA factors: the new run starts from RUN's merged kernels
    (not the kernels without what LoRA learned). With --init_blocks, the blocks not copied keep the
    initialisation this seed gives, LoRA or not: a LoRA run and a plain one stay paired by seed."""
    from research.run.checkpoints import load_run

    common = ["--image_size=16", "--classes=0-2", "--noexport", "--seed=3"]
    r = run_module("launch.train", f"--workdir={tmp_path / 'src'}", *common, "--lr=1e-2",
                   "--stages=name=head unfreeze=none epochs=1; name=lora unfreeze=lora:4 epochs=1")
    assert r.returncode == 0, r.stderr[-3000:]
    src = {v.path: v for v in backbones.base_of(load_run(str(tmp_path / "src"), checkpoint="latest")[1]).weights}
    merged = dict(zip([p for p in src if not p.endswith(lora.FACTORS)],
                      lora.merged_weights(load_run(str(tmp_path / "src"), checkpoint="latest")[1].get_layer(
                          "small_cnn"))))
    assert not np.array_equal(merged["block3_conv/kernel"], src["block3_conv/kernel"].numpy())  # LoRA learned
    runs = {"whole": [], "first_plain": ["--init_blocks=1"], "first_lora": ["--init_blocks=1", "--unfreeze=lora:2"]}
    got = {}
    for name, extra in runs.items():
        r = run_module("launch.train", f"--workdir={tmp_path / name}", *common, f"--weights=ckpt:{tmp_path / 'src'}",
                       "--unfreeze=none", "--finetune_epochs=1", *extra)  # the head alone trains: kernels as loaded
        assert r.returncode == 0, r.stderr[-3000:]
        got[name] = {v.path: v.numpy() for v in backbones.base_of(load_run(str(tmp_path / name),
                                                                            checkpoint="latest")[1]).weights}
    for k in ("block1_conv/kernel", "block3_conv/kernel", "block3_bn/moving_mean"):
        assert np.array_equal(got["whole"][k], merged[k]), k
    assert np.array_equal(got["first_plain"]["block1_conv/kernel"], merged["block1_conv/kernel"])
    assert not np.array_equal(got["first_plain"]["block3_conv/kernel"], merged["block3_conv/kernel"])
    for k in ("block1_conv/kernel", "block2_conv/kernel", "block3_conv/kernel"):
        assert np.array_equal(got["first_lora"][k], got["first_plain"][k]), k


def test_restore_best_weights_puts_the_best_epochs_factors_back(tmp_path):
    """--restore_best_weights after a lora: stage whose best epoch is not its last: the final weights,
    LoRA factors included, are best/'s, and the final validation score is the best epoch's."""
    from research.run.checkpoints import load_run

    r = run_module("launch.train", f"--workdir={tmp_path}", "--image_size=16", "--classes=0-4", "--noexport",
                   "--restore_best_weights", "--early_stopping_monitor=val/loss",
                   "--stages=name=head unfreeze=none epochs=1 lr=3e-3; name=lora unfreeze=lora:4 epochs=3 lr=0.3")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["final"]["val/loss"] == pytest.approx(res["best"]["val/loss"], abs=1e-6)
    final, best = ({v.path: v.numpy() for v in load_run(str(tmp_path), checkpoint=c)[1].weights} for c in ("latest", "best"))
    assert final.keys() == best.keys() and sum(p.endswith(lora.FACTORS) for p in final) == 6
    assert res["best_epoch"] < res["epochs_run"], "the best epoch is the last: restoring it would tell nothing"
    for k in final:
        assert np.array_equal(final[k], best[k]), k


def test_pretrained_weights_reach_every_layer_of_a_lora_base_whose_layers_keras_left_unnamed(tmp_path):
    """InceptionV3's convolutions and BatchNorms are auto-named (`conv2d_94`...), numbered anew in
    every build: the weights file loads into a plain twin and comes over by position, so every
    kernel and statistic of the run's (LoRA) base is the file's."""
    from launch.train import config_from_args
    from research.run import build as build_lib
    from research.run.preflight import validate

    keras.utils.set_random_seed(0)
    reference = backbones.build_base("inception_v3", image_size=75)
    for v in reference.weights:  # far from any initialisation
        v.assign(np.random.default_rng(len(v.path)).uniform(0.5, 1.5, v.shape).astype("float32"))
    path = tmp_path / "inception.weights.h5"
    reference.save_weights(path)
    config = validate(config_from_args(["--backbone=inception_v3", "--image_size=75", f"--weights={path}",
                                        "--unfreeze=lora:2@top:1", "--finetune_epochs=1"]))
    m = build_lib.build(config, 3, tf.distribute.get_strategy())
    assert m.lora.layers and any(name.startswith("conv2d_") for name in m.lora.layers)
    build_lib.init_weights(config, m)
    loaded = [v for v in m.base.weights if not lora.is_factor(v)]
    assert len(loaded) == len(reference.weights)
    for v, ref in zip(loaded, reference.weights, strict=True):
        np.testing.assert_array_equal(v.numpy(), ref.numpy(), err_msg=v.path)
