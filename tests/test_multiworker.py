"""Multi-worker training: two local processes, TF_CONFIG on loopback (launch/multiworker.py)."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import ROOT, run_module


def _launcher(wd, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen([sys.executable, "-m", "launch.multiworker", "--num_workers=2", "--",
                             f"--workdir={wd}", "--verbosity=0", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for(path, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path():
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    raise AssertionError("timed out")


def _has_ckpt(wd, n):
    state = wd / "ckpt" / "checkpoint"
    return state.exists() and f'ckpt-{n}"' in state.read_text()


@pytest.mark.slow
def test_two_workers_train_digits_and_resume(tmp_path):
    wd = tmp_path / "mw"
    proc = _launcher(wd)
    _wait_for(lambda: _has_ckpt(wd, 4), proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers: a lost machine
    proc.communicate()
    assert not (wd / "results.json").exists()

    r = run_module("launch.multiworker", "--num_workers=2", "--", f"--workdir={wd}", "--verbosity=0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resuming from" in r.stdout
    res = json.loads((wd / "results.json").read_text())
    assert res["epochs_run"] == 20
    assert res["final"]["val/accuracy"] >= 0.95, res["final"]
    # Only the chief wrote here: the contract's files (and its lock) and nothing else.
    assert sorted(os.listdir(wd)) == [".lock", "best", "ckpt", "config.json", "export", "results.json", "test",
                                      "train", "trainable.json", "val"]
    names = os.listdir(wd / "ckpt")
    assert all(n == "checkpoint" or n.startswith("ckpt-") for n in names) and len(names) == 1 + 2 * 3
    assert any(n.startswith("events") for n in os.listdir(wd / "train"))
    assert len(os.listdir(wd / "train")) == 2  # one event file per launch, the chief's only


def test_a_killed_worker_is_reported(tmp_path):
    wd = tmp_path / "mw"
    proc = _launcher(wd)
    _wait_for(lambda: _has_ckpt(wd, 1), proc)
    workers = [c for c in psutil.Process(proc.pid).children() if "launch.train" in " ".join(c.cmdline())]
    assert len(workers) == 2
    workers[1].kill()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "worker 1 exited with status -9; stopping the others" in err
