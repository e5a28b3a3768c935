"""Unfreeze specs: parsing, exact variable selection, BN policy, stages, one optimizer."""

import json

import numpy as np
import pytest
import tensorflow as tf

from research.model import backbones, unfreeze
from research.config import (DataConfig, ExperimentConfig, ModelConfig, StageConfig, TrainConfig, UserError,
                             parse_stages)
from research.run.loop import Trainer
from research.model.optim import build_optimizer

SIZES = {"small_cnn": 16, "vgg16": 32, "inception_v3": 75, "mobilenet": 32}


@pytest.fixture(scope="module")
def block_names():
    out = {}
    for name, size in SIZES.items():
        base = backbones.build_base(name, image_size=size, alpha=0.25 if name == "mobilenet" else 1.0)
        out[name] = backbones.blocks(base, name)
    return out


@pytest.mark.parametrize("backbone", list(SIZES))
def test_spec_parsing_valid(block_names, backbone):
    names = block_names[backbone]
    n = len(names)
    assert unfreeze.resolve_blocks("none", names) == []
    assert unfreeze.resolve_blocks("all", names) == names
    assert unfreeze.resolve_blocks("top:0", names) == []
    assert unfreeze.resolve_blocks("top:2", names) == names[-2:]
    assert unfreeze.resolve_blocks(f"top:{n}", names) == names
    assert unfreeze.resolve_blocks(f"from:{names[1]}", names) == names[1:]
    # blocks: keeps model order whatever the order given.
    assert unfreeze.resolve_blocks(f"blocks:{names[-1]},{names[0]}", names) == [names[0], names[-1]]
    assert unfreeze.resolve_blocks("regex:kernel", names) == []


@pytest.mark.parametrize("backbone", list(SIZES))
@pytest.mark.parametrize("spec", ["top:-1", "top:99", "top:x", "from:nope", "blocks:nope", "blocks:", "bottom:2",
                                  "regex:(", "regex:"])
def test_spec_parsing_invalid_names_the_blocks(block_names, backbone, spec):
    names = block_names[backbone]
    with pytest.raises(UserError) as e:
        unfreeze.resolve_blocks(spec, names, backbone=backbone)
    if not spec.startswith("regex:"):
        assert f"valid blocks of {backbone}" in str(e.value) and names[-1] in str(e.value)


def test_regex_matching_nothing_is_an_error():
    model = backbones.build_classifier(backbones.build_base("small_cnn", image_size=16), 3)
    with pytest.raises(UserError, match="matches no trainable base variable"):
        unfreeze.select(model, "small_cnn", "regex:^zzz")


def _tiny_data(n=64, size=16):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = np.repeat(d.images[:n, :, :, None], 3, -1).astype("float32") / 16.0
    x = tf.image.resize(x, (size, size)).numpy()
    return tf.data.Dataset.from_tensor_slices((x, d.target[:n] % 3)).batch(16, drop_remainder=True).repeat()


def _snapshot(model):
    return {v.path: v.numpy().copy() for v in model.weights}


EXPECTED = {  # spec -> base layers whose kernels must change
    "none": set(),
    "all": {"block1_conv", "block2_conv", "block3_conv"},
    "top:1": {"block3_conv"},
    "blocks:block1,block3": {"block1_conv", "block3_conv"},
    "from:block2": {"block2_conv", "block3_conv"},
    "regex:block2_conv": {"block2_conv"},
}


def _train_spec(spec, train_bn, steps=4):
    """small_cnn trained `steps` Adam steps on `spec`: (model, selection, weights before, after)."""
    model = backbones.build_classifier(backbones.build_base("small_cnn", image_size=16), 3, dropout=0.0)
    sel = unfreeze.select(model, "small_cnn", spec, train_bn=train_bn)
    unfreeze.apply_policy(model, "small_cnn", sel)
    opt = build_optimizer(TrainConfig(optimizer="adam"), 1e-2)
    opt.build(sel.variables)
    trainer = Trainer(model, opt, strategy=tf.distribute.get_strategy())
    trainer.set_trainable(sel.variables)
    before = _snapshot(model)
    trainer.train(iter(_tiny_data()), steps)
    return model, sel, before, _snapshot(model)


