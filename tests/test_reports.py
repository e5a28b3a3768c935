"""What a run and its tools report: no meaningless top-5 numbers, one evaluation report per
checkpoint, and Ctrl-C on a sweep as a clean, resumable stop."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from research.config import DataConfig, ExperimentConfig, StageConfig, TrainConfig
from research.run import train as train_lib
from tests.conftest import ROOT, run_module


@pytest.fixture(scope="module")
def three_class_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("three") / "run"
    cfg = ExperimentConfig(data=DataConfig(image_size=16, classes="0-2"),
                           train=TrainConfig(export=False, steps_per_loop=5),
                           stages=(StageConfig(name="head", unfreeze="none", epochs=1, lr=3e-3),
                                   StageConfig(name="ft", unfreeze="all", epochs=2, lr=1e-3)))
    return wd, train_lib.train_and_evaluate(cfg, str(wd), verbose=False)


def test_no_top5_numbers_with_five_classes_or_fewer(three_class_run):
    wd, res = three_class_run
    records = [res["final"], res["best"], *res["history"], *[s["final"] for s in res["stages"]]]
    assert "test/accuracy" in res["final"] and "val/accuracy" in res["best"]
    assert not [k for r in records for k in r if "top5" in k]


def test_evaluating_another_checkpoint_keeps_the_first_report(three_class_run):
    from research.serve.evaluate import evaluate_run

    wd, res = three_class_run
    best = evaluate_run(str(wd), split="test", checkpoint="best")
    latest = evaluate_run(str(wd), split="test", checkpoint="latest")
    assert best["report"].endswith("eval/own_test.json") and latest["report"].endswith("eval/own_test_latest.json")
    on_disk = {n: json.load(open(wd / "eval" / n))["checkpoint"] for n in ("own_test.json", "own_test_latest.json")}
    assert on_disk == {"own_test.json": best["checkpoint"], "own_test_latest.json": latest["checkpoint"]}
    assert best["checkpoint"] != latest["checkpoint"] or res["best_epoch"] == res["epochs_run"] - 1


def test_ctrl_c_on_a_sweep_exits_75_in_one_line_and_the_trial_resumes(tmp_path):
    args = [f"--root={tmp_path}", "--sweep=lr:1e-3,2e-3", "--", "--image_size=16", "--classes=0-4",
            "--finetune_epochs=6", "--steps_per_loop=2", "--batch_size=16"]
    proc = subprocess.Popen([sys.executable, "-m", "launch.ablate", *args], cwd=ROOT, start_new_session=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = tmp_path / "trials" / "lr-1e-3" / "stdout.log"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and "epoch 2/6" in log.read_text()):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        "error: interrupted; what finished is kept, run the same command again to resume"]
    assert (tmp_path / "trials" / "lr-1e-3" / "ckpt" / "checkpoint").exists()  # the trial saved before exiting
    r = run_module("launch.ablate", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Resuming from" in log.read_text()
