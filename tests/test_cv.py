"""Choosing by K-fold cross-validation (`launch.ablate --folds=K`), refit and the fold ensemble.

- the CV interval is the corrected resampled t-interval (scipy's t.interval with the
  corrected scale), the selection's tie rule, the refit's epochs (median best epoch);
- `--refit` trains on the whole pool, fold or no fold, and has no validation;
- a CV sweep's trials are a plain `--sweep=fold:...`'s (the same names: reused);
- end to end, on digit folders that learn: the chosen row is the highest CV score, the
  refit trains exactly the folds' median best epochs without validation or `best/`, the
  ensemble's probabilities are the mean of the fold models' own exports' (in evaluate,
  the export, `model.keras` and `launch.predict`), a re-run reuses every trial, and
  scrambled test labels change no decision (same pick, bit-identical fold checkpoints).
"""

import csv
import json
import math
import os

import numpy as np
import pytest
from scipy import stats as sps

from research.config import DataConfig, ExperimentConfig, UserError
from research.data import layout
from research.studies import cv, stats, trials
from tests.conftest import run_module, shared_path, write_digit_folders

LABELS = np.repeat([0, 1, 2], [23, 7, 12])


def test_refit_trains_on_the_whole_pool_with_or_without_folds_and_keeps_test():
    train0, val0, test0 = layout.carve(LABELS, 0.2, 0.1)
    pool = np.sort(np.concatenate([train0, val0]))
    for folds, fold in ((0, 0), (3, 2), (5, 0)):
        train, val, test = layout.carve(LABELS, 0.2, 0.1, folds=folds, fold=fold, refit=True)
        assert np.array_equal(train, pool) and len(val) == 0 and np.array_equal(test, test0)


def test_refit_is_refused_where_it_has_nothing_to_decide_on():
    from research.config.validate import validate

    base = ExperimentConfig()
    with pytest.raises(UserError, match="--refit"):
        validate(ExperimentConfig(data=DataConfig(refit=True), train=_es(base, True, "val/loss")))
    validate(ExperimentConfig(data=DataConfig(refit=True), train=_es(base, True, "train/loss")))
    with pytest.raises(UserError, match="refit"):
        DataConfig(dataset="tfds:mnist", refit=True).validate()
    import dataclasses
    for bad in (dict(stages=(dataclasses.replace(base.stages[0], unfreeze="auto:probe:1"),)),
                dict(train=dataclasses.replace(base.train, cache_features=True)),
                dict(train=dataclasses.replace(base.train, early_stopping=dataclasses.replace(
                    base.train.early_stopping, restore_best_weights=True)))):
        with pytest.raises(UserError, match="--refit"):
            validate(dataclasses.replace(base, data=DataConfig(refit=True), **bad))
    weights = shared_path("weights", "mobilenet_2_5_224_tf_no_top.h5")
    if os.path.exists(weights):  # --features=auto needs pretrained weights before it reaches the refit's check
        model = dataclasses.replace(base.model, backbone="mobilenet", alpha=0.25, weights=weights, features="auto")
        with pytest.raises(UserError, match="--refit"):
            validate(dataclasses.replace(base, data=DataConfig(refit=True, image_size=128), model=model))


def _es(config, enabled, monitor):
    import dataclasses
    return dataclasses.replace(config.train, early_stopping=dataclasses.replace(
        config.train.early_stopping, enabled=enabled, monitor=monitor))


@pytest.mark.parametrize("folds", [2, 5, 10])
def test_cv_interval_is_the_corrected_resampled_t_interval(folds):
    x = np.array([0.81, 0.86, 0.79, 0.9, 0.84, 0.88, 0.8, 0.83, 0.87, 0.85])[: max(folds, 4)]
    n = len(x)
    lo, hi = sps.t.interval(0.95, n - 1, loc=x.mean(), scale=math.sqrt(x.var(ddof=1) * (1 / n + 1 / (folds - 1))))
    got = stats.cv_interval(x, folds)
    assert got.mean == pytest.approx(x.mean()) and got.lo == pytest.approx(lo) and got.hi == pytest.approx(hi)
    plain = stats.t_interval(x)
    assert got.hi - got.lo > plain.hi - plain.lo  # wider than treating folds as independent
    assert stats.cv_interval([0.5], folds).n == 1 and not stats.cv_interval([0.5], folds).has_interval


def test_kendall_tau_is_scipys():
    a, b = [0.9, 0.8, 0.85, 0.7], [0.86, 0.84, 0.83, 0.71]
    assert stats.kendall_tau(a, b) == pytest.approx(sps.kendalltau(a, b).statistic)