@pytest.mark.parametrize("spec", list(EXPECTED))
@pytest.mark.parametrize("train_bn", [False, True])
def test_only_selected_variables_change(spec, train_bn):
    model, sel, before, after = _train_spec(spec, train_bn)
    selected = set(sel.paths)
    trained_blocks = {f"block{p[5]}" for p in EXPECTED[spec]}
    for path, old in before.items():
        layer, var = path.split("/")
        changed = not np.array_equal(old, after[path])
        if path in selected:
            assert changed, f"{spec}: selected {path} did not change"
        elif var in ("moving_mean", "moving_variance"):
            # Default policy: BN statistics bit-identical everywhere. With train_bn,
            # only the BN layers of unfrozen blocks update their statistics.
            should = train_bn and layer[:6] in trained_blocks and spec != "regex:block2_conv"
            assert changed == should, f"{spec} train_bn={train_bn}: {path} changed={changed}"
        else:
            assert not changed, f"{spec}: {path} is outside the spec but changed"
    assert {p.split("/")[0] for p in selected if p.endswith("kernel") and p.startswith("block")} == EXPECTED[spec]
    assert {"head/kernel", "head/bias"} <= selected
    if not train_bn:
        assert not any("_bn/" in p for p in selected)


def _config(tmp_path, stages, weights="none", **train):
    return ExperimentConfig(data=DataConfig(dataset="digits", image_size=16, batch_size=32, classes="0-4"),
                            model=ModelConfig(backbone="small_cnn", weights=weights, dropout=0.0),
                            train=TrainConfig(steps_per_loop=10, **train), stages=stages)


def test_second_stage_trains_newly_unfrozen_variables_and_keeps_slots_aligned(tmp_path):
    """Stale-trace trap: stage 2 must update block3; the optimizer's slots stay aligned."""
    from research.run import build as build_lib, train as train_lib

    # Run A is head-only, so its saved backbone is the untouched initialisation.
    run_a = tmp_path / "a"
    train_lib.train_and_evaluate(_config(tmp_path, (StageConfig(name="probe", unfreeze="none", epochs=1),)),
                                 str(run_a), verbose=False)

    stages = parse_stages("name=head unfreeze=none epochs=1 lr=1e-2; name=ft unfreeze=top:1 epochs=2 lr=1e-3")
    cfg = _config(tmp_path, stages, weights=f"ckpt:{run_a}")
    run_b = tmp_path / "b"
    res = train_lib.train_and_evaluate(cfg, str(run_b), verbose=False)
    assert [s["name"] for s in res["stages"]] == ["head", "ft"]

    # Rebuild the run's model and optimizer and restore B's final checkpoint into them.
    built = build_lib.build(cfg, 5, tf.distribute.get_strategy())
    model, base, opt = built.model, built.base, built.optimizer
    tf.train.Checkpoint(model=model, base=base, optimizer=opt, meta=tf.Variable("")).restore(
        tf.train.latest_checkpoint(str(run_b / "ckpt"))).assert_existing_objects_matched()
    init_ckpt = tf.train.Checkpoint(base=backbones.build_base("small_cnn", image_size=16))
    init_ckpt.restore(tf.train.latest_checkpoint(str(run_a / "ckpt"))).expect_partial()
    init_vals = {v.path: v.numpy() for v in init_ckpt.base.weights}
    for v in base.weights:
        changed = not np.array_equal(v.numpy(), init_vals[v.path])
        assert changed == v.path.startswith("block3_conv"), v.path

    # One optimizer built on the union (head + block3); each slot matches its variable.
    records = json.loads((run_b / "trainable.json").read_text())
    assert [r["key"] for r in records] == ["head", "ft"]
    assert records[0]["variables"] == ["head/kernel", "head/bias"]
    assert records[1]["variables"] == ["block3_conv/kernel", "head/kernel", "head/bias"]
    assert records[1]["trainable_params"] + records[1]["frozen_params"] == sum(int(np.prod(w.shape)) for w in model.weights)
    assert len(opt._trainable_variables) == 3
    for v in opt._trainable_variables:
        i = opt._get_variable_index(v)
        m, vel = opt._momentums[i], opt._velocities[i]
        assert m.shape == v.shape and vel.shape == v.shape
        assert np.any(m.numpy() != 0), v.path  # every union variable trained in some stage


