"""An option added from outside the controller: one class and one registration.

The action below lives in this test (written to a driver script the run starts
from); the controller and the registry's file are not edited. Its checkpointed
state must survive a SIGKILL and resume exactly, and reach `results.json`.
"""

import json
import signal
import sys
import textwrap

import subprocess

from tests.conftest import ROOT
from tests.test_resume import _wait_for_checkpoint

DRIVER = textwrap.dedent('''
    import runpy
    import sys
    from dataclasses import dataclass, field

    from research.run import actions
    from research.run.actions.base import Action


    @dataclass
    class LossLogState:
        epochs: list = field(default_factory=list)        # the global epoch of every epoch end seen
        train_losses: list = field(default_factory=list)
        stage_starts: list = field(default_factory=list)


    class LossLog(Action):
        name = "loss_log"
        State = LossLogState

        def stage_start(self, ctx, run, stage):
            self.state(run).stage_starts.append([stage.name, run.epoch])

        def epoch_end(self, ctx, run, stage, metrics, selection, last):
            s = self.state(run)
            s.epochs.append(run.global_epoch)
            s.train_losses.append(metrics["train/loss"])

        def results(self, run):
            s = self.state(run)
            return {"loss_log": {"epochs": s.epochs, "train_losses": s.train_losses,
                                 "stage_starts": s.stage_starts}}


    actions.register(LossLog)
    sys.argv = ["launch.train"] + sys.argv[1:]
    runpy.run_module("launch.train", run_name="__main__")
''')

ARGS = ["--deterministic", "--image_size=16", "--classes=0-4", "--batch_size=32", "--steps_per_loop=5",
        "--noexport", "--stages=name=head unfreeze=none epochs=2 lr=3e-3; name=ft unfreeze=top:2 epochs=2 lr=1e-3"]


ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "PATH": "/usr/bin:/bin", "PYTHONPATH": ROOT}


def _run(driver, wd):
    return subprocess.run([sys.executable, str(driver), f"--workdir={wd}", *ARGS], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=ENV)


def _popen(driver, wd):
    return subprocess.Popen([sys.executable, str(driver), f"--workdir={wd}", *ARGS], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_an_action_added_from_a_test_keeps_its_state_across_sigkill(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    ref = tmp_path / "ref"
    r = _run(driver, ref)
    assert r.returncode == 0, r.stderr[-3000:]
    expected = json.loads((ref / "results.json").read_text())["loss_log"]
    assert expected["epochs"] == [0, 1, 2, 3]
    assert expected["stage_starts"] == [["head", 0], ["ft", 0]]

    wd = tmp_path / "killed"
    proc = _popen(driver, wd)
    _wait_for_checkpoint(wd, 4, proc)  # save 3 ends the head stage; save 4 is the first ft epoch
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (wd / "results.json").exists(), "the run finished before it could be killed"
    r = _run(driver, wd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resuming from" in r.stdout
    got = json.loads((wd / "results.json").read_text())["loss_log"]
    # The epochs before the kill come back from the checkpoint, once each; the resumed
    # stage starts again where it was (epoch 1 of ft), and the losses are the same numbers.
    assert got["epochs"] == expected["epochs"]
    assert got["train_losses"] == expected["train_losses"]
    assert got["stage_starts"] == [["head", 0], ["ft", 0], ["ft", 1]]


def test_a_train_monitor_keeps_best_of_the_trained_weights(tmp_path):
    """Only a `val_NAME/` monitor scores a weight variant; `train/loss` scores the trained weights."""
    from research.config import (DataConfig, EarlyStoppingConfig, ExperimentConfig, StageConfig, TrainConfig)
    from research.run import train as train_lib

    cfg = ExperimentConfig(data=DataConfig(image_size=16, classes="0-4"),
                           train=TrainConfig(export=False, steps_per_loop=5,
                                             early_stopping=EarlyStoppingConfig(monitor="train/loss")),
                           stages=(StageConfig(name="s", unfreeze="all", epochs=2, lr=3e-3),))
    res = train_lib.train_and_evaluate(cfg, str(tmp_path / "run"), verbose=False)
    assert res["best"]["weights"] == "trained" and res["best"]["monitor"] == "train/loss"
    losses = [h["train/loss"] for h in res["history"]]
    assert res["best"]["value"] == min(losses)
    assert (tmp_path / "run" / res["best"]["checkpoint"]).with_suffix(".index").exists()


CHECKING_DRIVER = textwrap.dedent('''
    import runpy
    import sys

    from research.config import UserError
    from research.run import actions
    from research.run.actions.base import Action


    class NoSmoothing(Action):
        """Refuses label smoothing, and a resume that changes --clipnorm (as if it kept state)."""
        name = "no_smoothing"

        @classmethod
        def check(cls, config):
            if config.train.label_smoothing:
                raise UserError("no_smoothing refuses --label_smoothing "
                                f"(tensorflow imported: {'tensorflow' in sys.modules})")

        @classmethod
        def resume_conflict(cls, old, config):
            if old["train"]["clipnorm"] != config.train.clipnorm:
                return "no_smoothing's state was made with another --clipnorm"


    actions.register(NoSmoothing)
    sys.argv = ["launch.train"] + sys.argv[1:]
    runpy.run_module("launch.train", run_name="__main__")
''')


def test_an_action_added_from_a_test_validates_its_own_fields_before_tensorflow(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(CHECKING_DRIVER)
    wd = tmp_path / "run"

    def run(*flags):
        return subprocess.run([sys.executable, str(driver), f"--workdir={wd}", "--image_size=16", "--classes=0-1",
                               "--epochs=1", "--noexport", *flags], cwd=ROOT, capture_output=True, text=True,
                              timeout=600, env=ENV)

    r = run("--label_smoothing=0.1")
    assert r.returncode == 2 and "no_smoothing refuses --label_smoothing (tensorflow imported: False)" in r.stderr, \
        r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not wd.exists()
    assert run().returncode == 0
    # Its checkpointed state cannot follow the change, so not even --allow_config_change resumes.
    r = run("--clipnorm=1", "--allow_config_change")
    assert r.returncode == 2 and "no_smoothing's state was made with another --clipnorm" in r.stderr, r.stderr[-2000:]


def test_the_registry_and_the_train_flags_import_no_tensorflow():
    """Every action's checks run before TensorFlow starts: importing them must not start it."""
    code = ("import sys, launch.train, research.run.actions as a; assert a.REGISTRY; "
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr[-2000:])
