"""The newer backbones (ConvNeXt, EfficientNetV2, MobileNetV3, ResNetV2 from keras.applications,
a KerasHub ViT through `hub:`), each checked as the registry's older ones are and against
references outside the registry: keras.applications' layer names for the last block, the
input range each family's weights were trained on, and, for the ViT, a hand-computed
layer-wise learning rate per transformer layer. Random weights and small inputs throughout
(no download): the ViT is a tiny preset written by KerasHub itself."""

import json
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import run_module
from research.config import TrainConfig
from research.model import backbones, probe, unfreeze
from research.model.optim import build_optimizer
from research.run.loop import Trainer

NEW = ["mobilenet_v3_small", "mobilenet_v3_large", "resnet50_v2", "efficientnet_v2_b0", "efficientnet_v2_s",
       "convnext_tiny", "convnext_small"]
# The larger siblings share their family's block rule and preprocessing: `slow` (run them with -m slow).
LARGER = ("mobilenet_v3_large", "efficientnet_v2_s", "convnext_small")
ALL = [pytest.param(n, marks=pytest.mark.slow) if n in LARGER else n for n in NEW] + ["vit"]

# The last block of each, by keras.applications' (and KerasHub's) own variable paths, not
# by `block_of`: MobileNetV3's final 1x1 convolution, ResNetV2's last residual block and its
# final BatchNorm, EfficientNet's top convolution, ConvNeXt's last block and its final
# LayerNorm, the ViT's last transformer layer and its final LayerNorm.
LAST_BLOCK = {"mobilenet_v3_small": r"^conv_1(_bn)?/", "mobilenet_v3_large": r"^conv_1(_bn)?/",
              "resnet50_v2": r"^(conv5_block3_|post_bn/)", "efficientnet_v2_b0": r"^top_",
              "efficientnet_v2_s": r"^top_", "convnext_tiny": r"^(convnext_tiny_stage_3_block_2_|layer_normalization)",
              "convnext_small": r"^(convnext_small_stage_3_block_2_|layer_normalization)",
              "vit": r"^(transformer_block_3|ln)/"}

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
VIT_SCALE, VIT_OFFSET = 1 / (255 * STD), -MEAN / STD
# What the first convolution must see for pixels p in [0, 255]: the range each family's
# ImageNet weights were trained on (Keras's documentation of each application; the ViT's
# image converter, as the test preset writes it).
TO_IMAGENET_STATS = lambda p: (p / 255 - MEAN) / STD  # noqa: E731
MINUS_ONE_TO_ONE = lambda p: p / 127.5 - 1  # noqa: E731
# EfficientNetV2's B variants keep V1's ImageNet statistics; S, M and L were trained on p/128 - 1.
WEIGHTS_INPUT = {"mobilenet_v3_small": MINUS_ONE_TO_ONE, "mobilenet_v3_large": MINUS_ONE_TO_ONE,
                 "resnet50_v2": MINUS_ONE_TO_ONE, "efficientnet_v2_b0": TO_IMAGENET_STATS,
                 "efficientnet_v2_s": lambda p: p / 128 - 1, "convnext_tiny": TO_IMAGENET_STATS,
                 "convnext_small": TO_IMAGENET_STATS, "vit": lambda p: p * VIT_SCALE + VIT_OFFSET}


@pytest.fixture(scope="module")
def vit_preset(tmp_path_factory):
    """A 3-layer ViT preset directory (32 px, patch 8), randomly initialised, written by KerasHub."""
    keras_hub = pytest.importorskip("keras_hub", reason="KerasHub is the [hub] extra: pip install -e '.[hub]'")
    path = tmp_path_factory.mktemp("presets") / "vit_tiny"
    keras_hub.models.ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=3, num_heads=2, hidden_dim=16,
                                 mlp_dim=32).save_to_preset(str(path))
    keras_hub.layers.ViTImageConverter(image_size=(32, 32), scale=list(VIT_SCALE),
                                       offset=list(VIT_OFFSET)).save_to_preset(str(path))
    return f"hub:{path}"


