"""Which blocks to unfreeze, before the sweep: taps, probes, RGN, auto:K, --log_block_grads."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from research.model import backbones, probe
from research.run.loop import Trainer
from research.model.optim import build_optimizer
from research.config import TrainConfig
from tests.conftest import run_module


@pytest.mark.parametrize("backbone,size", [("small_cnn", 16), ("mobilenet", 32), ("inception_v3", 75)])
def test_a_tap_is_the_backbone_truncated_at_its_block(backbone, size):
    keras.utils.set_random_seed(0)
    base = backbones.build_base(backbone, image_size=size, alpha=0.25 if backbone == "mobilenet" else 1.0)
    taps = probe.tap_model(base, backbone)
    x = tf.constant(np.random.RandomState(0).uniform(-1, 1, (3, size, size, 3)).astype("float32"))
    outs = taps(x, training=False)
    pairs = probe.tap_layers(base, backbone)
    assert [b for b, _ in pairs] == backbones.blocks(base, backbone) and len(outs) == len(pairs)
    for (block, layer), out in zip(pairs, outs):
        # Model surgery: a new model from the input to the block's last layer, pooled.
        truncated = keras.Model(base.inputs, base.get_layer(layer).output)
        expected = tf.reduce_mean(truncated(x, training=False), axis=[1, 2])
        np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5, err_msg=block)
    # Block boundaries named independently of the block map: a block ends where the next begins.
    known = {"small_cnn": {"block1": "block1_pool", "block3": "block3_relu"},
             "mobilenet": {"stem": "conv1_relu", "conv_dw_1": "conv_pw_1_relu", "conv_dw_13": "conv_pw_13_relu"},
             "inception_v3": {"mixed0": "mixed0", "mixed10": "mixed10"}}[backbone]
    assert {b: layer for b, layer in pairs if b in known} == known
    # The last tap is the base's own pooled output.
    np.testing.assert_allclose(outs[-1].numpy(), tf.reduce_mean(base(x), axis=[1, 2]).numpy(), atol=1e-5)


@pytest.mark.parametrize("backbone,size", [("vgg16", 32), ("mobilenet_v2", 32), ("resnet50", 32),
                                           ("efficientnet_b0", 32), ("xception", 71)])
@pytest.mark.slow  # builds five full-size backbones
def test_every_backbone_has_one_tap_per_block(backbone, size):
    base = backbones.build_base(backbone, image_size=size)
    taps = probe.tap_model(base, backbone)
    x = tf.zeros([1, size, size, 3])
    outs = taps(x, training=False)
    assert len(outs) == len(backbones.blocks(base, backbone)) and all(o.shape[1] > 0 for o in outs)
    np.testing.assert_allclose(outs[-1].numpy(), tf.reduce_mean(base(x, training=False), axis=[1, 2]).numpy(),
                               atol=1e-5)


def test_the_probe_peaks_at_the_block_the_label_comes_from():
    """Labels are a linear function of block1's pooled output: block1's probe reads them
    exactly, deeper blocks (random weights, ReLU, pooling) only partly."""
    keras.utils.set_random_seed(1)
    base = backbones.build_base("small_cnn", image_size=16)
    taps = probe.tap_model(base, "small_cnn")
    rng = np.random.RandomState(0)
    x = rng.uniform(-1, 1, (900, 16, 16, 3)).astype("float32")
    first = taps(x, training=False)[0].numpy()
    score = first @ rng.normal(size=first.shape[1])
    y = (score > np.median(score)).astype(np.int64)
    feats = [f.numpy() for f in taps(x, training=False)]
    split = {"train": slice(0, 600), "val": slice(600, 750), "test": slice(750, 900)}
    rows = probe.probe_curve({k: [f[s] for f in feats] for k, s in split.items()},
                             {k: y[s] for k, s in split.items()}, ["block1", "block2", "block3"], log=lambda t: None)
    accs = [r["val_accuracy"] for r in rows]
    assert int(np.argmax(accs)) == 0 and accs[0] >= 0.95, accs
    assert accs[2] < accs[0] - 0.05, accs
    assert rows[0]["test_lo"] <= rows[0]["test_accuracy"] <= rows[0]["test_hi"]
    assert probe.choose_by_probe(rows, ["block1", "block2", "block3"], 1) == ["block2"]  # the block above the peak


def test_wilson_interval_matches_the_closed_form():
    lo, hi = probe.wilson(80, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.7112, 0.8666)  # statsmodels' proportion_confint(80, 100, method="wilson")


def _tiny():
    keras.utils.set_random_seed(2)
    base = backbones.build_base("small_cnn", image_size=8)
    model = backbones.build_classifier(base, 3, dropout=0.0)
    rng = np.random.RandomState(3)
    batches = [(rng.uniform(-1, 1, (6, 8, 8, 3)).astype("float32"), rng.randint(0, 3, 6)) for _ in range(2)]
    return model, batches


def _hand_block_grads(model, batches):
    """Mean gradient over the batches, by an independent tape, squared norms per block in numpy."""
    by_block = probe.block_variables(model, "small_cnn")
    variables = [v for vs in by_block.values() for v in vs]
    total = [np.zeros(v.shape) for v in variables]
    for x, y in batches:
        with tf.GradientTape() as tape:
            loss = keras.losses.sparse_categorical_crossentropy(y, model(x, training=False), from_logits=True)
            loss = tf.reduce_mean(loss)
        for t, g in zip(total, tape.gradient(loss, variables)):
            t += g.numpy()
    out, i = {}, 0
    for block, vs in by_block.items():
        g2 = sum(np.sum((total[i + j] / len(batches)) ** 2) for j in range(len(vs)))
        w2 = sum(np.sum(v.numpy().astype(np.float64) ** 2) for v in vs)
        out[block] = (g2, w2)
        i += len(vs)
    return out


def test_rgn_equals_a_hand_computed_value():
    model, batches = _tiny()
    hand = _hand_block_grads(model, batches)
    rgn = probe.relative_gradient_norms(model, "small_cnn", [(tf.constant(x), tf.constant(y)) for x, y in batches])
    assert set(rgn) == {"block1", "block2", "block3"}
    for block, (g2, w2) in hand.items():
        assert rgn[block] == pytest.approx(np.sqrt(g2) / np.sqrt(w2), rel=1e-4), block
    assert probe.choose_by_rgn(rgn, ["block1", "block2", "block3"], 2) == sorted(
        sorted(rgn, key=rgn.get)[-2:], key=["block1", "block2", "block3"].index)


def test_block_grad_sums_of_the_step_equal_the_hand_computed_norms_and_trace_once():
    """One step per batch at learning rate 0 (no update): the step's per-block squared
    gradient norms equal an independent tape's; the step is traced once for both calls."""
    model, batches = _tiny()
    model.get_layer("head_dropout").rate = 0.0
    hand = [_hand_block_grads(model, [b]) for b in batches]
    by_block = probe.block_variables(model, "small_cnn")
    block_of = {v.path: i for i, vs in enumerate(by_block.values()) for v in vs}
    variables = [v for vs in by_block.values() for v in vs] + model.get_layer("head").trainable_weights
    opt = build_optimizer(TrainConfig(optimizer="sgd", momentum=0.0), 0.0)
    opt.build(variables)
    for layer in model.layers:
        layer.trainable = True
    trainer = Trainer(model, opt, strategy=tf.distribute.get_strategy())
    trainer.set_trainable(variables)
    trainer.track_blocks(block_of, 3)
    # Inference-mode forward pass in the step too, for the comparison: BN frozen, no dropout.
    for layer in backbones.base_of(model).layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    trainer.set_trainable(variables)
    trainer.track_blocks(block_of, 3)
    for x, y in batches:
        it = iter(tf.data.Dataset.from_tensors((x, y.astype(np.int32))))
        trainer.train(it, 1)
    sums, steps = trainer.take_block_sums()
    assert steps == 2 and trainer.tracing_count() == 1
    expected = [sum(h[b][0] for h in hand) for b in ("block1", "block2", "block3")]
    np.testing.assert_allclose(sums, expected, rtol=1e-4)


