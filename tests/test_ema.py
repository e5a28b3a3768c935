"""`--ema_decay`: Keras's optimizer EMA against its closed-form recurrence, and in a run."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from research.model import backbones, unfreeze
from research.run.actions import ema
from research.config import StageConfig, TrainConfig
from research.run.loop import Trainer
from research.model.optim import StageSchedule, build_optimizer
from tests.conftest import run_module


def test_the_average_is_the_closed_form_recurrence_over_every_built_variable():
    keras.utils.set_random_seed(0)
    base = backbones.build_base("small_cnn", image_size=16)
    model = backbones.build_classifier(base, 4, dropout=0.0)
    every = unfreeze.select(model, "small_cnn", "all")
    head = unfreeze.select(model, "small_cnn", "none")
    schedule = StageSchedule()
    schedule.set_stage(StageConfig(lr=0.05, epochs=1, schedule="constant"), start_step=0, steps_per_epoch=6)
    decay = 0.8
    optimizer = build_optimizer(TrainConfig(optimizer="sgd", ema_decay=decay), schedule)
    optimizer.build(every.variables)  # the run builds on every stage's union
    trainer = Trainer(model, optimizer, strategy=tf.distribute.get_strategy())
    unfreeze.apply_policy(model, "small_cnn", head)
    trainer.set_trainable(head.variables)  # a head-only stage: the base does not move

    rng = np.random.RandomState(0)
    x = rng.uniform(-1, 1, (48, 16, 16, 3)).astype(np.float32)
    y = rng.randint(0, 4, 48).astype(np.int32)
    it = iter(tf.data.Dataset.from_tensor_slices((x, y)).batch(8))
    expected = None
    for _ in range(6):
        trainer.train(it, 1)
        w = [v.numpy().astype(np.float64) for v in every.variables]
        # Keras's EMA: the first step copies the weights, then a <- d a + (1 - d) w.
        expected = w if expected is None else [decay * a + (1 - decay) * b for a, b in zip(expected, w)]
    pairs = ema.pairs(optimizer)
    assert [v.path for v, _ in pairs] == [v.path for v in every.variables]
    for (v, average), e in zip(pairs, expected):
        np.testing.assert_allclose(average.numpy(), e, rtol=1e-5, atol=1e-6, err_msg=v.path)
    head_paths = {v.path for v in head.variables}
    moved = [v.path for v, a in pairs if not np.allclose(a.numpy(), v.numpy())]
    assert moved and set(moved) <= head_paths  # a frozen variable's average is its value

    # After restore_best_weights the controller restarts the average from the restored weights.
    saved = [a.numpy().copy() for _, a in pairs]
    ema.reset_to_weights(optimizer)
    assert all(np.array_equal(a.numpy(), v.numpy()) for v, a in pairs)
    for (_, a), value in zip(pairs, saved):
        a.assign(value)
    # Swapping in scores the average and gives the trained weights back exactly.
    trained = [v.numpy().copy() for v, _ in pairs]
    with ema.swapped_in(optimizer):
        assert all(np.array_equal(v.numpy(), a.numpy()) for v, a in pairs)
    assert all(np.array_equal(v.numpy(), t) for (v, _), t in zip(pairs, trained))


def test_a_run_monitors_the_average_and_keeps_it_in_best(tmp_path):
    wd = tmp_path / "run"
    r = run_module("launch.train", f"--workdir={wd}", "--image_size=16", "--classes=0-4", "--epochs=3", "--noexport",
                   "--ema_decay=0.9", "--early_stopping_monitor=val_ema/accuracy", "--early_stopping_mode=max",
                   "--restore_best_weights")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((wd / "results.json").read_text())
    assert all({"val_ema/loss", "val_ema/accuracy"} <= set(h) for h in res["history"])
    assert any(h["val_ema/accuracy"] != h["val/accuracy"] for h in res["history"])
    best = res["best"]
    assert best["weights"] == "ema" and best["monitor"] == "val_ema/accuracy"
    assert best["value"] == max(h["val_ema/accuracy"] for h in res["history"])
    assert {"test/accuracy", "test_ema/accuracy", "val_ema/accuracy"} <= set(res["final"])
    # restore_best_weights put best/'s averaged weights back and restarted the average from them:
    # the trained and the averaged weights are then one and the same.
    assert res["final"]["val_ema/accuracy"] == res["final"]["val/accuracy"] == best["val_ema/accuracy"]
    assert res["final"]["test_ema/accuracy"] == res["final"]["test/accuracy"]
    # best/ holds the averaged weights: evaluating it reproduces the averaged weights' scores.
    for split, key in (("val", "val_ema/accuracy"), ("test", "test/accuracy")):
        r = run_module("launch.evaluate", f"--workdir={wd}", f"--split={split}", f"--name=best_{split}")
        assert r.returncode == 0, r.stderr[-2000:]
        report = json.loads((wd / "eval" / f"best_{split}.json").read_text())
        assert report["accuracy"] == pytest.approx(best[key], abs=1e-9), split
    assert list((wd / "val_ema").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("flags,message", [(["--ema_decay=1"], "--ema_decay=1.0 must be in [0, 1)"),
                                           (["--early_stopping_monitor=val_ema/loss"], "needs --ema_decay"),
                                           (["--ema_decay=0.9", "--head_epochs=1", "--lr_decay_per_block=0.5"],
                                            "lr_decay_per_block is not supported"),
                                           (["--ema_decay=0.9", "--base_lr_ratio=0.1"],
                                            "base_lr_ratio is not supported")])
def test_bad_ema_flags_exit_2(tmp_path, flags, message):
    r = run_module("launch.train", f"--workdir={tmp_path / 'run'}", *flags)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-1000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # a run, evaluate and an export
def test_the_final_average_is_saved_in_ema_and_exported(tmp_path):
    wd = tmp_path / "run"
    r = run_module("launch.train", f"--workdir={wd}", "--image_size=16", "--classes=0-4", "--epochs=2", "--noexport",
                   "--ema_decay=0.9")
    assert r.returncode == 0, r.stderr[-3000:]
    final = json.loads((wd / "results.json").read_text())["final"]
    assert final["test_ema/accuracy"] != final["test/accuracy"]  # else the check below tells nothing
    r = run_module("launch.evaluate", f"--workdir={wd}", "--checkpoint=ema", "--split=test", "--name=ema")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((wd / "eval" / "ema.json").read_text())
    assert report["accuracy"] == pytest.approx(final["test_ema/accuracy"], abs=1e-9)
    r = run_module("launch.export", f"--workdir={wd}", "--checkpoint=ema", f"--out={tmp_path / 'export'}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "/ema/" in json.loads((tmp_path / "export" / "labels.json").read_text())["checkpoint"]


def test_ema_checkpoint_of_a_run_without_ema_exits_2(tmp_path):
    wd = tmp_path / "run"
    assert run_module("launch.train", f"--workdir={wd}", "--image_size=16", "--classes=0-1", "--epochs=1",
                      "--noexport").returncode == 0
    r = run_module("launch.export", f"--workdir={wd}", "--checkpoint=ema")
    assert r.returncode == 2 and "--ema_decay" in r.stderr and "Traceback" not in r.stderr, r.stderr[-1000:]
