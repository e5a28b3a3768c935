"""Refusals that need only the file system come before TensorFlow starts.

Each launcher runs here with TensorFlow and Keras made unimportable: a refusal made
on the fast path exits 2 with its message; one that needed TensorFlow would end in
an ImportError instead. (Asserting on the path, not on a timing.)
"""

import fcntl
import json
import os
import subprocess
import sys

import pytest

from research.config import ExperimentConfig, StageConfig
from tests.conftest import ROOT

DRIVER = ("import runpy, sys\n"
          "sys.modules['tensorflow'] = None\nsys.modules['keras'] = None  # any import of them now fails\n"
          "module = sys.argv[1]\nsys.argv = [module] + sys.argv[2:]\n"
          "runpy.run_module(module, run_name='__main__')\n")


def _refused(module, *args):
    r = subprocess.run([sys.executable, "-c", DRIVER, module, *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert "ImportError" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    return r.stderr


def _images(folder, n=2):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"{i}.png")


def test_folder_layouts_are_refused_before_tensorflow(tmp_path):
    one = tmp_path / "one"
    _images(one / "ants")
    assert "must hold one sub-folder per class (at least 2); found 1" in _refused(
        "launch.train", f"--workdir={tmp_path / 'w1'}", f"--dataset=folder:{one}")
    split = tmp_path / "split"
    for c in ("ants", "bees"):
        _images(split / "train" / c)
    (split / "val").mkdir()
    assert "must hold the same class folders as the training split; missing: ants, bees" in _refused(
        "launch.train", f"--workdir={tmp_path / 'w2'}", f"--dataset=folder:{split}")
    _images(split / "val" / "ants")
    assert "missing: bees" in _refused("launch.train", f"--workdir={tmp_path / 'w3'}", f"--dataset=folder:{split}")
    _images(split / "val" / "bees")
    (split / "train" / "wasps").mkdir()
    assert "class folder" in _refused("launch.train", f"--workdir={tmp_path / 'w4'}", f"--dataset=folder:{split}")
    assert not any((tmp_path / w).exists() for w in ("w1", "w2", "w3", "w4"))
    # launch.convert refuses the same folder, and an --out that is not empty.
    assert "holds no images" in _refused("launch.convert", f"--dataset=folder:{split}", f"--out={tmp_path / 'o'}")
    (split / "train" / "wasps").rmdir()
    full = tmp_path / "full"
    _images(full)
    assert "exists and is not an empty directory" in _refused("launch.convert", f"--dataset=folder:{split}",
                                                             f"--out={full}")


def _fake_run(wd, config, finished=False):
    """The files a run leaves that the refusals read: config.json and ckpt/checkpoint."""
    (wd / "ckpt").mkdir(parents=True)
    (wd / "config.json").write_text(json.dumps(config.to_dict()))
    (wd / "ckpt" / "checkpoint").write_text('model_checkpoint_path: "ckpt-1"\nall_model_checkpoint_paths: "ckpt-1"\n')
    if finished:
        (wd / "results.json").write_text("{}")


def test_workdirs_are_refused_before_tensorflow(tmp_path):
    from launch.train import config_from_args

    args = ["--image_size=16", "--epochs=1"]
    wd = tmp_path / "run"
    _fake_run(wd, config_from_args([f"--workdir={wd}", *args]))
    err = _refused("launch.train", f"--workdir={wd}", *args, "--lr=0.5")
    default_lr = config_from_args([f"--workdir={wd}", *args]).stages[0].lr
    assert f"holds a run with a different config; changed: stages.0.lr: {default_lr} -> 0.5;" in err
    # With 15 settings changed the message names the first ones and counts the rest.
    many = config_from_args([f"--workdir={wd}", "--stages=" + "; ".join(f"name=s{i} epochs=1" for i in range(4))])
    err = _refused("launch.train", f"--workdir={wd}",
                   "--stages=" + "; ".join(f"name=s{i} epochs=1" for i in range(4)), "--image_size=16")
    assert "more (compare config.json)" in err and len(many.stages) == 4

    done = tmp_path / "done"
    _fake_run(done, config_from_args([f"--workdir={done}", *args]), finished=True)
    for extra in ([], ["--allow_config_change"]):
        err = _refused("launch.train", f"--workdir={done}", *args, "--lr=0.5", *extra)
        assert "is finished; a changed config cannot be recorded for it" in err and "--weights=ckpt:" in err

    busy = tmp_path / "busy"
    busy.mkdir()
    with open(busy / ".lock", "w") as lock:
        lock.write("pid 4242 on elsewhere (since today)\n")
        lock.flush()
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        assert "is in use by pid 4242 on elsewhere" in _refused("launch.train", f"--workdir={busy}", *args)

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert "cannot be created or written into" in _refused("launch.train", f"--workdir={blocker / 'run'}", *args)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert "cannot be created or written into" in _refused("launch.train", f"--workdir={ro / 'run'}", *args)


def test_a_library_caller_gets_the_same_refusal(tmp_path):
    """`train_and_evaluate` runs the same checks (here: a finished run with another config)."""
    from research.config import DataConfig, TrainConfig
    from research.errors import UserError
    from research.run import preflight

    stages = (StageConfig(),)
    cfg = ExperimentConfig(data=DataConfig(image_size=16), train=TrainConfig(export=False), stages=stages)
    _fake_run(tmp_path / "done", cfg, finished=True)
    changed = ExperimentConfig(data=DataConfig(image_size=24), train=TrainConfig(export=False), stages=stages)
    with pytest.raises(UserError, match="is finished"):
        preflight.check(changed, str(tmp_path / "done"))
    assert preflight.check(cfg, str(tmp_path / "done")) == []


def test_specs_the_backbone_cannot_have_are_refused_before_tensorflow_in_runs_and_sweeps(tmp_path):
    """The registry names every backbone's blocks: no model is built to refuse a spec."""
    err = _refused("launch.train", f"--workdir={tmp_path / 'r'}", "--unfreeze=top:99", "--head_epochs=1")
    assert "unfreeze spec 'top:99': K must be an integer in 0..3" in err and "block1, block2, block3" in err
    err = _refused("launch.train", f"--workdir={tmp_path / 'r'}", "--backbone=mobilenet", "--alpha=0.25",
                   "--unfreeze=from:conv_dw_99", "--head_epochs=1")
    assert "conv_dw_99" in err and "conv_dw_13" in err
    err = _refused("launch.train", f"--workdir={tmp_path / 'r'}", "--unfreeze=lora:4@top:9+norm", "--head_epochs=1")
    assert "unfreeze spec 'top:9': K must be an integer in 0..3" in err
    err = _refused("launch.train", f"--workdir={tmp_path / 'r'}", "--stages=unfreeze=lora:4 epochs=1; "
                   "unfreeze=lora:8 epochs=1")
    assert "a run has one LoRA rank" in err
    err = _refused("launch.ablate", f"--root={tmp_path / 'sweep'}", "--sweep=unfreeze:none,top:99", "--",
                   "--head_epochs=1")
    assert "trial unfreeze=top_99" in err or "top:99" in err
    # A head on a lower block drops the blocks above it: a spec naming one has nothing to train.
    err = _refused("launch.train", f"--workdir={tmp_path / 'r'}", "--backbone=mobilenet", "--alpha=0.25",
                   "--features=conv_dw_9", "--unfreeze=blocks:conv_dw_9,conv_dw_11", "--head_epochs=1")
    assert "unknown block conv_dw_11" in err and "--features=conv_dw_9 keeps only these" in err
    err = _refused("launch.train", f"--workdir={tmp_path / 'r'}", "--features=block2", "--unfreeze=top:3",
                   "--head_epochs=1")
    assert "K must be an integer in 0..2" in err
    for bad, says in [("block9", "'block9' is not a block of small_cnn"), ("block1+block1", "names a block twice"),
                      ("top+block1", "top and auto stand alone")]:
        assert says in _refused("launch.train", f"--workdir={tmp_path / 'r'}", f"--features={bad}")
    err = _refused("launch.ablate", f"--root={tmp_path / 'sweep'}", "--sweep=features:top,block2", "--",
                   "--head_epochs=1", "--unfreeze=blocks:block3")
    assert "keeps only these" in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "sweep" / "trials").exists()
