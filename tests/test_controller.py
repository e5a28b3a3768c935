"""The controller's seams: user errors leave no trace, resume never needs the init source,
one source of defaults, the workdir lock, config changes, paths, file modes, reported
metrics against an independent evaluation."""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT, run_module

SMALL = ["--image_size=16", "--classes=0-4", "--batch_size=32", "--noexport"]


def _results(wd):
    return json.loads((wd / "results.json").read_text())


# --- 1. a user error writes nothing -----------------------------------------------------------

def test_a_user_error_leaves_the_workdir_usable(tmp_path):
    wd = tmp_path / "run"
    r = run_module("launch.train", f"--workdir={wd}", *SMALL, "--epochs=1", "--unfreeze=top:9")
    assert r.returncode == 2 and "valid blocks of small_cnn" in r.stderr, r.stderr[-2000:]
    assert not wd.exists()  # nothing written: not even the directory
    # The corrected command in the same workdir runs (it was refused as "a different config").
    r = run_module("launch.train", f"--workdir={wd}", *SMALL, "--epochs=1", "--unfreeze=top:2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert _results(wd)["stages"][0]["unfreeze"] == "top:2"


def test_bad_flags_are_reported_before_tensorflow_is_imported():
    code = ("import sys\nfrom launch.train import config_from_args\nfrom research.errors import UserError\n"
            "for args in (['--lr=-1'], ['--unfreeze=top2'], ['--dataset=folder:/nonexistent'], ['--head_epochs=-1'],"
            " ['--alpha=0.5'], ['--epochs=2', '--head_epochs=1'], ['--warmup_epochs=3', '--epochs=2']):\n"
            "    try:\n        config_from_args(args)\n        print('accepted', args)\n"
            "    except UserError as e:\n        print('error', e)\n"
            "print('tensorflow imported:', 'tensorflow' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1] == "tensorflow imported: False"
    assert not any(line.startswith("accepted") for line in lines), lines
    assert "lr=-1.0 must be a finite number > 0" in r.stdout
    assert "--head_epochs=-1 must be >= 0" in r.stdout
    assert "backbone 'small_cnn' has no width multiplier" in r.stdout
    assert "warmup_epochs=3.0 must be in [0, epochs=2]" in r.stdout


# --- 3. resume never reads the init source ----------------------------------------------------

class _StopAfterFirstSave:
    """A Preemption stand-in: 'signals' once the run has saved checkpoint number `after`."""

    def __init__(self, wd, after=1):
        self.state = wd / "ckpt" / "checkpoint"
        self.after = after

    @property
    def signum(self):
        return signal.SIGTERM if self.state.exists() and f'ckpt-{self.after}"' in self.state.read_text() else 0


@pytest.mark.parametrize("source", ["ckpt", "file"])
def test_resume_never_reads_the_init_source(tmp_path, source):
    from research.model import backbones
    from research import errors
    from research.run import train as train_lib
    from research.config import DataConfig, ExperimentConfig, ModelConfig, StageConfig, TrainConfig

    def cfg(weights, epochs):
        return ExperimentConfig(data=DataConfig(image_size=16, classes="0-4"),
                                model=ModelConfig(weights=weights), train=TrainConfig(export=False),
                                stages=(StageConfig(epochs=epochs),))

    if source == "ckpt":
        init = tmp_path / "A"
        train_lib.train_and_evaluate(cfg("none", 1), str(init), verbose=False)
        weights = f"ckpt:{init}"
    else:
        init = tmp_path / "base.weights.h5"
        backbones.build_base("small_cnn", image_size=16).save_weights(str(init))
        weights = str(init)
    wd = tmp_path / "B"
    with pytest.raises(errors.Interrupted):
        train_lib.train_and_evaluate(cfg(weights, 3), str(wd), verbose=False, preemption=_StopAfterFirstSave(wd))
    shutil.rmtree(init) if init.is_dir() else init.unlink()
    res = train_lib.train_and_evaluate(cfg(weights, 3), str(wd), verbose=False)
    assert res["epochs_run"] == 3
    # A new run from the missing source is still a clear user error.
    with pytest.raises(train_lib.UserError, match="no checkpoint in|no such file"):
        train_lib.train_and_evaluate(cfg(weights, 3), str(tmp_path / "C"), verbose=False)
    assert not (tmp_path / "C").exists()


# --- 5. one source of defaults, --epochs, presets ----------------------------------------------

def test_flags_and_the_library_share_their_defaults(tmp_path):
    from launch.train import config_from_args
    from research.run import distribute
    from research.config import ExperimentConfig, validate

    assert config_from_args([]) == validate(ExperimentConfig())  # the Quickstart run, either way
    one = config_from_args(["--epochs=3"])
    assert len(one.stages) == 1 and one.stages[0].epochs == 3 and one.stages[0].name == "train"
    assert config_from_args(["--backbone", "mobilenet", "--alpha", "0.25"]).model.backbone == "mobilenet"
    # The preset's own dataset is the shared ants/bees folder; any folder overrides it.
    preset = config_from_args(["--preset=ants_top2", "--head_epochs=1", "--weights=none",
                               f"--dataset=folder:{os.path.relpath(tmp_path)}"])
    assert [(s.name, s.unfreeze, s.epochs, s.lr) for s in preset.stages] == [("head", "none", 1, 3e-3),
                                                                             ("finetune", "top:2", 8, 1e-4)]
    assert preset.model.alpha == 0.25 and preset.data.dataset == f"folder:{tmp_path}"  # resolved
    assert preset.train.jit_compile == "auto" and distribute.use_xla("auto") is False  # no GPU here


# --- 6. the transfer study reads the backbone as launch.train does -----------------------------

def test_transfer_study_counts_the_blocks_of_the_backbone_given():
    from launch.train import config_from_args
    from research.studies import transfer

    # `--backbone mobilenet` (space-separated) once silently counted small_cnn's 3 blocks.
    cfg, n = transfer.transfer_plan(["--backbone", "mobilenet", "--alpha", "0.25"], config_from_args)
    assert cfg.model.backbone == "mobilenet" and n == 14
    assert transfer.transfer_plan([], config_from_args)[1] == 3


# --- issue 13: the workdir lock, finished runs, paths, file modes ------------------------------

def test_a_second_process_in_the_same_workdir_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path):
    wd = tmp_path / "run"
    args = [f"--workdir={wd}", "--image_size=48", "--classes=0-4", "--batch_size=8", "--noexport", "--epochs=12",
            "--steps_per_loop=1"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    first = subprocess.Popen([sys.executable, "-m", "launch.train", *args], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (wd / "ckpt" / "checkpoint").exists():
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.1)
    second = run_module("launch.train", *args)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"is in use by pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    first.send_signal(signal.SIGKILL)
    first.wait()
    third = run_module("launch.train", *args)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "Resuming from" in third.stdout


def test_finished_runs_paths_and_file_modes(tmp_path, tiny_folder):
    """A finished run is not re-trained or re-recorded under a changed config; paths are
    stored resolved; every file is as readable as the umask allows."""
    work = tmp_path / "cwd"
    work.mkdir()
    rel = os.path.relpath(tiny_folder, work)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)

    def train(*args):
        return subprocess.run([sys.executable, "-m", "launch.train", "--workdir=run", "--image_size=16",
                               "--batch_size=8", *args], cwd=work, env=env, capture_output=True, text=True,
                              timeout=600, preexec_fn=lambda: os.umask(0o022))

    r = train(f"--dataset=folder:{rel}", "--epochs=1")
    assert r.returncode == 0, r.stderr[-2000:]
    wd = work / "run"
    config = json.loads((wd / "config.json").read_text())
    assert config["data"]["dataset"] == f"folder:{tiny_folder}"  # resolved, absolute
    for root, _, files in os.walk(wd):
        for f in files:
            mode = os.stat(os.path.join(root, f)).st_mode & 0o777
            assert mode & 0o044 == 0o044, (os.path.join(root, f), oct(mode))

    # The same data by its absolute path is the same config: the run is finished.
    r = train(f"--dataset=folder:{tiny_folder}", "--epochs=1")
    assert r.returncode == 0 and "is finished" in r.stdout, r.stderr[-2000:]
    # More epochs on a finished run: refused, and config.json still says what ran.
    before = (wd / "config.json").read_bytes()
    r = train(f"--dataset=folder:{tiny_folder}", "--epochs=2", "--allow_config_change")
    assert r.returncode == 2 and "is finished" in r.stderr and "stages.0.epochs: 1 -> 2" in r.stderr
    assert (wd / "config.json").read_bytes() == before
    # Only --data_threads changed: not a config change.
    r = train(f"--dataset=folder:{tiny_folder}", "--epochs=1", "--data_threads=1")
    assert r.returncode == 0 and "is finished" in r.stdout, r.stderr[-2000:]


def test_allow_config_change_resumes_an_unfinished_run_and_records_it(tmp_path):
    from research import errors
    from research.run import train as train_lib
    from research.config import DataConfig, ExperimentConfig, StageConfig, TrainConfig

    def cfg(lr):
        return ExperimentConfig(data=DataConfig(image_size=16, classes="0-4"), train=TrainConfig(export=False),
                                stages=(StageConfig(epochs=3, lr=lr),))

    wd = tmp_path / "run"
    with pytest.raises(errors.Interrupted):
        train_lib.train_and_evaluate(cfg(1e-3), str(wd), verbose=False, preemption=_StopAfterFirstSave(wd))
    with pytest.raises(train_lib.UserError, match=r"different config; changed: stages.0.lr: 0.001 -> 0.0005"):
        train_lib.train_and_evaluate(cfg(5e-4), str(wd), verbose=False)
    # A stage added is a change too (it was not seen: only keys of the old config counted).
    more = dataclasses.replace(cfg(1e-3), stages=cfg(1e-3).stages + (StageConfig(name="more", epochs=1),))
    with pytest.raises(train_lib.UserError, match=r"stages.1.name: '\(absent\)' -> 'more'"):
        train_lib.train_and_evaluate(more, str(wd), verbose=False)
    # Turning the weight average on would load the optimizer's slots into each other: refused, even allowed.
    ema_on = dataclasses.replace(cfg(1e-3), train=TrainConfig(export=False, ema_decay=0.9))
    with pytest.raises(train_lib.UserError, match="changes the optimizer's checkpointed state"):
        train_lib.train_and_evaluate(ema_on, str(wd), verbose=False, allow_config_change=True)
    res = train_lib.train_and_evaluate(cfg(5e-4), str(wd), verbose=False, allow_config_change=True)
    assert res["epochs_run"] == 3
    # From the second epoch on (results.json counts epochs from 1), the first after the interruption.
    assert res["config_changes"] == [{"global_epoch": 2, "changed": ["stages.0.lr: 0.001 -> 0.0005"]}]
    assert json.loads((wd / "config.json").read_text())["stages"][0]["lr"] == 5e-4


def test_a_resumed_run_whose_data_changed_is_refused_unless_allowed(tmp_path, tiny_folder):
    """Images added to the folder move images between splits: resuming would silently
    train and select on other data."""
    from research import errors
    from research.run import train as train_lib
    from research.config import DataConfig, ExperimentConfig, StageConfig, TrainConfig

    cfg = ExperimentConfig(data=DataConfig(dataset=f"folder:{tiny_folder}", image_size=16, batch_size=8),
                           train=TrainConfig(export=False), stages=(StageConfig(epochs=2),))
    wd = tmp_path / "run"
    with pytest.raises(errors.Interrupted):
        train_lib.train_and_evaluate(cfg, str(wd), verbose=False, preemption=_StopAfterFirstSave(wd))
    for j in range(10):
        shutil.copy(tiny_folder / "class 0" / "img 0.jpg", tiny_folder / "class 0" / f"extra {j}.jpg")
    events = sorted(p.name for p in wd.rglob("*"))
    with pytest.raises(train_lib.UserError, match=r"data of the run .* changed since it started: data.num_train: "
                                                  r"63 -> 70; data.num_val: 18 -> 20; data.num_test: 9 -> 10.*--allow_config_change"):
        train_lib.train_and_evaluate(cfg, str(wd), verbose=False)
    assert sorted(p.name for p in wd.rglob("*")) == events  # nothing written
    res = train_lib.train_and_evaluate(cfg, str(wd), verbose=False, allow_config_change=True)
    assert res["num_train"] == 70 and res["config_changes"][0]["changed"][:1] == ["data.num_train: 63 -> 70"]


def test_stages_that_have_run_cannot_be_removed(tmp_path):
    from research import errors
    from research.run import train as train_lib
    from research.config import DataConfig, ExperimentConfig, StageConfig, TrainConfig

    two = ExperimentConfig(data=DataConfig(image_size=16, classes="0-4"), train=TrainConfig(export=False),
                           stages=(StageConfig(name="a", epochs=1), StageConfig(name="b", epochs=2)))
    wd = tmp_path / "run"
    with pytest.raises(errors.Interrupted):  # save 2 ends stage a; save 3 is the interruption inside b
        train_lib.train_and_evaluate(two, str(wd), verbose=False, preemption=_StopAfterFirstSave(wd, after=2))
    one = dataclasses.replace(two, stages=two.stages[:1])
    with pytest.raises(train_lib.UserError, match="has reached stage 2, but the config has 1 stage"):
        train_lib.train_and_evaluate(one, str(wd), verbose=False, allow_config_change=True)


def test_a_kill_between_the_latest_and_the_best_save_is_repaired(tmp_path):
    """ckpt/ is saved before best/; a run killed between the two writes best/ on resume,
    from the restored weights, which are the best epoch's."""
    import tensorflow as tf
    from research import errors
    from research.run import build as build_lib, train as train_lib
    from research.config import DataConfig, ExperimentConfig, StageConfig, TrainConfig

    cfg = ExperimentConfig(data=DataConfig(image_size=16, classes="0-4"), train=TrainConfig(export=False),
                           stages=(StageConfig(epochs=3),))
    wd = tmp_path / "run"
    with pytest.raises(errors.Interrupted):
        train_lib.train_and_evaluate(cfg, str(wd), verbose=False, preemption=_StopAfterFirstSave(wd))
    shutil.rmtree(wd / "best")  # as if killed just after ckpt/ckpt-1 was written
    with pytest.raises(errors.Interrupted):  # resume, then stop at the first chance
        train_lib.train_and_evaluate(cfg, str(wd), verbose=False, preemption=_StopAfterFirstSave(wd))
    def weights(path):
        model = build_lib.build(cfg, 5, tf.distribute.get_strategy()).model
        tf.train.Checkpoint(model=model).restore(path).expect_partial().assert_existing_objects_matched()
        return [v.numpy() for v in model.weights]

    best, latest = weights(str(wd / "best" / "ckpt-1")), weights(str(wd / "ckpt" / "ckpt-1"))
    assert len(best) > 10
    for a, b in zip(best, latest):
        assert np.array_equal(a, b)


# --- the reported metrics against an independent evaluation --------------------------------------

def test_reported_metrics_equal_an_independent_evaluation(tmp_path):
    """results.json's final val/accuracy and val/loss, computed by the loop's in-graph sums,
    equal launch.evaluate's numpy computation on the same checkpoint and split."""
    wd = tmp_path / "run"
    r = run_module("launch.train", f"--workdir={wd}", "--image_size=16", "--epochs=3", "--noexport")
    assert r.returncode == 0, r.stderr[-2000:]
    # A redirected log is plain text that starts by saying what runs, and has no start-up noise.
    assert "\x1b" not in r.stdout + r.stderr and "\r" not in r.stdout + r.stderr
    first = r.stdout.splitlines()[:4]
    assert first[0] == "data: digits: 10 classes (0, 1, 2, 3, 4, 5, 6, 7, 8, 9); 1259 training, 359 " \
                       "validation and 179 test images at 16x16 px", first
    assert re.fullmatch(r"cache: memory \(auto: 1618 decoded images at 16x16 px take ~1 MiB, 0% of the [\d.]+ GiB "
                        r"of RAM available; memory below 25%\)", first[1]), first
    assert first[2] == "test: a 10% slice of the training images; evaluated once, at the end of the run", first
    assert first[3].startswith("model: small_cnn (weights none); default strategy on CPU:0, float32"), first
    assert "absl::InitializeLog" not in r.stderr and "cuInit" not in r.stderr, r.stderr[-2000:]
    res = _results(wd)
    r = run_module("launch.evaluate", f"--workdir={wd}", "--checkpoint=latest", "--name=final")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((wd / "eval" / "final.json").read_text())
    assert report["num_examples"] == res["num_val"] == 359
    assert res["final"]["val/accuracy"] == pytest.approx(report["accuracy"], abs=1e-9)
    assert res["final"]["val/loss"] == pytest.approx(report["loss"], rel=1e-5)
    assert res["final"]["val/top5_accuracy"] == pytest.approx(report["top5_accuracy"], abs=1e-9)
    assert 0.5 < report["accuracy"] < 1.0  # a real, non-trivial number
    # The end-of-run test scores are the same computation on the test split.
    r = run_module("launch.evaluate", f"--workdir={wd}", "--checkpoint=latest", "--split=test", "--name=test")
    assert r.returncode == 0, r.stderr[-2000:]
    test = json.loads((wd / "eval" / "test.json").read_text())
    assert test["num_examples"] == res["num_test"] == 179
    assert res["final"]["test/accuracy"] == pytest.approx(test["accuracy"], abs=1e-9)
    assert res["final"]["test/loss"] == pytest.approx(test["loss"], rel=1e-5)
    # The last epoch's history record is the same evaluation of the same weights.
    assert res["history"][-1]["val/accuracy"] == res["final"]["val/accuracy"]
    assert np.isfinite(res["history"][-1]["train/loss"])


def test_itstime_fires_on_multiples_and_always_on_the_last_step():
    from research.run.cadence import itstime
    assert [s for s in range(1, 11) if itstime(s, 3, 10)] == [3, 6, 9, 10]
    assert [s for s in range(1, 11) if itstime(s, 3)] == [3, 6, 9]
    assert not any(itstime(s, 0, 10) for s in range(1, 11))  # 0 disables, even at the end


def test_a_weights_file_is_loaded_into_small_cnn_not_ignored(tmp_path):
    """`--weights=FILE` with small_cnn was silently ignored; it now loads (the init path)."""
    import tensorflow as tf
    from research.model import backbones
    from research.run import build as build_lib
    from research.config import DataConfig, ExperimentConfig, ModelConfig

    source = backbones.build_base("small_cnn", image_size=16)
    path = tmp_path / "base.weights.h5"
    source.save_weights(str(path))
    cfg = ExperimentConfig(data=DataConfig(image_size=16), model=ModelConfig(weights=str(path)))
    built = build_lib.build(cfg, 10, tf.distribute.get_strategy())
    assert not all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(built.base.weights, source.weights))
    build_lib.init_weights(cfg, built)
    for a, b in zip(built.base.weights, source.weights):
        assert np.array_equal(a.numpy(), b.numpy()), a.path