@pytest.fixture
def backbone(request):
    return request.getfixturevalue("vit_preset") if request.param == "vit" else request.param


def _key(name):
    return "vit" if name.startswith("hub:") else name


def _pixels(n=2, size=32, seed=0):
    return np.random.RandomState(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


@pytest.mark.parametrize("backbone", ALL, indirect=True)
def test_blocks_are_ordered_contiguous_and_hold_every_variable_once(backbone):
    entry = backbones.get(backbone)
    base = backbones.build_base(backbone, image_size=32)
    block_of, names = entry.block_of(base), backbones.blocks(base, backbone)
    assert names == list(entry.block_names)
    runs = [block_of[layer.name] for layer in base.layers]
    assert [runs[0]] + [b for a, b in zip(runs, runs[1:]) if a != b] == names
    held = [id(v) for layer in base.layers for v in layer.weights]
    assert sorted(held) == sorted(id(v) for v in base.weights)  # nested layers' too, none twice
    # Each block reads only its own layers' outputs and the previous block's output (the tensor
    # `cut` and the probes take): no squeeze-excite, shortcut or downsampling layer is in the
    # wrong block. Tensors made by operations between layers (ConvNeXt's residual `+`) are
    # followed back to the layers or block outputs they are made of.
    outputs = {id(t): b for b, t in backbones.block_outputs(base, backbone).items()}

    def sources(t):
        if id(t) in outputs:
            return {("block", outputs[id(t)])}
        op = t._keras_history.operation
        if op.name in block_of:
            return {("layer", op.name)}
        node = op._inbound_nodes[t._keras_history.node_index]
        return set().union(*(sources(s) for s in node.input_tensors))

    crossings = 0
    for layer in base.layers:
        own = block_of[layer.name]
        for node in layer._inbound_nodes[:1]:  # its call in this base
            for kind, src in set().union(*(sources(t) for t in node.input_tensors)):
                if kind == "layer":
                    assert block_of[src] == own, (src, layer.name)
                elif src != own:
                    crossings += 1
                    assert names.index(own) == names.index(src) + 1, (src, layer.name)
    assert crossings >= len(names) - 1


@pytest.mark.parametrize("backbone", ALL, indirect=True)
def test_top1_trains_exactly_the_last_block_and_frozen_batchnorm_keeps_its_statistics(backbone):
    keras.utils.set_random_seed(0)
    model, base = backbones.build_model(backbone, image_size=32, num_classes=3, dropout=0.0)
    for v in base.weights:  # ConvNeXt's layer scale starts at 1e-6: its block's updates would round away
        if v.path.endswith("layer_scale/variable"):
            v.assign(np.ones(v.shape, v.dtype))
    sel = unfreeze.select(model, backbone, "top:1")
    unfreeze.apply_policy(model, backbone, sel)
    opt = build_optimizer(TrainConfig(optimizer="sgd"), 0.5)
    opt.build(sel.variables)
    trainer = Trainer(model, opt, strategy=tf.distribute.get_strategy())
    trainer.set_trainable(sel.variables)
    x = backbones.get(backbone).preprocess(_pixels(4))
    before = {v.path: v.numpy().copy() for v in base.weights}
    sums, bad = trainer.train(iter(tf.data.Dataset.from_tensors((x, np.array([0, 1, 2, 0]))).repeat()), 1)
    assert bad == -1 and np.isfinite(sums["loss_sum"])
    changed = {v.path for v in base.weights if not np.array_equal(before[v.path], v.numpy())}
    bn = {v.path for _, layer in backbones.leaf_layers(base) if isinstance(layer, keras.layers.BatchNormalization)
          for v in layer.weights}
    last = re.compile(LAST_BLOCK[_key(backbone)])
    expected = {v.path for v in base.trainable_weights + base.non_trainable_weights
                if last.search(v.path) and v.path not in bn}
    # BatchNorm (statistics and gamma/beta) bit-identical everywhere. An attention's key bias has
    # an exactly zero gradient (it shifts all of a query's logits alike), so it may stay put.
    zero_gradient = {p for p in expected if p.endswith("key/bias")}
    assert expected and changed <= expected and expected - changed <= zero_gradient, (expected - changed, changed - expected)


@pytest.mark.parametrize("backbone", ALL, indirect=True)
def test_the_probes_last_tap_is_the_heads_pooled_input(backbone):
    model, base = backbones.build_model(backbone, image_size=32, num_classes=3)
    x = backbones.get(backbone).preprocess(_pixels())
    taps = probe.tap_model(base, backbone)(x)
    pooled = keras.Model(model.input, model.get_layer("head_pool").output)(x)
    assert len(taps) == len(backbones.get(backbone).block_names)
    np.testing.assert_allclose(np.asarray(taps[-1]), np.asarray(pooled), rtol=1e-6, atol=1e-6)
    # And both are what they should be, computed without `pooled`: the mean over the feature
    # map's positions, or the ViT's class token (the first of its sequence).
    out = np.asarray(base(x))
    want = out[:, 0] if backbone.startswith("hub:") else out.mean(axis=(1, 2))
    np.testing.assert_allclose(np.asarray(pooled), want, rtol=1e-5, atol=1e-6)


def _first_conv_input(base):
    """The base up to the input of the layer holding its first convolution (which reads the
    layer before it), without the zero padding some put in front of it."""
    top = next(t for t, leaf in backbones.leaf_layers(base) if isinstance(leaf, keras.layers.Conv2D))
    i = [layer.name for layer in base.layers].index(top)
    before = base.input if i == 1 else base.layers[i - 1].output
    upto = keras.Model(base.input, before)

    def unpadded(x):
        y = np.asarray(upto(x))
        pad = (y.shape[1] - x.shape[1]) // 2
        return y[:, pad:y.shape[1] - pad, pad:y.shape[2] - pad]
    return unpadded


@pytest.mark.parametrize("backbone", ALL, indirect=True)
def test_preprocessing_is_applied_once_in_training_and_in_the_export(backbone):
    from research.serve.export import preprocessing_layers
    base = backbones.build_base(backbone, image_size=32)
    image = np.zeros((1, 32, 32, 3), np.float32)
    image[0, :, 16:] = 255.0  # black and white halves
    image[0, 8:16, :8] = (12.0, 130.0, 250.0)
    want = WEIGHTS_INPUT[_key(backbone)](image.astype(np.float64))
    upto = _first_conv_input(base)
    # A copy: keras.applications' preprocess_input rescales a NumPy array in place.
    np.testing.assert_allclose(upto(backbones.get(backbone).preprocess(image.copy())), want, rtol=1e-5, atol=1e-5)
    exported = image
    for layer in preprocessing_layers(backbone):
        exported = layer(exported)
    np.testing.assert_allclose(upto(exported), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone", [
    "vit", *(pytest.param(n, marks=pytest.mark.slow) for n in NEW)],
    indirect=True)
