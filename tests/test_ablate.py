"""Sweeps: kill and re-run without recomputation; results tables; TensorBoard serves every trial."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from research.studies import trials as trials_lib
from research.config import UserError
from tests.conftest import ROOT, run_module

TRAIN = ["--image_size=16", "--classes=0-4", "--finetune_epochs=2", "--batch_size=32", "--verbosity=0"]
SWEEP = ["--sweep=unfreeze:none,top:1", "--sweep=seed:0,1"]


def test_parse_and_expand():
    sweep = trials_lib.parse_sweep(["unfreeze:none,top:1", "seed:0,1,2", "unfreeze_b:blocks:block1,block3;all"])
    assert sweep[2] == ("unfreeze_b", ["blocks:block1,block3", "all"])
    trials = trials_lib.expand(sweep[:2], ["--lr=1e-3"])
    assert len(trials) == 6
    assert trials[1].flags == ["--lr=1e-3", "--unfreeze=none", "--seed=1"]
    assert trials[0].group == trials[1].group != trials[3].group
    with pytest.raises(UserError):
        trials_lib.parse_sweep(["nocolon"])


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory):
    """A 4-trial sweep, SIGKILLed after its second trial finished, then re-run to completion."""
    root = tmp_path_factory.mktemp("sweep")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    cmd = [sys.executable, "-m", "launch.ablate", f"--root={root}", *SWEEP, "--", *TRAIN]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 600
    finished = []
    while time.time() < deadline:
        finished = sorted(p for p in (root / "trials").glob("*/results.json")) if (root / "trials").exists() else []
        if len(finished) >= 2:
            break
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    done_before = {p.parent.name: p.stat().st_mtime_ns for p in finished}
    assert 2 <= len(done_before) < 4, done_before
    rerun = run_module("launch.ablate", f"--root={root}", *SWEEP, "--", *TRAIN)
    return root, done_before, rerun


def test_killed_sweep_resumes_without_recomputing(sweep_root):
    root, done_before, rerun = sweep_root
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for name, mtime in done_before.items():
        assert (root / "trials" / name / "results.json").stat().st_mtime_ns == mtime, f"{name} was recomputed"
        assert f"running {name}" not in rerun.stdout
    rows = list(csv.DictReader(open(root / "results.csv")))
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows)
    assert {(r["unfreeze"], r["seed"]) for r in rows} == {("none", "0"), ("none", "1"), ("top:1", "0"), ("top:1", "1")}
    md = (root / "results.md").read_text()
    assert "test/accuracy: mean and 95 % t-interval over seeds" in md
    assert md.count("| top:1 |") == 3  # two trials, one aggregate
    assert all(r["test/accuracy"] and r["val/accuracy"] for r in rows)
    summary = {r["unfreeze"]: r for r in csv.DictReader(open(root / "summary.csv"))}
    assert summary["top:1"]["n"] == "2" and summary["top:1"]["diff_n"] == "2"  # paired with unfreeze=none
    assert (root / "results.png").stat().st_size > 1000
    none_params = {r["trainable_params"] for r in rows if r["unfreeze"] == "none"}
    assert none_params == {"645"}  # the head alone: 128*5 + 5


def test_failed_trial_is_recorded_and_others_run(tmp_path):
    # A learning rate that diverges: valid flags, a run that fails (non-finite loss, exit 3).
    r = run_module("launch.ablate", f"--root={tmp_path}", "--sweep=lr:1e-3,1e12", "--",
                   *TRAIN[:-2], "--finetune_epochs=1", "--optimizer=sgd")
    assert r.returncode == 1
    rows = {row["lr"]: row for row in csv.DictReader(open(tmp_path / "results.csv"))}
    assert rows["1e-3"]["status"] == "done"
    assert rows["1e12"]["status"] == "failed" and "non-finite training loss" in rows["1e12"]["error"]


def test_invalid_sweep_values_are_refused_before_any_trial_runs(tmp_path):
    # Split on commas, the third value is the bare block name `block3`; an unknown block
    # needs the backbone's block list, which is checked up front too.
    for sweep, message in (("--sweep=unfreeze:top:1,blocks:block2,block3", "unfreeze spec 'block3' is not valid"),
                           ("--sweep=unfreeze:none,from:nope", "unknown block 'nope'")):
        r = run_module("launch.ablate", f"--root={tmp_path}", sweep, "--", *TRAIN)
        assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
        assert not (tmp_path / "trials").exists() or not any((tmp_path / "trials").iterdir())


@pytest.mark.slow  # ~40 s; reuse of finished trials: test_killed_sweep_resumes_without_recomputing
def test_a_finished_trial_is_reused_only_with_the_same_config(tmp_path):
    args = [f"--root={tmp_path}", "--sweep=unfreeze:none", "--", "--image_size=16", "--classes=0-1", "--batch_size=32",
            "--verbosity=0", "--finetune_epochs=1"]
    assert run_module("launch.ablate", *args).returncode == 0
    results = tmp_path / "trials" / "unfreeze-none" / "results.json"
    mtime = results.stat().st_mtime_ns
    again = run_module("launch.ablate", *args)  # same flags: skipped, nothing recomputed
    assert again.returncode == 0 and results.stat().st_mtime_ns == mtime
    changed = args[:-1] + ["--finetune_epochs=2"]
    r = run_module("launch.ablate", *changed)
    assert r.returncode == 2 and "stages.0.epochs: 1 -> 2" in r.stderr and "--rerun" in r.stderr, r.stderr[-2000:]
    assert results.stat().st_mtime_ns == mtime
    # A trial from before runs had a test split is stale too, though its fields read the same.
    config = json.loads((tmp_path / "trials" / "unfreeze-none" / "config.json").read_text())
    del config["data"]["test"]
    (tmp_path / "trials" / "unfreeze-none" / "config.json").write_text(json.dumps(config))
    r = run_module("launch.ablate", *args)
    assert r.returncode == 2 and "data.test: ran before runs had a test split" in r.stderr, r.stderr[-2000:]
    r = run_module("launch.ablate", changed[0], "--rerun", *changed[1:])
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(results.read_text())["epochs_run"] == 2
    assert list(csv.DictReader(open(tmp_path / "results.csv")))[0]["epochs"] == "2"


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _get(url, data=None):
    req = urllib.request.Request(url, data=None if data is None else json.dumps(data).encode(),
                                 headers={"Content-Type": "application/json"} if data is not None else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_tensorboard_serves_every_trial(sweep_root):
    root, _, rerun = sweep_root
    assert rerun.returncode == 0
    trials = sorted(p.name for p in (root / "trials").iterdir() if p.is_dir())
    port = _free_port()
    tb = subprocess.Popen([sys.executable, "-m", "tensorboard.main", f"--logdir={root}", "--host=127.0.0.1",
                           f"--port={port}", "--load_fast=false", "--reload_interval=1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        scalars = images = groups = None
        while time.time() < deadline:
            try:
                scalars = _get(f"{base}/data/plugin/scalars/tags")
                images = _get(f"{base}/data/plugin/images/tags")
                groups = _get(f"{base}/data/plugin/hparams/session_groups",
                              {"experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS"],
                               "colParams": [], "startIndex": 0, "sliceSize": 100})
                if all(f"trials/{t}/val" in scalars for t in trials) and len(groups.get("sessionGroups", [])) >= len(trials):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(1)
        for t in trials:
            assert {"loss", "accuracy", "learning_rate", "images_per_second", "grad_norm"} <= set(scalars[f"trials/{t}/train"])
            assert {"loss", "accuracy"} <= set(scalars[f"trials/{t}/val"])
            assert "augmented_inputs" in images[f"trials/{t}/train"]
        names = {g["name"] for g in groups["sessionGroups"]}
        assert all(any(t in n for n in names) for t in trials), names
        hp_names = {h["name"] for g in groups["sessionGroups"] for h in [{"name": k} for k in g["hparams"]]}
        assert {"unfreeze", "seed"} <= hp_names
        # A numeric setting is a number in the dashboard (sortable), a spec a category.
        values = [g["hparams"] for g in groups["sessionGroups"]]
        assert all(isinstance(v["seed"], (int, float)) and isinstance(v["unfreeze"], str) for v in values), values
    finally:
        tb.terminate()
        tb.wait(timeout=30)


def _transfer_summary(root):
    rows = list(csv.DictReader(open(root / "results.csv")))
    acc = {}
    for r in rows:
        acc.setdefault((r["condition"], int(r["n"])), []).append(float(r["test/accuracy"]))
    return {k: sum(v) / len(v) for k, v in acc.items()}, rows


@pytest.mark.slow
def test_transfer_study_tiny_produces_table_and_plot(tmp_path):
    r = run_module("launch.ablate", "--study=transfer", f"--root={tmp_path}", "--seeds=0", "--epochs=1",
                   "--classes_a=0-1", "--classes_b=2-3", "--parallel=2", "--", "--image_size=16", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    mean, rows = _transfer_summary(tmp_path)
    assert len(rows) == 2 + 3 * 4 and all(row["status"] == "done" for row in rows)
    assert set(mean) == {("baseA", 0), ("baseB", 0)} | {(c, n) for c in ("AnB", "AnB+", "BnB", "BnB+") for n in (1, 2, 3)}
    md = (tmp_path / "transfer.md").read_text()
    assert "| AnB+ |" in md and "n=3" in md and "Paired difference against baseB" in md
    assert (tmp_path / "transfer.png").stat().st_size > 1000
    # The frozen AnB at n=3 really froze the copied base: only the head trained.
    trainable = json.loads((tmp_path / "trials" / "AnB__n-3__seed-0" / "trainable.json").read_text())
    assert trainable[0]["variables"] == ["head/kernel", "head/bias"]


@pytest.mark.slow
def test_default_transfer_study_has_the_papers_shape(tmp_path):
    """`python -m launch.ablate --study=transfer` (3 seeds on digits, ~10 minutes), judged on
    test accuracy with paired intervals (docs/RESULTS.md)."""
    from research.studies import stats

    r = run_module("launch.ablate", "--study=transfer", f"--root={tmp_path}", timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    mean, rows = _transfer_summary(tmp_path)
    by_seed = {}
    for row in rows:
        by_seed.setdefault((row["condition"], int(row["n"])), {})[row["seed"]] = float(row["test/accuracy"])
    # Fine-tuned transfer's mean is not below training B from scratch.
    assert all(mean[("AnB+", n)] >= mean[("baseB", 0)] for n in (1, 2, 3)), mean
    # Freezing all the other half's blocks is a cliff the same half's are not, seed by seed.
    cliff = stats.paired_difference(by_seed[("AnB", 3)], by_seed[("BnB", 3)])
    assert cliff.n == 3 and cliff.hi < 0, cliff
    assert mean[("AnB", 3)] - mean[("AnB", 1)] < mean[("BnB", 3)] - mean[("BnB", 1)]


RECIPE_TRAIN = ["--image_size=16", "--classes=0-4", "--head_epochs=1", "--finetune_epochs=1", "--unfreeze=all",
                "--batch_size=32", "--verbosity=0"]


@pytest.mark.slow  # 6 runs, 3 of them model.fit, then the re-run, ~100 s on 2 cores
def test_recipes_study_runs_the_guide_beside_the_defaults_on_the_same_test_split(tmp_path):
    root = tmp_path / "recipes"
    args = [f"--root={root}", "--study=recipes", "--seeds=0,1", "--recipe=const:--schedule=constant --lr=3e-3",
            "--", *RECIPE_TRAIN]
    r = run_module("launch.ablate", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(root / "summary.csv")))
    assert [row["recipe"] for row in rows] == ["guide", "default", "const"]
    assert all(row["n"] == "2" for row in rows)
    assert rows[0]["diff_mean"] == "" and rows[1]["diff_n"] == rows[2]["diff_n"] == "2"
    results = {t: json.loads((root / "trials" / t / "results.json").read_text())
               for t in ("recipe-guide__seed-0", "recipe-default__seed-0", "recipe-const__seed-1")}
    assert results["recipe-guide__seed-0"]["recipe"] == "keras-guide"
    assert len({(r["num_test"], r["test_from"]) for r in results.values()}) == 1  # one test split for all
    const = json.loads((root / "trials" / "recipe-const__seed-1" / "config.json").read_text())
    assert const["stages"][0]["schedule"] == "constant" and const["stages"][0]["lr"] == 3e-3
    assert const["train"]["seed"] == 1
    # The paired difference is the mean of the per-seed differences of the trials' own numbers.
    acc = {(rec, s): json.loads((root / "trials" / f"recipe-{rec}__seed-{s}" / "results.json").read_text())
           ["final"]["test/accuracy"] for rec in ("guide", "default") for s in (0, 1)}
    expected = ((acc["default", 0] - acc["guide", 0]) + (acc["default", 1] - acc["guide", 1])) / 2
    assert float(rows[1]["diff_mean"]) == pytest.approx(expected, abs=1e-9)
    assert "Δ vs recipe=guide" in (root / "results.md").read_text()
    # Run again: every trial, the guide's included, is finished and reused.
    r = run_module("launch.ablate", *args)
    assert r.returncode == 0 and "running" not in r.stdout, r.stdout[-2000:]


@pytest.mark.parametrize("extra,message", [
    (["--recipe=guide:--lr=1"], "'guide' is taken"),
    (["--recipe=nocolon"], "is not NAME:FLAGS"),
    (["--recipe=x:lr=1"], "'lr=1' is not a training --flag"),
    (["--recipe=x:--workdir=/tmp/elsewhere"], "each trial gets its own --workdir"),
    (["--recipe=x:--lr='1"], "No closing quotation"),
    (["--", "--image_size=16", "--unfreeze=top:1", "--head_epochs=1"], "the Keras guide's recipe trains the head, "
                                                                       "then the whole base"),
])
def test_bad_recipes_exit_2_before_any_trial(tmp_path, extra, message):
    args = [f"--root={tmp_path / 'r'}", "--study=recipes", *extra]
    if "--" not in extra:
        args += ["--", *RECIPE_TRAIN]
    r = run_module("launch.ablate", *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "r" / "trials").exists() or not os.listdir(tmp_path / "r" / "trials")


GUIDE_SCRIPT = '''
import json, sys
from tensorflow.python.framework import config as tf_config
from research.config import DataConfig, ExperimentConfig, StageConfig, TrainConfig
from research.studies import guide

config = ExperimentConfig(data=DataConfig(image_size=16, classes="0-2", batch_size=64),
                          train=TrainConfig(seed=0, deterministic=sys.argv[2] == "on"),
                          stages=(StageConfig(name="head", unfreeze="none", epochs=1, lr=1e-3),))
guide.run(config, sys.argv[1], log=lambda *a: None)
print(json.dumps(tf_config.is_op_determinism_enabled()))
'''


def test_the_guides_recipe_honours_deterministic(tmp_path):
    """`--deterministic` reaches the `model.fit` trials of `--study=recipes` too, so the guide's rows of
    docs/RESULTS.md repeat like the others."""
    script = tmp_path / "guide.py"
    script.write_text(GUIDE_SCRIPT)
    for mode, expected in (("on", True), ("off", False)):
        r = subprocess.run([sys.executable, str(script), str(tmp_path / mode), mode], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads(r.stdout.strip().splitlines()[-1]) is expected


@pytest.mark.slow  # two trials; the follower's reading of the run's lines is unit-tested in the default suite
def test_a_sweep_reports_each_trials_epochs_and_the_time_left(tmp_path, monkeypatch):
    """Between "running X" and "X done", every epoch a trial finishes is reported (its number
    over the whole run, its stage's, and the validation accuracy the trial itself recorded),
    and each trial's start says where the sweep is and, once one trial is timed, how long is left."""
    from launch.train import config_from_args

    monkeypatch.setattr(trials_lib, "PROGRESS_EVERY_S", 0.2)
    root = str(tmp_path / "sweep")
    trials = trials_lib.expand(trials_lib.parse_sweep(["seed:0,1"]),
                               ["--image_size=16", "--classes=0-2", "--head_epochs=2", "--finetune_epochs=2",
                                "--unfreeze=top:1", "--noexport", "--batch_size=64"])
    trials_lib.prepare(root, trials, config_from_args)
    lines = []
    statuses = trials_lib.run_all(root, trials, log=lines.append)
    assert [s["status"] for s in statuses.values()] == ["done", "done"], lines
    starts = [ln for ln in lines if ln.startswith("[ablate] running")]
    assert "(1 of 2 to run)" in starts[0] and "stdout.log" in starts[0], starts
    assert "(2 of 2 to run; about " in starts[1] and " left)" in starts[1], starts
    for t in trials:
        history = json.loads((tmp_path / "sweep" / "trials" / t.name / "results.json").read_text())["history"]
        expected = {f"epoch {i + 1}/4 ({h['stage']} {h['epoch']}/2), val/accuracy {h['val/accuracy']:.4f}"
                    for i, h in enumerate(history)}
        reported = {ln.split(f"{t.name}: ", 1)[1] for ln in lines if ln.startswith(f"[ablate]   {t.name}: ")}
        # The trial's last epochs may end between two polls; what is reported is true and in the run.
        assert reported and reported <= expected, (reported, expected)
    lines.clear()
    trials_lib.run_all(root, trials, log=lines.append)
    assert lines == ["[ablate] 2 of 2 trial(s) already finished with these settings: reused"]


@pytest.mark.slow  # 4 trials, ~60 s on 2 cores; the peft study's unit tests and the LoRA seams stay in the default suite
def test_a_sweep_over_parameter_kind_specs_tabulates_what_each_trained(tmp_path):
    """`--sweep=unfreeze:norm,bias,top:1+norm,lora:4` through the sweep launcher's library: every
    trial runs, and results.csv says how many backbone parameters each trained (small_cnn: BatchNorm
    gamma/beta 448, beta 224, block3's kernel 73,728, rank-4 factors of the three convolutions)."""
    from launch.train import config_from_args
    from research.studies import ablation

    rows = ablation.run_sweep(str(tmp_path), ["unfreeze:norm,bias,top:1+norm,lora:4"],
                              ["--image_size=16", "--classes=0-2", "--head_epochs=1", "--finetune_epochs=1",
                               "--noexport", "--batch_size=64"], config_from_args, log=lambda *a: None)
    assert [r["status"] for r in rows] == ["done"] * 4
    table = {r["unfreeze"]: r for r in csv.DictReader(open(tmp_path / "results.csv"))}
    assert {k: int(r["backbone_trained_params"]) for k, r in table.items()} == {
        "norm": 448, "bias": 224, "top:1+norm": 73728 + 448, "lora:4": 236 + 1408 + 2816}
    assert {k: int(r["trainable_params"]) - int(r["backbone_trained_params"]) for k, r in table.items()} == {
        k: 128 * 3 + 3 for k in table}  # the head


def test_the_follower_reports_finished_epochs_over_the_whole_run_from_a_growing_log(tmp_path):
    """What `launch.ablate` says between a trial's start and end, from the lines the run prints
    (research/run/controller.py): epochs counted over the stages, lines read only once whole,
    and a resumed trial's earlier output not read again."""
    from research.config import ExperimentConfig, StageConfig

    config = ExperimentConfig(stages=(StageConfig(name="head", unfreeze="none", epochs=2),
                                      StageConfig(name="ft", epochs=3)))
    log = tmp_path / "stdout.log"
    log.write_text("stage head epoch 1/2\n  val/loss 0.9  val/accuracy 0.5000  (10 img/s)\n")  # an earlier session
    f = trials_lib.Follower(str(log), config)
    assert f.poll() is None
    with open(log, "a") as out:
        out.write("stage head epoch 2/2\n12/12 - 1s\n  val/loss 0.8  val/accu")
    assert f.poll() is None  # the validation line is not whole yet
    with open(log, "a") as out:
        out.write("racy 0.6000  (12 img/s)\n\n== stage ft\nstage ft epoch 1/3\n  val/loss 0.7  val/accuracy 0.7000\n"
                  "stage ft epoch 2/3\n")
    assert f.poll() == "epoch 3/5 (ft 1/3), val/accuracy 0.7000"  # the newest of the two that ended
    assert f.poll() is None