def test_gradual_unfreezing_and_layerwise_lr(tmp_path):
    model = backbones.build_classifier(backbones.build_base("small_cnn", image_size=16), 3)
    sel1 = unfreeze.select(model, "small_cnn", "all", limit_top=1)
    sel2 = unfreeze.select(model, "small_cnn", "all", limit_top=2)
    assert sel1.blocks == ["block3"] and sel2.blocks == ["block2", "block3"]
    sel = unfreeze.select(model, "small_cnn", "all", lr_decay_per_block=0.5)
    assert sel.lr_multipliers == {"block1_conv/kernel": 0.25, "block2_conv/kernel": 0.5}


def _two_optimizer_reference(ref, ref_vars, cfg, lr, data, steps=3):
    """The reference for a 0.5 multiplier on block3: block3 alone at lr*0.5 and the
    head at lr, two optimizers, on one device."""
    import keras
    assert [v.path for v in ref_vars] == ["block3_conv/kernel", "head/kernel", "head/bias"]
    o_body, o_head = build_optimizer(cfg, lr * 0.5), build_optimizer(cfg, lr)
    o_body.build(ref_vars[:1]); o_head.build(ref_vars[1:])
    it = iter(data)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for _ in range(steps):
        x, y = next(it)
        with tf.GradientTape() as tape:
            l = loss(y, ref(x, training=True))
        g = tape.gradient(l, ref_vars)
        o_body.apply(g[:1], ref_vars[:1]); o_head.apply(g[1:], ref_vars[1:])


def test_layerwise_lr_equals_scaled_learning_rate():
    """With SGD+momentum and Adam, a multiplier m on a variable equals training it at lr*m."""
    for name in ("sgd", "adam"):
        ref = backbones.build_classifier(backbones.build_base("small_cnn", image_size=16), 3, dropout=0.0)
        ours = backbones.build_classifier(backbones.build_base("small_cnn", image_size=16), 3, dropout=0.0)
        ours.set_weights(ref.get_weights())
        sel_ours = unfreeze.select(ours, "small_cnn", "top:1", lr_decay_per_block=1.0)
        for m, sel in ((ref, unfreeze.select(ref, "small_cnn", "top:1")), (ours, sel_ours)):
            unfreeze.apply_policy(m, "small_cnn", sel)
        # Reference: block3 alone at lr*0.5 and the head at lr, two optimizers.
        data = _tiny_data()
        cfg = TrainConfig(optimizer=name)
        o_ours = build_optimizer(cfg, 1e-2); o_ours.build(sel_ours.variables)
        t = Trainer(ours, o_ours, strategy=tf.distribute.get_strategy())
        t.set_trainable(sel_ours.variables, {"block3_conv/kernel": 0.5})
        t.train(iter(data), 3)
        _two_optimizer_reference(ref, unfreeze.select(ref, "small_cnn", "top:1").variables, cfg, 1e-2, data)
        for a, b in zip(ref.weights, ours.weights):
            np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6, err_msg=f"{name} {a.path}")


def test_gradual_unfreezing_in_a_run_adds_one_block_per_period(tmp_path):
    from research.run import train as train_lib
    stages = parse_stages("name=g unfreeze=all epochs=3 lr=1e-3 gradual_every=1")
    res = train_lib.train_and_evaluate(_config(tmp_path, stages, export=False), str(tmp_path / "g"), verbose=False)
    records = json.loads((tmp_path / "g" / "trainable.json").read_text())
    assert [r["key"] for r in records] == ["g/top1", "g/top2", "g/top3"]
    assert [r["blocks"] for r in records] == [["block3"], ["block2", "block3"], ["block1", "block2", "block3"]]
    assert [r["from_epoch"] for r in records] == [1, 2, 3]  # counted from 1, as the logs count
    assert records[0]["trainable_params"] < records[1]["trainable_params"] < records[2]["trainable_params"]
    assert res["epochs_run"] == 3
    # The stage reports its last, largest trainable set (it once reported null: records
    # are keyed g/topN, the stage is g).
    assert res["stages"][0]["trainable_params"] == records[2]["trainable_params"]


