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
    assert best["checkpoint"] != latest["checkpoint"] or res["best_epoch"] == res["epochs_run"]


def _sweep_in_its_second_epoch(tmp_path):
    """A two-trial sweep started in its own process group, once its first trial is in epoch 2:
    (the launcher's process, its arguments, the first trial's stdout.log)."""
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
    return proc, args, log


@pytest.mark.slow  # ~40 s; a killed sweep's resume is tests/test_ablate.py's default
def test_ctrl_c_on_a_sweep_exits_75_in_one_line_and_the_trial_resumes(tmp_path):
    proc, args, log = _sweep_in_its_second_epoch(tmp_path)
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


@pytest.mark.slow  # a second interrupted sweep; the Ctrl-C test above keeps the sweep's exit 75 in the default suite
def test_a_trial_preempted_alone_stops_the_sweep_with_75(tmp_path):
    """SIGTERM to the trial's process only (a preemption; or a Ctrl-C the launcher itself did not
    see): the trial saves and the sweep stops as interrupted, instead of running the next trial."""
    import psutil

    proc, _, _ = _sweep_in_its_second_epoch(tmp_path)
    [trial] = psutil.Process(proc.pid).children()
    trial.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        "error: interrupted; what finished is kept, run the same command again to resume"]
    assert not (tmp_path / "trials" / "lr-2e-3").exists(), "the sweep went on to the next trial"
    assert (tmp_path / "trials" / "lr-1e-3" / "ckpt" / "checkpoint").exists()


@pytest.fixture(scope="module")
def smoothed_cropped_run(tmp_path_factory):
    """Five digit classes trained with label smoothing and a central evaluation crop, exported."""
    wd = tmp_path_factory.mktemp("smooth") / "run"
    cfg = ExperimentConfig(data=DataConfig(image_size=16, classes="0-4", eval_crop=0.75),
                           train=TrainConfig(export=True, steps_per_loop=5, label_smoothing=0.3),
                           stages=(StageConfig(epochs=2),))
    return wd, train_lib.train_and_evaluate(cfg, str(wd), verbose=False)


def test_reported_losses_are_plain_cross_entropy_under_label_smoothing(smoothed_cropped_run):
    """Smoothing is a training loss; validation and test report the plain cross-entropy,
    the loss `launch.evaluate` computes from the same checkpoint's probabilities."""
    from research.serve.evaluate import evaluate_run

    wd, res = smoothed_cropped_run
    for split in ("val", "test"):
        report = evaluate_run(str(wd), split=split, checkpoint="latest")
        assert res["final"][f"{split}/loss"] == pytest.approx(report["loss"], rel=1e-5), split
        assert res["final"][f"{split}/accuracy"] == pytest.approx(report["accuracy"], abs=1e-9), split


def test_the_eval_crop_reaches_evaluate_and_the_export(smoothed_cropped_run):
    """--eval_crop=0.75 at 16 px is the central 12x12 resized back to 16x16, written here by
    slicing and tf.image.resize, not by the Keras layers the code uses."""
    import keras
    import numpy as np
    import tensorflow as tf
    from research.data import sources
    from research.model import backbones
    from research.run.checkpoints import load_run
    from research.serve.evaluate import evaluate_run

    wd, res = smoothed_cropped_run
    config, model, _, _ = load_run(str(wd), checkpoint="latest")
    x, y = (np.concatenate(a) for a in zip(*[(a.numpy(), b.numpy()) for a, b in
                                             sources.load_source(config.data, 16).test.batch(256)]))
    x = x.astype(np.float32)
    preprocess = backbones.get(config.model.backbone).preprocess
    reference = keras.ops.softmax(model(preprocess(tf.image.resize(x[:, 2:14, 2:14], (16, 16))),
                                        training=False)).numpy()
    uncropped = keras.ops.softmax(model(preprocess(x), training=False)).numpy()
    assert not np.allclose(reference, uncropped, atol=1e-3)  # the crop changes the predictions
    assert float((reference.argmax(1) == y).mean()) == pytest.approx(res["final"]["test/accuracy"], abs=1e-9)
    report = evaluate_run(str(wd), split="test", checkpoint="latest", name="crop")
    assert report["accuracy"] == pytest.approx(res["final"]["test/accuracy"], abs=1e-9)
    exported = keras.models.load_model(wd / "export" / "model.keras")
    np.testing.assert_allclose(exported(x).numpy(), reference, atol=1e-5)
    saved = tf.saved_model.load(str(wd / "export" / "saved_model")).signatures["predict_float"]
    np.testing.assert_allclose(saved(tf.constant(x))["probabilities"].numpy(), reference, atol=1e-5)