def test_a_run_exports_and_predict_and_evaluate_give_its_probabilities(backbone, tmp_path, tiny_folder):
    """A run with `auto:2` (relative gradient norms per block) in its second stage; its export,
    `launch.predict` and `launch.evaluate` against the restored model on the training pipeline's
    preprocessing."""
    from research.run.checkpoints import load_run
    from research.serve import export
    wd = tmp_path / "run"
    r = run_module("launch.train", f"--workdir={wd}", f"--dataset=folder:{tiny_folder}", f"--backbone={backbone}",
                   "--image_size=32", "--batch_size=16", "--head_epochs=1", "--finetune_epochs=1",
                   "--unfreeze=auto:2", "--deterministic")
    assert r.returncode == 0, r.stderr[-3000:]
    trainable = json.loads((wd / "trainable.json").read_text())
    chosen = trainable[1]["blocks"]
    assert len(chosen) == 2 and set(chosen) <= set(backbones.get(backbone).block_names), chosen
    assert trainable[1]["normalisation"]["bn"] == "frozen"
    files = sorted(str(p) for p in tiny_folder.glob("*/*"))
    names = json.loads((wd / "export" / "labels.json").read_text())["class_names"]
    # The run's own model on the training pipeline's preprocessing: the probabilities to reproduce.
    _, model, _, _ = load_run(str(wd), checkpoint="latest")
    pixels = np.stack([export.decode_and_resize(tf.io.read_file(f), 32).numpy() for f in files])
    # A copy: keras.applications' preprocess_input rescales a NumPy array in place.
    want = tf.nn.softmax(model(backbones.get(backbone).preprocess(pixels.copy()), training=False)).numpy()

    r = run_module("launch.predict", f"--model={wd / 'export'}", "--json", "--top_k=3", *files[::9])
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.array([[{t["class"]: t["probability"] for t in p["top"]}[c] for c in names]
                    for p in json.loads(r.stdout)["predictions"]])
    np.testing.assert_allclose(got, want[::9], rtol=1e-4, atol=1e-5)
    if backbone.startswith("hub:"):
        from research.model import hub
        hub.layers()  # registers KerasHub's layers and the subclasses for load_model
    keras_model = keras.models.load_model(wd / "export" / "model.keras")
    np.testing.assert_allclose(keras_model(pixels).numpy(), want, rtol=1e-4, atol=1e-5)

    r = run_module("launch.evaluate", f"--workdir={wd}", "--checkpoint=latest", "--split=all", "--name=all")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((wd / "eval" / "all.json").read_text())
    y = np.array([names.index(os.path.basename(os.path.dirname(f))) for f in files])
    assert report["num_examples"] == len(files)
    assert report["accuracy"] == pytest.approx((want.argmax(1) == y).mean(), abs=1e-9)
    assert report["loss"] == pytest.approx(-np.log(want[np.arange(len(y)), y]).mean(), rel=1e-4)