def _scored(cv_means, cv_losses):
    return [{"row": {"k": str(i)}, "group": f"k-{i}", "cv": stats.Interval(m, m, m, 5), "cv_loss": loss,
             "split_val": stats.Interval(math.nan, math.nan, math.nan, 0), "split_loss": math.nan}
            for i, (m, loss) in enumerate(zip(cv_means, cv_losses))]


def test_choose_takes_the_highest_cv_score_and_breaks_ties_by_the_lower_loss():
    assert cv.choose(_scored([0.8, 0.9, 0.85], [0.1, 0.5, 0.2]), "cv")["group"] == "k-1"
    assert cv.choose(_scored([0.9, 0.9, 0.85], [0.4, 0.3, 0.2]), "cv")["group"] == "k-1"
    assert cv.choose(_scored([0.9, 0.9], [0.4, 0.3]), "split") is None  # no single-split score


def _results(tmp_path, name, stages):
    t = trials.Trial(name, {}, [])
    os.makedirs(trials.trial_dir(str(tmp_path), t))
    with open(os.path.join(trials.trial_dir(str(tmp_path), t), "results.json"), "w") as f:
        json.dump({"stages": stages}, f)
    return t


def test_the_refit_trains_the_epochs_the_kept_fold_weights_went_through(tmp_path):
    """Every epoch run (early stopped or not), or a stage's best epoch when it ended by
    restoring its own best weights; the median over folds, halves rounded up."""
    def stage(name, run, restored=None):
        return {"name": name, "epochs_run": run,
                "weights_from": f"best/ckpt-9 (stage {restored[0]}, epoch {restored[1]})" if restored
                else "last epoch"}

    ts = [_results(tmp_path, "a", [stage("head", 8), stage("ft", 6)]),
          _results(tmp_path, "b", [stage("head", 8, ("head", 3)), stage("ft", 6, ("ft", 2))]),
          _results(tmp_path, "c", [stage("head", 5), stage("ft", 6, ("head", 5))])]  # ft restored the head's
    assert [cv.kept_epochs(s) for s in (stage("ft", 6, ("ft", 2)), stage("ft", 4), stage("ft", 6, ("head", 1)))] \
        == [2, 4, 6]
    assert cv.median_kept_epochs(str(tmp_path), ts) == (5, 6)  # (8, 3, 5) and (6, 2, 6)
    assert cv.median_kept_epochs(str(tmp_path), ts[:2]) == (6, 4)  # 5.5 -> 6, 4.0


def test_a_cv_sweeps_trials_are_a_plain_fold_sweeps_and_fold_flags_are_refused():
    base = ["--dataset=digits", "--head_epochs=1"]
    p = cv.plan(["lr:1e-3,3e-3", "seed:0,1"], base, folds=3, split_seeds=["0"])
    plain = trials.expand(trials.parse_sweep(["lr:1e-3,3e-3", "seed:0,1", "fold:0,1,2"]), [*base, "--folds=3"])
    assert sorted(t.name for t in p.selection_trials()[:12]) == sorted(t.name for t in plain)
    assert [t.name for t in p.selection_trials()[12:]] == ["lr-1e-3__seed-0", "lr-3e-3__seed-0"]
    for bad in (dict(sweep=["fold:0,1"]), dict(flags=["--folds=3"]), dict(flags=["--refit"])):
        with pytest.raises(UserError, match="do not sweep or pass"):
            cv.plan(bad.get("sweep", ["lr:1e-3"]), base + bad.get("flags", []), folds=3)
    with pytest.raises(UserError, match="not a final model"):
        cv.plan(["lr:1e-3"], base, folds=3, finals=["average"])


# --- end to end ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digit_pool(tmp_path_factory):
    """Digits 0-2: train/ (the pool, 60 a class) and test/ (20 a class) class folders, and a
    copy whose test images are all filed under the wrong class."""
    root = tmp_path_factory.mktemp("cv")
    write_digit_folders(root, {"train": slice(0, 60), "test": slice(60, 80)})
    return root


# Early stopping with patience 1: the folds run different epoch counts, which the refit's median reads.
FLAGS = ["--backbone=small_cnn", "--image_size=16", "--batch_size=16", "--head_epochs=3", "--finetune_epochs=3",
         "--finetune_lr=1e-3", "--unfreeze=all", "--deterministic", "--early_stopping",
         "--early_stopping_patience=1"]


def _sweep(root, data):
    return run_module("launch.ablate", f"--root={root}", "--folds=3", "--sweep=lr:1e-3,1e-2", "--split_seeds=", "--", f"--dataset=folder:{data}", *FLAGS, timeout=900)