def test_evaluate_s_confusion_matrix_and_per_class_scores_with_one_sided_mistakes(three_class_run, monkeypatch):
    """Half of class 0 predicted as class 1, never class 1 as class 0: a transposed matrix,
    or precision and recall swapped, would show. Rows are true classes, as scikit-learn's."""
    import numpy as np
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
    from research.serve import evaluate

    real = evaluate.predict_dataset
    forced = {}

    def one_sided(model, ds):
        logits, labels = real(model, ds)
        pred = labels.copy()
        zeros = np.flatnonzero(labels == 0)
        pred[zeros[: len(zeros) // 2]] = 1
        forced.update(labels=labels, pred=pred)
        return np.eye(3)[pred] * 10.0, labels

    monkeypatch.setattr(evaluate, "predict_dataset", one_sided)
    wd, _ = three_class_run
    report = evaluate.evaluate_run(str(wd), split="test", checkpoint="best", name="one_sided")
    labels, pred = forced["labels"], forced["pred"]
    n0 = int((labels == 0).sum())
    by_hand = [[n0 - n0 // 2, n0 // 2, 0], [0, int((labels == 1).sum()), 0], [0, 0, int((labels == 2).sum())]]
    assert n0 >= 2 and report["confusion_matrix"] == by_hand
    assert report["confusion_matrix"] == confusion_matrix(labels, pred).tolist()
    p, r, f1, support = precision_recall_fscore_support(labels, pred, zero_division=0)
    for i, c in enumerate(report["per_class"]):
        assert (c["precision"], c["recall"], c["f1"], c["support"]) == pytest.approx((p[i], r[i], f1[i], support[i]))
    assert report["per_class"][0]["precision"] == 1.0 and report["per_class"][0]["recall"] < 1.0
    assert report["per_class"][1]["recall"] == 1.0 and report["per_class"][1]["precision"] < 1.0
    assert report["accuracy"] == pytest.approx(float((pred == labels).mean()))


def test_epochs_are_counted_from_one_in_results_as_in_the_logs_and_checkpoint_names(three_class_run):
    wd, res = three_class_run
    assert [h["global_epoch"] for h in res["history"]] == [1, 2, 3]
    assert [(h["stage"], h["epoch"]) for h in res["history"]] == [("head", 1), ("ft", 1), ("ft", 2)]
    assert 1 <= res["best_epoch"] == res["best"]["global_epoch"] <= res["epochs_run"] == 3
    assert res["best"]["checkpoint"] == os.path.join("best", f"ckpt-{res['best_epoch']}")
    assert (wd / f"{res['best']['checkpoint']}.index").exists()
    trainable = json.loads((wd / "trainable.json").read_text())
    assert [r["from_epoch"] for r in trainable] == [1, 1]


def test_json_files_keep_the_order_their_records_were_made_in(tmp_path, three_class_run):
    """Not sorted: an `auto:` choice's scores read input to output (conv_dw_2 before
    conv_dw_10), a history record starts with its stage and epochs."""
    from research.run.workdir import atomic_write_json

    scores = {f"conv_dw_{i}": 1.0 / i for i in (1, 2, 10, 11)}
    atomic_write_json(str(tmp_path / "t.json"), {"auto": {"scores": scores}})
    assert list(json.loads((tmp_path / "t.json").read_text())["auto"]["scores"]) == list(scores)
    wd, _ = three_class_run
    history = json.loads((wd / "results.json").read_text())["history"]
    assert list(history[0])[:4] == ["stage", "epoch", "global_epoch", "step"]