def test_adapt_is_refused_where_there_is_no_batchnorm(tmp_path, vit_preset):
    r = run_module("launch.train", f"--workdir={tmp_path / 'run'}", "--backbone=convnext_tiny", "--bn=adapt")
    assert r.returncode == 2 and "has no BatchNorm layer" in r.stderr and "Traceback" not in r.stderr
    from research.config import ModelConfig, UserError
    with pytest.raises(UserError, match="has no BatchNorm layer"):
        ModelConfig(backbone=vit_preset, bn="adapt").validate()
    ModelConfig(backbone="vgg16", bn="adapt").validate()  # no normalisation at all: accepted, changes nothing


# --- the ViT ----------------------------------------------------------------------------------

def test_vit_blocks_and_top_k(vit_preset):
    assert backbones.get(vit_preset).block_names == ("embed", "block1", "block2", "block3")
    model, base = backbones.build_model(vit_preset, image_size=32, num_classes=3)
    sel = unfreeze.select(model, vit_preset, "top:2")
    paths = {v.path for v in sel.variables} - {v.path for v in unfreeze.head_variables(model)}
    # KerasHub's own paths: the last two transformer layers and the final norm, nothing else.
    assert paths == {v.path for v in base.weights if re.match(r"(transformer_block_[23]|ln)/", v.path)}