def _csv(root):
    with open(os.path.join(root, "results.csv")) as f:
        return list(csv.DictReader(f))


def _tensors(path):
    import tensorflow as tf
    reader = tf.train.load_checkpoint(path)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if "VARIABLE_VALUE" in k and not k.startswith(("meta/", "save_counter/"))}


@pytest.mark.slow
def test_cv_sweep_chooses_by_cv_refits_ensembles_resumes_and_never_reads_test(digit_pool, tmp_path):
    import keras
    import tensorflow as tf

    from research.serve.export import export_run
    from research.serve.predict import load_exported

    root = str(tmp_path / "cv")
    r = _sweep(root, digit_pool / "real")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _csv(root)
    folds = [x for x in rows if x["fold"] not in ("", None)]
    assert len(folds) == 6 and all(x["status"] == "done" for x in rows)
    # The pick is the highest mean fold validation accuracy, computed here from the trials.
    means = {lr: np.mean([float(x["val/accuracy"]) for x in folds if x["lr"] == lr]) for lr in ("1e-3", "1e-2")}
    assert len(set(means.values())) == 2, means  # the fixture separates the rows
    pick = max(means, key=means.get)
    report = open(os.path.join(root, "results.md")).read()
    chosen_line = next(line for line in report.splitlines() if "**chosen**" in line)
    assert chosen_line.startswith(f"| {pick} |"), chosen_line

    # Refit: exactly the folds' median best epoch per stage, no validation, no best/.
    fold_dirs = [os.path.join(root, "trials", f"lr-{pick}__fold-{i}") for i in range(3)]
    # The folds' weights are their last epoch's (no restore): every epoch each stage ran.
    ran = [[s["epochs_run"] for s in json.load(open(os.path.join(d, "results.json")))["stages"]] for d in fold_dirs]
    want = [int(np.floor(np.median(col) + 0.5)) for col in zip(*ran)]
    refit = os.path.join(root, "trials", f"lr-{pick}__final-refit")
    res = json.load(open(os.path.join(refit, "results.json")))
    assert [s["epochs_run"] for s in res["stages"]] == want
    assert res["best"] is None and not os.path.exists(os.path.join(refit, "best"))
    assert not any(k.startswith("val") for h in res["history"] for k in h) and "val/accuracy" not in res["final"]
    assert res["num_train"] == 180 and res["num_val"] == 0 and res["num_test"] == 60
    assert "test/accuracy" in res["final"]

    # The ensemble: the mean of each fold model's own export, on the test images.
    paths = sorted(str(p) for p in (digit_pool / "real" / "test").rglob("*.png"))
    from research.data import images as images_lib
    pixels = np.stack([images_lib.decode_and_resize(tf.io.read_file(p), 16).numpy() for p in paths])
    labels = np.array([int(os.path.basename(os.path.dirname(p))[-1]) for p in paths])
    member_probs = []
    for i, d in enumerate(fold_dirs):
        export_run(d, checkpoint="latest", out_dir=str(tmp_path / f"member{i}"))
        member_probs.append(load_exported(str(tmp_path / f"member{i}"))[0](pixels))
    want_probs = np.mean(member_probs, axis=0)
    final = os.path.join(root, "final", f"lr-{pick}")
    saved = load_exported(os.path.join(final, "export"))[0](pixels)
    np.testing.assert_allclose(saved, want_probs, atol=2e-6)
    kmodel = keras.models.load_model(os.path.join(final, "export", "model.keras"))
    np.testing.assert_allclose(kmodel(pixels, training=False).numpy(), want_probs, atol=2e-6)
    ev = json.load(open(os.path.join(final, "eval", "own_test.json")))
    assert ev["accuracy"] == pytest.approx(float((want_probs.argmax(1) == labels).mean()), abs=1e-12)
    assert ev["loss"] == pytest.approx(float(-np.log(want_probs[np.arange(len(labels)), labels]).mean()), abs=1e-5)
    out = run_module("launch.predict", f"--model={final}/export", "--top_k=3", "--json", *paths[:5])
    assert out.returncode == 0, out.stderr[-2000:]
    names = json.load(open(os.path.join(final, "export", "labels.json")))["class_names"]
    for i, pred in enumerate(json.loads(out.stdout)["predictions"]):
        assert pred["image"] == paths[i]
        got = {t["class"]: t["probability"] for t in pred["top"]}
        np.testing.assert_allclose([got[n] for n in names], want_probs[i], atol=2e-6)
    # launch.evaluate --ensemble with flips: its plain numbers are the sweep's report's.
    ev2 = run_module("launch.evaluate", "--ensemble=" + ",".join(fold_dirs), f"--out={tmp_path / 'ens'}",
                     "--tta=flip")
    assert ev2.returncode == 0, ev2.stderr[-2000:]
    again = json.load(open(tmp_path / "ens" / "eval" / "own_test.json"))
    assert again["accuracy"] == ev["accuracy"] and again["tta"]["views"] == 2

    # Re-run: every trial reused, the same table.
    stamps = {d: os.path.getmtime(os.path.join(d, "results.json")) for d in [*fold_dirs, refit]}
    r2 = _sweep(root, digit_pool / "real")
    assert r2.returncode == 0 and "already finished" in r2.stdout
    assert {d: os.path.getmtime(os.path.join(d, "results.json")) for d in stamps} == stamps
    assert open(os.path.join(root, "results.md")).read().split("Code:")[0] == report.split("Code:")[0]

    # Scrambled test labels: the same pick, bit-identical fold checkpoints, other test scores.
    other = str(tmp_path / "scrambled")
    r3 = _sweep(other, digit_pool / "scrambled")
    assert r3.returncode == 0, r3.stderr[-3000:]
    chosen_other = next(line for line in open(os.path.join(other, "results.md")).read().splitlines()
                        if "**chosen**" in line)
    assert chosen_other.split("|")[1] == chosen_line.split("|")[1]
    for lr in ("1e-3", "1e-2"):
        for i in range(3):
            a, b = (os.path.join(x, "trials", f"lr-{lr}__fold-{i}") for x in (root, other))
            for sub in ("best", "ckpt"):
                ta, tb = (_tensors(tf.train.latest_checkpoint(os.path.join(x, sub))) for x in (a, b))
                assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta), (lr, i, sub)
    test_a = [float(x["test/accuracy"]) for x in folds]
    test_b = [float(x["test/accuracy"]) for x in _csv(other) if x["fold"] not in ("", None)]
    assert test_a != test_b


