"""Exact resume and faults: SIGKILL, SIGTERM, damaged checkpoints, best/ and restore_best_weights."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import ROOT, run_module

# Deterministic, with dropout and random augmentation, so every source of randomness is exercised.
BASE = ["--deterministic", "--image_size=16", "--classes=0-4", "--batch_size=32", "--steps_per_loop=5",
        "--dropout=0.3", "--horizontal_flip", "--rotation=10", "--zoom=0.1", "--checkpoint_keep=10"]
ONE_STAGE = BASE + ["--finetune_epochs=4"]
TWO_STAGES = BASE + ["--stages=name=head unfreeze=none epochs=2 lr=3e-3; name=ft unfreeze=top:2 epochs=2 lr=1e-3"]


def _model_tensors(ckpt_dir):
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(ckpt_dir)))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if "VARIABLE_VALUE" in k and not k.startswith(("meta/", "save_counter/"))}


def _assert_bit_identical(a_dir, b_dir):
    a, b = _model_tensors(a_dir), _model_tensors(b_dir)
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def _start(wd, args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen([sys.executable, "-m", "launch.train", f"--workdir={wd}", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(wd, number, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = os.path.join(wd, "ckpt", "checkpoint")
        if os.path.exists(state) and f"ckpt-{number}\"" in open(state).read():
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError("checkpoint never appeared")


# The recipe options, killed inside the second stage: the BN statistics re-estimated at its
# start (--bn=adapt) and the weight average (--ema_decay) are in the checkpoint, and the mixed
# batches and the class-balanced draws are functions of (seed, epoch, batch); a resume that
# re-estimated, restarted or re-drew any of them would not be bit-identical. (--class_weight,
# which draws nothing, is refused beside --sampler=balanced.)
RECIPE = ["--bn=adapt", "--ema_decay=0.9", "--label_smoothing=0.1", "--mixup=0.4", "--cutmix=1", "--mix_prob=0.8",
          "--sampler=balanced", "--randaugment=2", "--eval_crop=0.875"]


# A union spec with parameters by kind (BatchNorm gamma/beta trained in inference mode),
# killed inside its stage: the optimizer's slots of the norm variables must resume too.
NORM_STAGES = BASE + ["--stages=name=head unfreeze=none epochs=1 lr=3e-3; name=ft unfreeze=top:1+norm epochs=3 lr=1e-3"]
# LoRA factors created before the one optimizer, killed inside the lora: stage, then an
# `all` stage on the same slots.
LORA_STAGES = BASE + ["--stages=name=head unfreeze=none epochs=1 lr=3e-3; name=lora unfreeze=lora:4 epochs=2 lr=3e-3;"
                      " name=all unfreeze=all epochs=1 lr=1e-3"]


# The same on a cut base: the head on two blocks' normalised outputs, block3 dropped; the
# checkpoint holds only the cut model (LoRA factors included), and the resume rebuilds it.
CUT_LORA_STAGES = LORA_STAGES + ["--features=block1+block2"]


# One default case per seam for the 15-minute suite: the single-stage kill is slow (the
# cut-base case kills mid-stage too), as are the norm, whole-base LoRA and recipe cases.
@pytest.mark.parametrize("args,kill_after", [pytest.param(ONE_STAGE, 2, marks=pytest.mark.slow), (TWO_STAGES, 3), pytest.param(NORM_STAGES, 3, marks=pytest.mark.slow),
                                             pytest.param(LORA_STAGES, 3, marks=pytest.mark.slow),
                                             pytest.param(TWO_STAGES + RECIPE, 4, marks=pytest.mark.slow),
                                             (CUT_LORA_STAGES, 3)],
                         ids=["mid-stage", "stage-boundary", "norm-union-mid-stage", "lora-mid-stage",
                              "recipe-options-second-stage", "lora-on-a-cut-base-mid-stage"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, args, kill_after):
    # Save 2 is epoch 2 (one stage); save 3 is the stage-end save after the head stage.
    assert_killed_run_resumes_bit_identically(tmp_path, args, kill_after)


def assert_killed_run_resumes_bit_identically(tmp_path, args, kill_after):
    """An uninterrupted run, and one SIGKILLed once save `kill_after` exists, then resumed:
    the same `ckpt/` and `best/` tensors, final and best records and history."""
    ref = tmp_path / "ref"
    r = run_module("launch.train", f"--workdir={ref}", *args)
    assert r.returncode == 0, r.stderr[-3000:]

    wd = tmp_path / "killed"
    proc = _start(wd, args)
    _wait_for_checkpoint(wd, kill_after, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (wd / "results.json").exists(), "the run finished before it could be killed"

    r = run_module("launch.train", f"--workdir={wd}", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resuming from" in r.stdout
    _assert_bit_identical(ref / "ckpt", wd / "ckpt")
    _assert_bit_identical(ref / "best", wd / "best")  # the same best record, the same weights
    a = json.loads((ref / "results.json").read_text())
    b = json.loads((wd / "results.json").read_text())
    assert a["final"] == b["final"] and a["best"] == b["best"]
    assert [h["val/loss"] for h in a["history"]] == [h["val/loss"] for h in b["history"]]


def test_sigterm_saves_a_resumable_checkpoint_mid_epoch(tmp_path):
    args = BASE + ["--finetune_epochs=6", "--steps_per_loop=1"]
    ref = tmp_path / "ref"
    assert run_module("launch.train", f"--workdir={ref}", *args).returncode == 0
    wd = tmp_path / "term"
    proc = _start(wd, args)
    _wait_for_checkpoint(wd, 1, proc)
    time.sleep(0.3)  # somewhere inside epoch 2
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "interrupted by SIGTERM" in err and "run the same command again to resume" in err
    assert "Traceback" not in err
    meta = _model_meta(wd)
    assert meta["epoch"] >= 1
    r = run_module("launch.train", f"--workdir={wd}", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_bit_identical(ref / "ckpt", wd / "ckpt")


def _model_meta(wd):
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(wd / "ckpt")))
    key = next(k for k in reader.get_variable_to_shape_map() if k.startswith("meta/"))
    return json.loads(reader.get_tensor(key).decode())


def test_damaged_checkpoints_are_never_restored(tmp_path):
    args = ONE_STAGE
    ref = tmp_path / "ref"
    assert run_module("launch.train", f"--workdir={ref}", *args).returncode == 0
    wd = tmp_path / "damaged"
    proc = _start(wd, args)
    _wait_for_checkpoint(wd, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    latest = tf.train.latest_checkpoint(str(wd / "ckpt"))
    data = latest + ".data-00000-of-00001"
    with open(data, "r+b") as f:  # truncate the newest checkpoint's data
        f.truncate(os.path.getsize(data) // 2)
    # Leftovers of a save killed mid-write: a temp folder and an unreferenced index.
    os.makedirs(wd / "ckpt" / "ckpt-99_temp", exist_ok=True)
    (wd / "ckpt" / "ckpt-99_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"\0" * 100)
    (wd / "ckpt" / "ckpt-99.index").write_bytes(b"garbage")
    r = run_module("launch.train", f"--workdir={wd}", *args, "--verbosity=0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "unreadable" in r.stderr and os.path.basename(latest) in r.stderr
    assert "Resuming from" in r.stdout and os.path.basename(latest) + " " not in r.stdout.split("Resuming from")[1][:80]
    _assert_bit_identical(ref / "ckpt", wd / "ckpt")


def _saves(wd):
    """{save number: run state} of every checkpoint kept in ckpt/."""
    out = {}
    for index in (wd / "ckpt").glob("ckpt-*.index"):
        path = str(index)[:-len(".index")]
        reader = tf.train.load_checkpoint(path)
        key = next(k for k in reader.get_variable_to_shape_map() if k.startswith("meta/"))
        out[int(path.rsplit("-", 1)[1])] = json.loads(reader.get_tensor(key).decode())
    return out


def _model_weights(cfg, path):
    from research.run import build as build_lib
    model = build_lib.build(cfg, 5, tf.distribute.get_strategy()).model
    tf.train.Checkpoint(model=model).restore(path).expect_partial().assert_existing_objects_matched()
    return {v.path: v.numpy().copy() for v in model.weights}


# A head stage that learns, then a stage whose learning rate destroys the model: the
# best epoch is in the first stage whatever happens in the second (it was overwritten
# by the second stage's first epoch, and evaluate's default then scored a broken model).
COLLAPSE = ["--image_size=16", "--classes=0-4", "--checkpoint_keep=20", "--noexport",
            "--stages=name=head unfreeze=all epochs=4 lr=3e-3 schedule=constant;"
            "name=ft unfreeze=all epochs=2 lr=0.3 schedule=constant"]


@pytest.mark.parametrize("restore", [False, True], ids=["keep-last", "restore-best"])
def test_best_is_the_best_epoch_of_the_whole_run(tmp_path, restore):
    wd = tmp_path / "run"
    args = COLLAPSE + (["--restore_best_weights"] if restore else [])
    r = run_module("launch.train", f"--workdir={wd}", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((wd / "results.json").read_text())
    losses = [h["val/loss"] for h in res["history"]]
    best_g = int(np.argmin(losses))  # Keras's rule over the whole run: the first minimum of the monitor
    assert res["best"]["global_epoch"] == res["best_epoch"] == best_g + 1  # results.json counts epochs from 1
    assert res["best"]["stage"] == res["best_stage"] == "head", res["history"]
    assert res["best"]["val/loss"] == losses[best_g]
    assert res["best"]["val/accuracy"] == res["history"][best_g]["val/accuracy"] > 0.9
    assert max(h["val/accuracy"] for h in res["history"][4:]) < 0.5  # the collapse happened

    # best/ holds exactly the weights (BN statistics included) of the best epoch's end.
    from research.config import ExperimentConfig
    cfg = ExperimentConfig.from_dict(json.loads((wd / "config.json").read_text()))
    saves = _saves(wd)
    at_best = min(n for n, s in saves.items() if s["global_epoch"] == best_g + 1)
    best = _model_weights(cfg, tf.train.latest_checkpoint(str(wd / "best")))
    expected = _model_weights(cfg, str(wd / "ckpt" / f"ckpt-{at_best}"))
    last_epoch = _model_weights(cfg, str(wd / "ckpt" / f"ckpt-{min(n for n, s in saves.items() if s['global_epoch'] == 6)}"))
    assert best.keys() == expected.keys() and any("moving" in k for k in best)
    for k in best:
        assert np.array_equal(best[k], expected[k]), k
    assert any(not np.array_equal(last_epoch[k], best[k]) for k in best)

    # launch.evaluate's default checkpoint is that record: it reproduces its accuracy.
    r = run_module("launch.evaluate", f"--workdir={wd}", "--name=default")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((wd / "eval" / "default.json").read_text())
    assert report["accuracy"] == pytest.approx(res["best"]["val/accuracy"], abs=1e-9)
    assert report["loss"] == pytest.approx(res["best"]["val/loss"], rel=1e-4)

    final = _model_weights(cfg, tf.train.latest_checkpoint(str(wd / "ckpt")))
    if restore:
        # restore_best_weights ends the run on the best record, not on the second stage's best.
        assert all(np.array_equal(final[k], best[k]) for k in best)
        assert res["final"]["val/accuracy"] == pytest.approx(res["best"]["val/accuracy"], abs=1e-9)
        assert res["final_weights_from"].startswith("best/ckpt-") and "stage head" in res["final_weights_from"]
    else:
        assert all(np.array_equal(final[k], last_epoch[k]) for k in best)
        assert res["final"]["val/accuracy"] < 0.5 and res["final_weights_from"] == "last epoch"


def test_disk_full_is_a_clear_error_and_keeps_previous_checkpoints(tmp_path, monkeypatch):
    from research.run import checkpoints, train as train_lib
    from research.config import DataConfig, ExperimentConfig, StageConfig, TrainConfig

    cfg = ExperimentConfig(data=DataConfig(image_size=16, classes="0-4"), train=TrainConfig(export=False),
                           stages=(StageConfig(epochs=4),))
    real_save = tf.train.CheckpointManager.save
    calls = []

    def failing_save(self, *a, **kw):
        calls.append(self.directory)
        if len([c for c in calls if c.endswith("ckpt")]) == 3:
            raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")
        return real_save(self, *a, **kw)

    monkeypatch.setattr(tf.train.CheckpointManager, "save", failing_save)
    with pytest.raises(checkpoints.StorageError, match="disk full or not writable"):
        train_lib.train_and_evaluate(cfg, str(tmp_path / "run"), verbose=False)
    monkeypatch.setattr(tf.train.CheckpointManager, "save", real_save)
    assert tf.train.latest_checkpoint(str(tmp_path / "run" / "ckpt")).endswith("ckpt-2")
    meta = _model_meta(tmp_path / "run")
    assert meta["epoch"] == 2
    # launch.evaluate's events (written after the checkpoint, in eval/) are not the run's to drop.
    writer = tf.summary.create_file_writer(str(tmp_path / "run" / "eval"))
    with writer.as_default(step=0):
        tf.summary.scalar("accuracy", 0.5)
    writer.close()
    # The run resumes from the intact checkpoint and finishes.
    res = train_lib.train_and_evaluate(cfg, str(tmp_path / "run"), verbose=False)
    assert _scalar_points(tmp_path / "run" / "eval", "accuracy") == [(0, 0.5)]
    assert res["epochs_run"] == 4
    # Epoch 3's summaries were written before its checkpoint failed; the resumed run wrote
    # them again. TensorBoard shows each epoch once, with the values of the run's history.
    for split in ("train", "val"):
        points = _scalar_points(tmp_path / "run" / split, "accuracy")
        assert [step for step, _ in points] == [h["step"] for h in res["history"]], split
        assert [v for _, v in points] == pytest.approx([h[f"{split}/accuracy"] for h in res["history"]], abs=1e-6)


def _scalar_points(logdir, tag):
    """(step, value) of every `tag` event under `logdir`, in step order."""
    points = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for v in event.summary.value:
                if v.tag == tag:
                    points.append((event.step, float(tf.make_ndarray(v.tensor))))
    return sorted(points)


def test_unwritable_workdir_exits_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = run_module("launch.train", f"--workdir={blocker / 'run'}", "--finetune_epochs=1")
    assert r.returncode == 2 and "cannot be created" in r.stderr and "Traceback" not in r.stderr


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_good_checkpoint(tmp_path):
    wd = tmp_path / "nan"
    r = run_module("launch.train", f"--workdir={wd}", "--image_size=16", "--classes=0-4", "--optimizer=sgd",
                   "--stages=name=ok unfreeze=all epochs=1 lr=1e-3; name=boom unfreeze=all epochs=2 lr=1e12")
    assert r.returncode == 3, r.stderr[-2000:]
    assert "non-finite training loss at step" in r.stderr and "stage boom" in r.stderr
    assert "Traceback" not in r.stderr
    meta = _model_meta(wd)
    assert meta["stage"] == 1 and meta["epoch"] == 0  # the stage-end checkpoint of the good stage
    tensors = _model_tensors(wd / "ckpt")
    assert all(np.all(np.isfinite(t)) for t in tensors.values() if t.dtype.kind == "f")