@pytest.mark.slow  # several runs; keeps the default suite under 15 min
def test_auto_k_picks_k_blocks_deterministically_and_says_why(tmp_path):
    args = ["--image_size=16", "--classes=0-4", "--head_epochs=1", "--finetune_epochs=1", "--noexport"]
    chosen = []
    for name, spec in (("a", "auto:2"), ("b", "auto:2"), ("p", "auto:probe:1")):
        r = run_module("launch.train", f"--workdir={tmp_path / name}", *args, f"--unfreeze={spec}")
        assert r.returncode == 0, r.stderr[-3000:]
        records = json.loads((tmp_path / name / "trainable.json").read_text())
        ft = records[-1]
        assert ft["auto"]["spec"] == spec and set(ft["auto"]["scores"]) == {"block1", "block2", "block3"}
        assert len(ft["blocks"]) == int(spec[-1]) and ft["spec"] == "blocks:" + ",".join(ft["blocks"])
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert results["auto_unfreeze"][0]["blocks"] == ft["blocks"]
        chosen.append((ft["blocks"], ft["auto"]["scores"]))
    assert chosen[0] == chosen[1]  # the same seed: the same scores and blocks
    assert chosen[0][1] != chosen[2][1]  # RGN and probe accuracies are different measurements


def test_bad_auto_specs_exit_2(tmp_path):
    for spec, message in (("auto:9", "K=9 is not in 1..3"), ("auto:fisher:2", "auto specs are auto:K")):
        r = run_module("launch.train", f"--workdir={tmp_path / 'r'}", "--image_size=16", f"--unfreeze={spec}")
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]