def test_vit_layerwise_lr_decay_is_the_hand_computed_rate_per_transformer_layer(vit_preset):
    """One Adam step with `lr_decay_per_block=0.65` moves every variable of transformer layer I
    (of N) by 0.65**(N - I) times the step without decay, the embedding by 0.65**N."""
    decay, n = 0.65, 3

    def step(mult):
        keras.utils.set_random_seed(0)
        model, base = backbones.build_model(vit_preset, image_size=32, num_classes=3, dropout=0.0)
        sel = unfreeze.select(model, vit_preset, "all", lr_decay_per_block=mult)
        opt = build_optimizer(TrainConfig(), 1e-3)
        opt.build(sel.variables)
        trainer = Trainer(model, opt, strategy=tf.distribute.get_strategy())
        trainer.set_trainable(sel.variables, sel.lr_multipliers)
        before = [v.numpy().copy() for v in base.weights]
        x = backbones.get(vit_preset).preprocess(_pixels(4))
        trainer.train(iter(tf.data.Dataset.from_tensors((x, np.array([0, 1, 2, 0]))).repeat()), 1)
        return {v.path: v.numpy() - b for v, b in zip(base.weights, before)}

    plain, decayed = step(1.0), step(decay)
    for path, delta in plain.items():
        layer = re.match(r"transformer_block_(\d+)/", path)
        hand = decay ** (n - int(layer[1])) if layer else 1.0 if path.startswith("ln/") else decay ** n
        np.testing.assert_allclose(decayed[path], hand * delta, rtol=1e-5, atol=2.5e-7, err_msg=path)  # 2 ulps of w ~ 1
    assert any(np.abs(d).max() > 0 for d in plain.values())


