"""`--features`: the head on one block's output, or on several, instead of the base's top.

Pinned to outside references: the probe's taps (`launch.probe`'s model), the backbone
truncated by hand (its layers applied one by one), numpy's normalisation of the taps,
`model.fit` on the same truncated model, and the exported model's probabilities against
the run's own."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from research.model import backbones, probe, unfreeze
from tests.conftest import run_module


def _features_of(model):
    """What the classifier's head reads: its dropout layer's input."""
    return keras.Model(model.inputs, model.get_layer("head_dropout").input)


def _images(n=6, size=32, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype("float32")


def test_the_cut_models_features_equal_the_probe_tap_and_the_base_truncated_by_hand():
    keras.utils.set_random_seed(3)
    model, whole = backbones.build_model("mobilenet", image_size=32, num_classes=4, alpha=0.25, features="conv_dw_9")
    x = _images()
    pooled = keras.Model(model.inputs, model.get_layer("head_pool_conv_dw_9").output)(x, training=False).numpy()

    taps = probe.tap_model(whole, "mobilenet")
    index = [b for b, _ in probe.tap_layers(whole, "mobilenet")].index("conv_dw_9")
    tap = taps(x, training=False)[index].numpy()
    np.testing.assert_array_equal(pooled, tap)
    # What the head reads: that tap normalised (--features_norm=layer, the default), or as it is (none).
    np.testing.assert_allclose(_features_of(model)(x, training=False).numpy(),
                               (tap - tap.mean(1, keepdims=True)) / np.sqrt(tap.var(1, keepdims=True) + 1e-3),
                               rtol=1e-4, atol=1e-4)
    plain, _ = backbones.build_model("mobilenet", image_size=32, num_classes=4, alpha=0.25, features="conv_dw_9",
                                     norm=False)
    plain.set_weights(model.get_weights())
    ours = _features_of(plain)(x, training=False).numpy()
    np.testing.assert_array_equal(ours, tap)

    # MobileNet is a chain: its layers applied in order, up to conv_dw_9's last, are the truncated base.
    h = tf.constant(x)
    for layer in whole.layers[1:]:
        h = layer(h, training=False)
        if layer.name == "conv_pw_9_relu":
            break
    np.testing.assert_allclose(ours, tf.reduce_mean(h, axis=[1, 2]).numpy(), rtol=1e-5, atol=1e-6)

    # The blocks above are not in the model: not its layers, not its weights.
    base = backbones.base_of(model)
    assert backbones.blocks(base, "mobilenet")[-1] == "conv_dw_9"
    names = {v.path for v in model.weights}
    assert not any("_10" in n or "_11" in n or "_12" in n or "_13" in n for n in names), sorted(names)[-5:]
    assert base.count_params() < whole.count_params() / 2


@pytest.mark.parametrize("norm", [True, False], ids=["layer", "none"])
def test_a_multi_block_heads_input_is_each_taps_normalisation_concatenated(norm):
    keras.utils.set_random_seed(4)
    model, whole = backbones.build_model("small_cnn", image_size=16, num_classes=3, features="block1+block3",
                                         norm=norm)
    x = _images(size=16)
    taps = [t.numpy() for t in probe.tap_model(whole, "small_cnn")(x, training=False)]

    def normalised(t):  # LayerNormalization without parameters, Keras's epsilon (--features_norm=none: as it is)
        return (t - t.mean(1, keepdims=True)) / np.sqrt(t.var(1, keepdims=True) + 1e-3) if norm else t

    np.testing.assert_allclose(_features_of(model)(x, training=False).numpy(),
                               np.concatenate([normalised(taps[0]), normalised(taps[2])], axis=1),
                               rtol=1e-5, atol=1e-5)
    # The head's only variables are the Dense layer's: the normalisation learns nothing.
    assert [v.path for v in unfreeze.head_variables(model)] == ["head/kernel", "head/bias"]


def test_one_epoch_on_a_cut_base_equals_model_fit_on_the_truncated_model():
    from tests.test_loop_matches_fit import fit_and_our_loop

    def cut_model():
        keras.utils.set_random_seed(1)
        model, _ = backbones.build_model("small_cnn", image_size=16, num_classes=10, dropout=0.0, features="block2")
        return model

    ref, ours = fit_and_our_loop(cut_model, "adam", "all")
    assert backbones.blocks(backbones.base_of(ours), "small_cnn") == ["block1", "block2"]
    assert not any(v.path.startswith("block3") for v in ours.weights)
    for a, b, v in zip(ref.get_weights(), ours.get_weights(), ref.weights):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=v.path)


def _checkpoint_shapes(path):
    return {name: tuple(shape) for name, shape in tf.train.list_variables(path) if "VARIABLE_VALUE" in name}


def test_a_cut_run_keeps_no_dropped_variable_and_its_export_gives_its_probabilities(tmp_path, tiny_folder):
    """The dropped blocks' variables are not in the checkpoint (model, base or optimizer
    slots); `results.json` and `trainable.json` say what the head read; evaluate, the
    export and predict agree on the cut model's probabilities."""
    wd = tmp_path / "run"
    r = run_module("launch.train", f"--workdir={wd}", f"--dataset=folder:{tiny_folder}", "--image_size=16",
                   "--batch_size=8", "--features=block1+block2", "--head_epochs=1", "--finetune_epochs=1",
                   "--unfreeze=top:1", "--deterministic")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "features: the head reads block1 + block2" in r.stdout

    # Checkpoints name variables by position: block3 is the only part of small_cnn 128 channels wide.
    for ckpt in ("ckpt", "best"):
        shapes = _checkpoint_shapes(tf.train.latest_checkpoint(str(wd / ckpt)))
        assert (3, 3, 32, 64) in shapes.values() and not any(128 in s for s in shapes.values()), shapes
    slots = [s for n, s in _checkpoint_shapes(tf.train.latest_checkpoint(str(wd / "ckpt"))).items()
             if n.startswith("optimizer/")]
    assert (3, 3, 32, 64) in slots and (96, 3) in slots  # block2's kernel, the head on 32 + 64 channels

    results = json.loads((wd / "results.json").read_text())
    whole = backbones.build_base("small_cnn", image_size=16).count_params()
    cut = backbones.cut(backbones.build_base("small_cnn", image_size=16), "small_cnn", ["block1", "block2"])
    assert results["features"] == {"spec": "block1+block2", "resolved": "block1+block2",
                                   "blocks": ["block1", "block2"], "backbone_params": cut.count_params(),
                                   "whole_backbone_params": whole}
    trainable = json.loads((wd / "trainable.json").read_text())
    assert [t["features"] for t in trainable] == ["block1+block2"] * 2
    assert trainable[1]["blocks"] == ["block2"]  # top:1 of the blocks that remain
    assert trainable[1]["backbone_params"] == cut.count_params()

    from research.run.checkpoints import load_run
    _, model, _, _ = load_run(str(wd), checkpoint="latest")
    assert not any(v.path.startswith("block3") for v in model.weights)
    labels = json.loads((wd / "export" / "labels.json").read_text())
    assert labels["features"] == "block1+block2"
    from research.serve import export
    x = np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 3)).astype("float32")
    expected = export.inference_model(model, "small_cnn")(x).numpy()
    exported = keras.models.load_model(wd / "export" / "model.keras")
    assert not any(v.path.startswith("block3") for v in exported.weights)
    np.testing.assert_allclose(exported(x).numpy(), expected, rtol=1e-5, atol=1e-6)
    sm = tf.saved_model.load(str(wd / "export" / "saved_model")).signatures["predict_float"]
    np.testing.assert_allclose(sm(tf.constant(x))["probabilities"].numpy(), expected, rtol=1e-5, atol=1e-6)

    # launch.predict on image files: the run's model on the same decoded pixels.
    files = sorted(str(p) for p in (tiny_folder / "class 1").glob("*.png"))[:3]
    r = run_module("launch.predict", f"--model={wd / 'export'}", "--json", "--top_k=3", *files)
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.array([[{t["class"]: t["probability"] for t in p["top"]}[c] for c in labels["class_names"]]
                    for p in json.loads(r.stdout)["predictions"]])
    pixels = np.stack([export.decode_and_resize(tf.io.read_file(f), 16).numpy() for f in files])
    np.testing.assert_allclose(got, export.inference_model(model, "small_cnn")(pixels).numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # ~45 s
def test_auto_reads_the_block_the_probes_peak_at_and_a_resumed_run_keeps_it(tmp_path, tiny_folder):
    """`--features=auto` picks the block `launch.probe` finds the validation peak at (its
    own probe curve, an outside run), records it, and a resume rebuilds it without measuring."""
    weights = tmp_path / "pretrained.weights.h5"  # auto reads pretrained features: refused on random ones
    backbones.build_base("small_cnn", image_size=16).save_weights(weights)
    args = [f"--dataset=folder:{tiny_folder}", "--image_size=16", "--batch_size=8", "--deterministic",
            f"--weights={weights}"]
    r = run_module("launch.probe", f"--out={tmp_path / 'probe'}", "--", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    import csv
    rows = list(csv.DictReader(open(tmp_path / "probe" / "probe.csv")))
    best = max(float(row["val_accuracy"]) for row in rows)
    peak = next(row["block"] for row in rows if float(row["val_accuracy"]) >= best)

    # Killed after its first checkpoint, the run resumes with the recorded choice, not a new
    # measurement, and ends as the run naming that block does, to the bit: measuring drew
    # nothing from the run's random streams.
    from tests.test_resume import _assert_bit_identical, _start, _wait_for_checkpoint
    stages = ["--head_epochs=1", "--finetune_epochs=2", "--unfreeze=top:1"]
    named = tmp_path / "named"
    r = run_module("launch.train", f"--workdir={named}", *args, f"--features={peak}", *stages)
    assert r.returncode == 0, r.stderr[-3000:]
    wd = tmp_path / "run"
    proc = _start(wd, [*args, "--features=auto", *stages])
    _wait_for_checkpoint(wd, 1, proc)
    proc.kill()
    assert f"features: auto chose {peak}" in proc.communicate()[0]
    r = run_module("launch.train", f"--workdir={wd}", *args, "--features=auto", *stages)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resuming from" in r.stdout and "auto chose" not in r.stdout
    _assert_bit_identical(named / "ckpt", wd / "ckpt")
    record = json.loads((wd / "results.json").read_text())["features"]
    assert record["resolved"] == peak and record["blocks"] == [peak]
    assert record["scores"] == pytest.approx({row["block"]: float(row["val_accuracy"]) for row in rows})
    # The run's own export, at its end, rebuilt the cut model from the checkpoint's record.
    assert json.loads((wd / "export" / "labels.json").read_text())["features"] == peak


def _base_weights(workdir, checkpoint="best"):
    from research.run.checkpoints import load_run
    _, model, _, _ = load_run(str(workdir), checkpoint=checkpoint)
    return {v.path: v.numpy() for v in backbones.base_of(model).weights}


@pytest.mark.slow  # 3 runs and 2 refusals, ~25 s on 2 cores
def test_another_runs_backbone_loads_into_a_cut_base_and_a_cut_run_gives_only_what_it_kept(tmp_path):
    """`--weights=ckpt:` from a whole run into a cut one, and from a cut run with `--init_blocks`:
    the kept blocks start as the other run's, to the bit. A run keeping blocks the other dropped,
    and a changed `--features` on resume, are refused."""
    common = ["--image_size=16", "--classes=0-2", "--noexport", "--finetune_epochs=1"]
    r = run_module("launch.train", f"--workdir={tmp_path / 'whole'}", *common, "--unfreeze=all")
    assert r.returncode == 0, r.stderr[-3000:]
    # Head only, BatchNorm frozen: the cut base ends as it started.
    r = run_module("launch.train", f"--workdir={tmp_path / 'cut'}", *common, "--features=block2", "--unfreeze=none",
                   f"--weights=ckpt:{tmp_path / 'whole'}")
    assert r.returncode == 0, r.stderr[-3000:]
    whole, cut = _base_weights(tmp_path / "whole"), _base_weights(tmp_path / "cut", "latest")
    assert set(cut) == {p for p in whole if not p.startswith("block3")}
    for path, value in cut.items():
        np.testing.assert_array_equal(value, whole[path], err_msg=path)

    r = run_module("launch.train", f"--workdir={tmp_path / 'more'}", *common, f"--weights=ckpt:{tmp_path / 'cut'}")
    assert r.returncode == 2 and "that run's model stops at its --features (block2), below block3" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_module("launch.train", f"--workdir={tmp_path / 'first'}", *common, "--features=block1", "--unfreeze=none",
                   f"--weights=ckpt:{tmp_path / 'cut'}", "--init_blocks=1")
    assert r.returncode == 0, r.stderr[-3000:]
    first = _base_weights(tmp_path / "first", "latest")
    assert set(first) == {p for p in whole if p.startswith("block1")}
    for path, value in first.items():
        np.testing.assert_array_equal(value, cut[path], err_msg=path)

    r = run_module("launch.train", f"--workdir={tmp_path / 'cut'}", *common, "--features=block1", "--unfreeze=none",
                   f"--weights=ckpt:{tmp_path / 'whole'}", "--allow_config_change")
    assert r.returncode == 2 and "model.features: 'block2' -> 'block1'" in r.stderr, r.stderr[-2000:]