@pytest.mark.slow  # several runs; keeps the default suite under 15 min
def test_log_block_grads_changes_no_weight(tmp_path):
    args = ["--image_size=16", "--classes=0-4", "--deterministic", "--head_epochs=1", "--finetune_epochs=2",
            "--unfreeze=top:2", "--noexport"]
    for name, extra in (("plain", []), ("logged", ["--log_block_grads"])):
        r = run_module("launch.train", f"--workdir={tmp_path / name}", *args, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
    a = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(tmp_path / "plain" / "ckpt")))
    b = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(tmp_path / "logged" / "ckpt")))
    keys = [k for k in a.get_variable_to_shape_map() if "VARIABLE_VALUE" in k and not k.startswith(("meta/", "save"))]
    assert len(keys) > 10 and all(np.array_equal(a.get_tensor(k), b.get_tensor(k)) for k in keys)
    history = json.loads((tmp_path / "logged" / "results.json").read_text())["history"]
    ft = history[-1]
    assert ft["train/block_rgn/block1"] == 0.0 and ft["train/block_change/block1"] == 0.0  # frozen in top:2
    assert ft["train/block_rgn/block3"] > 0 and ft["train/block_change/block3"] > 0


@pytest.mark.slow  # several runs; keeps the default suite under 15 min
def test_launch_probe_writes_its_table_plot_and_scalars(tmp_path):
    r = run_module("launch.probe", f"--out={tmp_path}", "--", "--image_size=16", "--classes=0-4")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "probe.json").read_text())["rows"]
    assert [row["block"] for row in rows] == ["block1", "block2", "block3"]
    assert all(0 <= row["val_accuracy"] <= 1 and "test_accuracy" in row for row in rows)
    assert (tmp_path / "probe.png").stat().st_size > 1000 and "| depth | block |" in (tmp_path / "probe.md").read_text()
    assert list(tmp_path.glob("events.out.tfevents.*"))
    assert "do not sum to one" not in r.stderr  # scikit-learn's warning, once per C and block before
    # It ends with its conclusion: the peak, and what auto:probe:K would unfreeze.
    from research.model.probe import choose_by_probe
    peak = max(rows, key=lambda row: row["val_accuracy"])["block"]
    last = r.stdout.strip().splitlines()[-3]
    assert last.startswith(f"peak: {peak} (validation accuracy "), r.stdout[-1000:]
    assert f"auto:probe:1 -> {choose_by_probe(rows, ['block1', 'block2', 'block3'], 1)[0]}" in last
    # Over the memory budget, the features go to disk and are read back memory-mapped: the same probes.
    r = run_module("launch.probe", f"--out={tmp_path / 'disk'}", "--max_memory_mb=0", "--", "--image_size=16",
                   "--classes=0-4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "disk" / "probe.json").read_text())["rows"] == rows
    assert len(list((tmp_path / "disk" / "features" / "train").glob("*.npy"))) == 3


@pytest.mark.slow  # 9 runs and the probes, ~90 s on 2 cores
def test_probe_study_judges_auto_specs_against_the_sweep(tmp_path):
    root = tmp_path / "study"
    r = run_module("launch.ablate", "--study=probe", f"--root={root}", "--seeds=0,1", "--specs=none,top:1,all",
                   "--auto=auto:1", "--", "--image_size=16", "--classes=0-4", "--head_epochs=1",
                   "--finetune_epochs=1", "--batch_size=32")
    assert r.returncode == 0, r.stderr[-3000:]
    report = (root / "probe_study.md").read_text()
    assert "| 3 | block3 |" in report and "`auto:1`" in report and (root / "probe_study.png").exists()
    acc, blocks = {}, {}
    for spec in ("none", "top_1", "all", "auto_1"):
        for seed in (0, 1):
            res = json.loads((root / "trials" / f"unfreeze-{spec}__seed-{seed}" / "results.json").read_text())
            acc[spec, seed] = res["final"]["test/accuracy"]
            if spec == "auto_1":
                blocks[seed] = res["auto_unfreeze"][0]["blocks"]
    means = {s: (acc[s, 0] + acc[s, 1]) / 2 for s in ("none", "top_1", "all")}
    best = max(means, key=means.get)
    line = next(ln for ln in report.splitlines() if ln.startswith("| `auto:1`"))
    assert f"0: {','.join(blocks[0])}; 1: {','.join(blocks[1])}" in line
    diff = ((acc["auto_1", 0] - acc[best, 0]) + (acc["auto_1", 1] - acc[best, 1])) / 2
    assert f"{diff:+.4f}" in line


@pytest.mark.slow
def test_auto_rgn_under_mirrored_equals_one_device(tmp_path):
    """Two mirrored CPU replicas score every block as one device does, so they choose the same blocks."""
    args = ["--image_size=16", "--classes=0-4", "--head_epochs=1", "--finetune_epochs=1", "--noexport",
            "--unfreeze=auto:2", "--dropout=0", "--batch_size=32"]
    scores = {}
    for name, extra in (("one", ["--strategy=default"]), ("two", ["--strategy=mirrored", "--cpu_devices=2"])):
        r = run_module("launch.train", f"--workdir={tmp_path / name}", *args, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        scores[name] = json.loads((tmp_path / name / "results.json").read_text())["auto_unfreeze"][0]
    assert scores["one"]["blocks"] == scores["two"]["blocks"]
    for block, value in scores["one"]["scores"].items():
        assert scores["two"]["scores"][block] == pytest.approx(value, rel=1e-3), block


@pytest.mark.parametrize("spec", [pytest.param("auto:1+norm", marks=pytest.mark.slow), "lora:2@auto:1+norm"])
def test_an_auto_part_of_a_union_is_chosen_and_the_rest_kept(tmp_path, spec):
    """`auto:1+norm` (`lora:2@auto:1+norm`): the auto part is chosen at the stage's start as alone,
    and the stage trains the chosen block (its LoRA factors) and every BatchNorm gamma/beta;
    trainable.json names the union it resolved to."""
    r = run_module("launch.train", f"--workdir={tmp_path}", "--image_size=16", "--classes=0-4", "--head_epochs=1",
                   "--finetune_epochs=1", "--noexport", f"--unfreeze={spec}")
    assert r.returncode == 0, r.stderr[-3000:]
    ft = json.loads((tmp_path / "trainable.json").read_text())[-1]
    assert ft["auto"]["spec"] == spec and len(ft["auto"]["scores"]) == 3
    chosen = max(ft["auto"]["scores"], key=ft["auto"]["scores"].get)
    assert ft["parameter_kinds"]["norm"] == {"variables": 6, "params": 448}
    if spec.startswith("lora"):
        assert ft["spec"] == f"lora:2@blocks:{chosen}+norm" and ft["blocks"] == []
        assert set(ft["parameter_kinds"]["lora"]) == {"variables", "params", "skipped_layers"}
        assert {f"{chosen}_conv/lora_kernel_a", f"{chosen}_conv/lora_kernel_b"} <= set(ft["variables"])
        assert f"{chosen}_conv/kernel" not in ft["variables"]
    else:
        assert ft["spec"] == f"blocks:{chosen}+norm" and ft["blocks"] == [chosen]
        assert f"{chosen}_conv/kernel" in ft["variables"]
