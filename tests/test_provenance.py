"""A result says what produced it: the code (git commit, dirty flag, diff hash), the
libraries, the devices, the host, the command and the times; tables name the code."""

import json
import socket
import subprocess

import numpy as np
import pytest

from research import provenance
from research.studies import tables
from tests.conftest import ROOT


def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_the_code_version_is_the_commit_and_a_dirty_tree_is_flagged_with_its_diff(tmp_path):
    repo = tmp_path / "repo"
    (repo / "research").mkdir(parents=True)
    _git(repo, "init", "-q")
    (repo / "research" / "model.py").write_text("LR = 1e-3\n")
    (repo / "README.md").write_text("notes\n")
    _git(repo, "add", "research/model.py", "README.md")
    _git(repo, "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "one")
    clean = provenance.code_version(str(repo))
    assert clean["commit"] == _git(repo, "rev-parse", "HEAD") and clean["dirty"] is False
    assert provenance.short(clean) == clean["commit"][:10]
    (repo / "README.md").write_text("more notes\n")  # documentation is not code
    assert provenance.code_version(str(repo))["dirty"] is False
    (repo / "research" / "model.py").write_text("LR = 1e-2\n")
    dirty = provenance.code_version(str(repo))
    assert dirty["commit"] == clean["commit"] and dirty["dirty"] is True and len(dirty["diff_sha256"]) == 64
    assert provenance.short(dirty) == f"{clean['commit'][:10]}+dirty:{dirty['diff_sha256'][:8]}"
    (repo / "research" / "model.py").write_text("LR = 1e-4\n")
    other = provenance.code_version(str(repo))["diff_sha256"]
    assert other != dirty["diff_sha256"]  # other changes, other hash
    (repo / "research" / "new_action.py").write_text("X = 1\n")  # not yet added to git: still code
    assert provenance.code_version(str(repo))["diff_sha256"] not in (other, None)
    outside = provenance.code_version(str(tmp_path / "not-a-checkout"))
    assert outside["commit"] is None and outside["version"] == "0.1.0"


def test_a_run_records_each_session_and_evaluate_and_export_their_own(tmp_path):
    import tensorflow as tf
    import keras
    from research import errors
    from research.config import DataConfig, ExperimentConfig, StageConfig, TrainConfig
    from research.run import train as train_lib
    from research.serve.evaluate import evaluate_run
    from tests.test_controller import _StopAfterFirstSave

    cfg = ExperimentConfig(data=DataConfig(image_size=16, classes="0-4"), train=TrainConfig(export=True),
                           stages=(StageConfig(epochs=2),))
    wd = tmp_path / "run"
    with pytest.raises(errors.Interrupted):
        train_lib.train_and_evaluate(cfg, str(wd), verbose=False, preemption=_StopAfterFirstSave(wd))
    res = train_lib.train_and_evaluate(cfg, str(wd), verbose=False)
    head = _git(ROOT, "rev-parse", "HEAD")
    first, second = res["provenance"]
    assert "ended" not in first and second["ended"] >= second["started"] >= first["started"]
    for session in (first, second):
        assert session["code"]["commit"] == head
        assert session["code"]["dirty"] == bool(_git(ROOT, "status", "--porcelain", "--", *provenance.CODE_PATHS))
        assert session["versions"]["tensorflow"] == tf.__version__ and session["versions"]["keras"] == keras.__version__
        assert session["versions"]["numpy"] == np.__version__
        assert session["devices"]["replicas"] == 1 and session["devices"]["precision"] == "float32"
        assert session["host"] == socket.gethostname() and isinstance(session["command"], list)
    assert json.loads((wd / "results.json").read_text())["provenance"] == res["provenance"]
    report = evaluate_run(str(wd), split="val")
    assert report["provenance"]["code"]["commit"] == head
    assert json.loads((wd / "export" / "labels.json").read_text())["provenance"]["code"]["commit"] == head


def _row(trial, code):
    return {"trial": trial, "seed": trial, "group": "", "status": "done", "test/accuracy": 0.8, "val/accuracy": 0.8,
            "best/test/accuracy": 0.8, "best/val/accuracy": 0.8, "wall_time_s": 1.0, "code": code}


def test_a_table_names_its_code_and_warns_when_its_trials_ran_different_code(tmp_path):
    tables.write_tables(str(tmp_path), [_row("0", "a1b2c3d4e5"), _row("1", "a1b2c3d4e5")], ["seed"])
    md = (tmp_path / "results.md").read_text()
    assert "Code: a1b2c3d4e5" in md and "different code" not in md
    tables.write_tables(str(tmp_path), [_row("0", "a1b2c3d4e5"), _row("1", "a1b2c3d4e5+dirty:0f1e2d3c")], ["seed"])
    md = (tmp_path / "results.md").read_text()
    assert "**Warning: these trials ran different code**" in md
    assert "`a1b2c3d4e5`: 0; `a1b2c3d4e5+dirty:0f1e2d3c`: 1" in md
