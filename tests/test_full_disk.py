"""A full disk under the tools other than launch.train: exit status 4 and one line, no traceback.

The file each tool writes first is a symbolic link to /dev/full, where every write
fails with ENOSPC, as on a full disk (root ignores permissions, so a read-only
directory would not do).
"""

import os

import pytest

from tests.conftest import run_module

TRAIN = ["--image_size=16", "--classes=0-2", "--epochs=1", "--batch_size=32"]

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")


def _assert_storage_error(r):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 4, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], lines[-5:]


def test_ablate_on_a_full_disk(tmp_path):
    trial = tmp_path / "trials" / "lr-1e-3"
    trial.mkdir(parents=True)
    (trial / "trial.json").symlink_to("/dev/full")
    _assert_storage_error(run_module("launch.ablate", f"--root={tmp_path}", "--sweep=lr:1e-3", "--", *TRAIN))


def test_lr_find_on_a_full_disk(tmp_path):
    (tmp_path / "lr_find.json").symlink_to("/dev/full")
    _assert_storage_error(run_module("launch.lr_find", f"--out={tmp_path}", "--steps=12", "--", *TRAIN))


def test_probe_on_a_full_disk(tmp_path):
    (tmp_path / "probe.csv").symlink_to("/dev/full")
    _assert_storage_error(run_module("launch.probe", f"--out={tmp_path}", "--", *TRAIN))
