"""A workdir written by the code before the metric sums were named (run-state format 2,
commit 37c7e2d) is refused with one clear message, not half-read."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_module

OLD = "37c7e2d"


def test_a_checkpoint_of_the_previous_format_is_refused_clearly(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    archive = subprocess.run(f"git archive {OLD} | tar -x -C {old}", shell=True, cwd=ROOT, capture_output=True,
                             text=True)
    if archive.returncode != 0:
        pytest.skip(f"commit {OLD} is not in this checkout's history ({archive.stderr.strip()[:200]})")
    wd = tmp_path / "run"
    args = [f"--workdir={wd}", "--image_size=16", "--classes=0-4", "--finetune_epochs=2", "--noexport"]
    r = subprocess.run([sys.executable, "-m", "launch.train", *args], cwd=old, capture_output=True, text=True,
                       timeout=600, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(old), "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_module("launch.train", *args)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert "written by an older version of this code (run-state format 2, now 3)" in r.stderr, r.stderr[-2000:]
    assert "--weights=ckpt:OLD_WORKDIR" in r.stderr