def test_hub_without_kerashub_or_with_a_bad_preset_exits_2(tmp_path):
    hidden = tmp_path / "no_hub" / "keras_hub"  # an install without the extra: the import fails
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('No module named keras_hub')\n")
    r = run_module("launch.train", f"--workdir={tmp_path / 'a'}", "--backbone=hub:vit_base_patch16_224_imagenet",
                   env={"PYTHONPATH": str(hidden.parent)})
    assert r.returncode == 2 and "Traceback" not in r.stderr and "pip install -e '.[hub]'" in r.stderr, r.stderr
    pytest.importorskip("keras_hub", reason="KerasHub is the [hub] extra: pip install -e '.[hub]'")
    r = run_module("launch.train", f"--workdir={tmp_path / 'b'}", f"--backbone=hub:{tmp_path / 'no_such_preset'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "could not read KerasHub preset" in r.stderr


def test_vit_base_computes_what_kerashubs_backbone_computes_with_the_presets_weights(vit_preset):
    """`--weights=imagenet` on `hub:` is the preset's own weights, and the base that runs the
    transformer layers one by one computes what KerasHub's `ViTBackbone` does."""
    import keras_hub
    base = backbones.build_base(vit_preset, image_size=32)
    backbones.load_pretrained(base, vit_preset, "imagenet", image_size=32)
    reference = keras_hub.models.Backbone.from_preset(vit_preset[len("hub:"):])
    x = backbones.get(vit_preset).preprocess(_pixels(3))
    np.testing.assert_allclose(np.asarray(base(x)), np.asarray(reference(x)), rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(backbones.build_base(vit_preset, image_size=32)(x)), np.asarray(reference(x)))


def test_a_vit_preset_without_the_patch_bias_is_rebuilt_without_it(tmp_path):
    """KerasHub's embedding layer leaves `use_patch_bias` out of its config; the rebuilt base keeps it."""
    keras_hub = pytest.importorskip("keras_hub", reason="KerasHub is the [hub] extra: pip install -e '.[hub]'")
    path = tmp_path / "no_bias"
    keras_hub.models.ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                 mlp_dim=32, use_patch_bias=False).save_to_preset(str(path))
    keras_hub.layers.ViTImageConverter(image_size=(32, 32), scale=1 / 127.5, offset=-1.0).save_to_preset(str(path))
    name = f"hub:{path}"
    base = backbones.build_base(name, image_size=32)
    backbones.load_pretrained(base, name, "imagenet", image_size=32)
    assert not any(v.path.endswith("patch_embedding/bias") for v in base.weights)
    x = backbones.get(name).preprocess(_pixels(2))
    reference = keras_hub.models.Backbone.from_preset(str(path))
    np.testing.assert_allclose(np.asarray(base(x)), np.asarray(reference(x)), rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # ~55 s; the mechanism's default cases are in tests/test_resume.py
def test_vit_killed_and_resumed_is_bit_identical(vit_preset, tmp_path):
    """LoRA on the attention and MLP layers of the last two transformer layers plus every
    LayerNorm, layer-wise LR decay, SIGKILLed inside that stage: the resume equals the
    uninterrupted run to the bit (checkpoints, best/, history)."""
    from tests.test_resume import BASE, assert_killed_run_resumes_bit_identically
    args = [a for a in BASE if not a.startswith("--image_size")] + [
        "--image_size=32", f"--backbone={vit_preset}",
        "--stages=name=head unfreeze=none epochs=1 lr=3e-3; "
        "name=ft unfreeze=lora:4@top:2+norm epochs=2 lr=1e-3 lr_decay_per_block=0.7"]
    assert_killed_run_resumes_bit_identically(tmp_path, args, 3)


def test_vit_on_two_mirrored_replicas_matches_one_device(vit_preset, tmp_path):
    """Every variable of the ViT, with layer-wise LR decay, trains to the same weights on two
    replicas as on one device. SGD: the attention's key bias has an exactly zero gradient (it
    shifts every logit of a query alike, and softmax ignores that), so what it receives is
    rounding noise, which Adam would scale up to steps of the learning rate's size, differently
    on each device layout."""
    from tests.test_distribute_precision import COMMON, _run_and_compare
    args = [a for a in COMMON if not a.startswith("--image_size")] + [
        "--image_size=32", f"--backbone={vit_preset}", "--unfreeze=all", "--lr_decay_per_block=0.7",
        "--optimizer=sgd", "--finetune_lr=0.05"]
    one = tmp_path / "one"
    r = run_module("launch.train", f"--workdir={one}", "--strategy=default", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    _run_and_compare(one, tmp_path / "two", "--strategy=mirrored", "--cpu_devices=2", *args)
    assert len(json.loads((one / "trainable.json").read_text())[-1]["lr_multipliers"]) > 0


@pytest.mark.slow  # ~60 s: the sweep launcher on the newer backbones, with folds
def test_a_sweep_over_newer_backbones_and_folds(vit_preset, tmp_path):
    """`launch.ablate` sweeps a KerasHub preset (its path in the trial's name made safe) and a
    keras.applications entry, each on two folds of the same pool: a row per trial, and the two
    folds of a backbone validate on different images of the same size."""
    import csv
    r = run_module("launch.ablate", f"--root={tmp_path}", f"--sweep=backbone:mobilenet_v3_small,{vit_preset}",
                   "--sweep=fold:0,1", "--", "--folds=2", "--image_size=32", "--classes=0-2", "--batch_size=32",
                   "--head_epochs=1", "--finetune_epochs=1", "--unfreeze=top:1", "--verbosity=0")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert sorted((row["backbone"], row["fold"]) for row in rows) == sorted(
        (b, f) for b in ("mobilenet_v3_small", vit_preset) for f in ("0", "1"))
    trials = sorted(p for p in (tmp_path / "trials").iterdir() if p.is_dir())
    assert len(trials) == 4  # a preset path would nest directories if its "/" were kept
    results = {t.name: json.loads((t / "results.json").read_text()) for t in trials}
    pool = {r["num_train"] + r["num_val"] for r in results.values()}
    assert len(pool) == 1 and len({r["num_test"] for r in results.values()}) == 1  # one pool, one test split
    for backbone in ("mobilenet_v3_small", "vit"):
        vals = [r["num_val"] for name, r in results.items() if backbone in name]
        assert len(vals) == 2 and sum(vals) == next(iter(pool)), vals  # the folds' validation covers the pool