# A refit run: the whole pool of 3 folds, no validation, two stages.
REFIT = ["--folds=3", "--refit", "--deterministic", "--image_size=16", "--classes=0-4", "--batch_size=32",
         "--steps_per_loop=5", "--dropout=0.3", "--horizontal_flip", "--checkpoint_keep=10",
         "--stages=name=head unfreeze=none epochs=2 lr=3e-3; name=ft unfreeze=top:2 epochs=2 lr=1e-3"]


@pytest.mark.slow
def test_a_refit_resumes_bit_identically_after_sigkill_and_two_replicas_match_one_device(tmp_path):
    import signal

    from tests.test_distribute_precision import COMMON, _run_and_compare
    from tests.test_resume import _assert_bit_identical, _start, _wait_for_checkpoint

    ref = tmp_path / "ref"
    r = run_module("launch.train", f"--workdir={ref}", *REFIT)
    assert r.returncode == 0, r.stderr[-3000:]
    a = json.loads((ref / "results.json").read_text())
    assert a["num_val"] == 0 and a["num_train"] + a["num_test"] == 901 and [s["epochs_run"] for s in a["stages"]] == [2, 2]

    wd = tmp_path / "killed"
    proc = _start(wd, REFIT)
    _wait_for_checkpoint(wd, 3, proc)  # the head stage's end: the kill lands in the ft stage
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (wd / "results.json").exists(), "the run finished before it could be killed"
    r = run_module("launch.train", f"--workdir={wd}", *REFIT)
    assert r.returncode == 0 and "Resuming from" in r.stdout, r.stderr[-3000:]
    _assert_bit_identical(ref / "ckpt", wd / "ckpt")
    b = json.loads((wd / "results.json").read_text())
    assert a["final"] == b["final"] and b["best"] is None
    assert [h["train/loss"] for h in a["history"]] == [h["train/loss"] for h in b["history"]]

    # Two replicas against one device, without dropout and augmentation (drawn per replica).
    # SGD: Adam divides by its second moment, which turns the rounding of replica sums on
    # near-zero gradients into whole steps (as in tests/test_modern_backbones.py's ViT).
    plain = ["--folds=3", "--refit", *COMMON, "--optimizer=sgd", "--finetune_lr=0.05"]
    one = tmp_path / "one"
    r = run_module("launch.train", f"--workdir={one}", "--strategy=default", *plain)
    assert r.returncode == 0, r.stderr[-3000:]
    _run_and_compare(one, tmp_path / "two", "--strategy=mirrored", "--cpu_devices=2", *plain)
    assert "test/accuracy" in json.loads((tmp_path / "two" / "results.json").read_text())["final"]