# Runs in a fresh interpreter: the CPU must be split into 2 logical devices before
# TensorFlow initialises, which this pytest process has already done.
_MIRRORED_LAYERWISE = r"""
import sys
import numpy as np
import tensorflow as tf
from research.run import distribute
distribute.split_cpu(2)
import keras
from research.model import backbones, unfreeze
from research.config import TrainConfig
from research.run.loop import Trainer
from research.model.optim import build_optimizer
from tests.test_unfreeze import _tiny_data, _two_optimizer_reference

name, out = sys.argv[1], sys.argv[2]
lr = {"sgd": 0.1, "adam": 1e-2}[name]  # large enough that block3 moves far beyond the tolerance
strategy = distribute.make_strategy("mirrored")
assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync
cfg = TrainConfig(optimizer=name)
keras.utils.set_random_seed(0)
with strategy.scope():
    ours = backbones.build_classifier(backbones.build_base("small_cnn", image_size=16), 3, dropout=0.0)
    sel = unfreeze.select(ours, "small_cnn", "top:1", lr_decay_per_block=1.0)
    unfreeze.apply_policy(ours, "small_cnn", sel)
    opt = build_optimizer(cfg, lr)
    opt.build(sel.variables)
ref = backbones.build_classifier(backbones.build_base("small_cnn", image_size=16), 3, dropout=0.0)
ref.set_weights(ours.get_weights())
ref_sel = unfreeze.select(ref, "small_cnn", "top:1")
unfreeze.apply_policy(ref, "small_cnn", ref_sel)
init = [w.copy() for w in ref.get_weights()]

t = Trainer(ours, opt, strategy=strategy)
t.set_trainable(sel.variables, {"block3_conv/kernel": 0.5})
t.train(iter(strategy.experimental_distribute_dataset(_tiny_data())), 3)

_two_optimizer_reference(ref, ref_sel.variables, cfg, lr, _tiny_data())
np.savez(out, paths=np.array([v.path for v in ref.weights]), init=np.array(init, dtype=object),
         ref=np.array(ref.get_weights(), dtype=object), ours=np.array(ours.get_weights(), dtype=object),
         iterations=int(opt.iterations.numpy()))
"""


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_layerwise_lr_equals_scaled_learning_rate_on_two_mirrored_replicas(tmp_path, name):
    """The same equality as above through `_rescale_updates`'s multi-replica branch
    (merge_call), on MirroredStrategy over 2 logical CPU devices, global batch 16."""
    import subprocess
    import sys
    from tests.conftest import ROOT
    out = tmp_path / "w.npz"
    r = subprocess.run([sys.executable, "-c", _MIRRORED_LAYERWISE, name, str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=dict(__import__("os").environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert r.returncode == 0, r.stderr[-3000:]
    w = np.load(out, allow_pickle=True)
    assert int(w["iterations"]) == 3
    body = list(w["paths"]).index("block3_conv/kernel")
    # The scaled variable moved by much more than the tolerance, so a wrong multiplier shows.
    assert np.abs(w["ours"][body] - w["init"][body]).max() > 5e-4
    for path, a, b in zip(w["paths"], w["ref"], w["ours"]):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=f"{name} {path}")


KIND_EXPECTED = {  # spec -> (base variables that train, by their last path part; kernels of these layers)
    "norm": ({"gamma", "beta"}, set()),
    "bias": ({"beta"}, set()),  # small_cnn's convolutions have no bias: the offsets alone
    "top:1+norm": ({"gamma", "beta", "kernel"}, {"block3_conv"}),
    "bias+norm": ({"gamma", "beta"}, set()),
}


@pytest.mark.parametrize("spec", list(KIND_EXPECTED))
@pytest.mark.parametrize("train_bn", [False, True])
def test_norm_and_bias_specs_train_only_their_kind(spec, train_bn):
    model, sel, before, after = _train_spec(spec, train_bn)
    kinds, kernels = KIND_EXPECTED[spec]
    base = {p for p in before if not p.startswith("head/")}
    expected = {p for p in base if p.split("/")[1] in kinds - {"kernel"}} | {f"{k}/kernel" for k in kernels}
    if spec.startswith("top:1") and train_bn:  # a whole block takes its BN too: already in
        expected |= {"block3_bn/gamma", "block3_bn/beta"}
    assert set(sel.paths) - {"head/kernel", "head/bias"} == expected
    for path, old in before.items():
        changed = not np.array_equal(old, after[path])
        if path.endswith(("moving_mean", "moving_variance")):
            # Frozen policy: statistics bit-identical (BN in inference mode though its gamma/beta
            # train); with --bn=train, the BN layers whose parameters train run on batch statistics.
            assert changed == (train_bn and f"{path.split('/')[0]}/beta" in expected), path
        else:
            assert changed == (path in expected or path.startswith("head/")), path
    record = unfreeze.describe(sel, model, stage="s")
    kind_names = [k for k in ("bias", "norm") if k in spec]
    assert list(record["parameter_kinds"]) == kind_names
    assert record["backbone_trained_params"] == unfreeze.count_params([v for v in model.weights if v.path in expected])
    assert record["backbone_params"] == backbones.base_of(model).count_params()


def test_bias_means_every_bias_where_the_backbone_has_them_and_norm_is_refused_where_it_has_none():
    model = backbones.build_classifier(backbones.build_base("vgg16", image_size=32), 3)
    sel = unfreeze.select(model, "vgg16", "bias")
    convs = [layer.name for layer in backbones.base_of(model).layers if layer.weights]
    assert sel.paths == [f"{c}/bias" for c in convs] + ["head/kernel", "head/bias"]
    assert sel.kinds == {"bias": [f"{c}/bias" for c in convs]} and sel.blocks == []
    with pytest.raises(UserError, match="vgg16 has no norm parameters"):
        unfreeze.select(model, "vgg16", "top:1+norm")


@pytest.mark.parametrize("spec,message", [
    ("none+norm", "'none' adds nothing"), ("all+top:1", "'all' already holds every block"),
    ("norm+norm", "names a part twice"), ("top:1+", "an empty part"), ("auto:1+auto:2", "at most one auto:"),
    ("top:99+norm", "K must be an integer in 0..3"), ("norms", "is not valid"), ("lora:0", "LoRA specs are lora:R"),
    ("lora:4@", "LoRA specs are lora:R"), ("all+lora:4", "'all' already holds every block"),
    ("lora:2+lora:4", "at most one lora: part"), ("lora:4@top:9", "K must be an integer in 0..3")])
def test_bad_composite_specs_are_refused_by_name(spec, message):
    with pytest.raises(UserError, match=message):
        unfreeze.resolve_blocks(spec, ["block1", "block2", "block3"])


def test_a_regex_part_reads_to_the_end_and_joins_the_others():
    model = backbones.build_classifier(backbones.build_base("small_cnn", image_size=16), 3)
    sel = unfreeze.select(model, "small_cnn", "norm+regex:block(1|2)+_conv")
    assert set(sel.paths) == ({v.path for v in model.weights if v.path.split("/")[-1] in ("gamma", "beta")}
                              | {"block1_conv/kernel", "block2_conv/kernel", "head/kernel", "head/bias"})
    assert sel.blocks == ["block1", "block2"]


def test_gradual_unfreezing_needs_a_block_part():
    from research.config import validate
    for spec in ("norm", "lora:4", "bias+norm"):
        with pytest.raises(UserError, match="gradual unfreezing adds whole blocks"):
            validate(ExperimentConfig(stages=(StageConfig(unfreeze=spec, gradual_every=1),)))
    validate(ExperimentConfig(stages=(StageConfig(unfreeze="top:2+norm", gradual_every=1),)))
