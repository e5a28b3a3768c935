"""After training: evaluate (checked against scikit-learn), export (.keras, SavedModel), predict."""

import json
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from research import backbones
from research.export import decode_and_resize, load_run, preprocessing_layers
from tests.conftest import run_module

TRAIN_PER_CLASS = 120
GOOD = 0.95  # accuracy bar of the trained fixture on its 140 validation images


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from PIL import Image
    from sklearn.datasets import load_digits
    root = tmp_path_factory.mktemp("export")
    d = load_digits()
    # 120 training images a class: enough for a clearly good model (1.0 on the 140
    # validation images on seeds 0-3, ~20 s), so every check below sees real predictions.
    for split, sl in (("train", slice(0, TRAIN_PER_CLASS)), ("val", slice(TRAIN_PER_CLASS, TRAIN_PER_CLASS + 20))):
        for c in (0, 1, 2, 3, 4, 5, 6):
            (root / "data" / split / f"digit {c}").mkdir(parents=True)
            for j, i in enumerate(np.flatnonzero(d.target == c)[sl]):
                img = (d.images[i] * 255 / 16).astype("uint8")
                Image.fromarray(img).convert("RGB").resize((24, 24)).save(root / "data" / split / f"digit {c}" / f"{j}.png")
    wd = root / "run"
    r = run_module("launch.train", f"--workdir={wd}", f"--dataset=folder:{root / 'data'}", "--image_size=16",
                   "--batch_size=16", "--finetune_epochs=15", "--lr=3e-3")
    assert r.returncode == 0, r.stderr[-3000:]
    return root, wd


def _files(root, split="val"):
    return sorted((root / "data" / split).glob("*/*.png"))


def test_exported_models_reproduce_the_training_model(trained):
    root, wd = trained
    files = _files(root)
    _, model, names, _ = load_run(str(wd), checkpoint="latest")
    pixels = np.stack([decode_and_resize(tf.constant(f.read_bytes()), 16).numpy() for f in files])
    ref = tf.nn.softmax(model(backbones.get("small_cnn").preprocess(pixels), training=False)).numpy()

    k = keras.models.load_model(str(wd / "export" / "model.keras"))
    np.testing.assert_allclose(k(pixels).numpy(), ref, rtol=1e-5, atol=1e-6)
    sm = tf.saved_model.load(str(wd / "export" / "saved_model"))
    np.testing.assert_allclose(sm.signatures["predict_float"](tf.constant(pixels))["probabilities"].numpy(), ref,
                               rtol=1e-5, atol=1e-6)
    out = sm.signatures["serving_default"](tf.constant([f.read_bytes() for f in files]))
    np.testing.assert_allclose(out["probabilities"].numpy(), ref, rtol=1e-5, atol=1e-6)
    assert [c.decode() for c in out["classes"].numpy()] == [names[i] for i in ref.argmax(1)]
    labels = json.loads((wd / "export" / "labels.json").read_text())
    assert labels["class_names"] == [f"digit {c}" for c in range(7)] and labels["image_size"] == 16


@pytest.mark.parametrize("backbone", ["vgg16", "resnet50", "mobilenet", "inception_v3", "xception", "small_cnn"])
def test_export_preprocessing_layers_equal_preprocess_input(backbone):
    x = np.random.RandomState(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    y = x
    for layer in preprocessing_layers(backbone):
        y = layer(y)
    np.testing.assert_allclose(np.asarray(y), np.asarray(backbones.get(backbone).preprocess(x.copy())), atol=1e-4)


def test_evaluate_matches_an_independent_computation(trained):
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
    root, wd = trained
    r = run_module("launch.evaluate", f"--workdir={wd}", "--checkpoint=latest", "--name=check")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((wd / "eval" / "check.json").read_text())
    # Reference: the exported SavedModel's probabilities on the raw files, scored by scikit-learn.
    sm = tf.saved_model.load(str(wd / "export" / "saved_model"))
    files = _files(root)
    probs = sm.signatures["serving_default"](tf.constant([f.read_bytes() for f in files]))["probabilities"].numpy()
    names = report["class_names"]
    y = np.array([names.index(f.parent.name) for f in files])
    pred = probs.argmax(1)
    assert report["num_examples"] == len(files) == 140
    assert (pred == y).mean() >= GOOD, (pred == y).mean()  # the fixture trained a good model
    assert report["accuracy"] == pytest.approx((pred == y).mean(), abs=1e-9)
    assert report["loss"] == pytest.approx(-np.log(probs[np.arange(len(y)), y]).mean(), rel=1e-4)
    assert report["confusion_matrix"] == confusion_matrix(y, pred, labels=range(7)).tolist()
    p, rc, f1, sup = precision_recall_fscore_support(y, pred, labels=range(7), zero_division=0)
    for i, c in enumerate(report["per_class"]):
        assert (c["precision"], c["recall"], c["f1"], c["support"]) == pytest.approx((p[i], rc[i], f1[i], sup[i]))
    top5 = np.argsort(-probs, 1)[:, :5]
    assert report["top5_accuracy"] == pytest.approx((top5 == y[:, None]).any(1).mean())
    assert (wd / "eval" / "check_confusion.png").stat().st_size > 1000
    assert any(p.name.startswith("events") for p in (wd / "eval").iterdir())


def test_class_name_mismatch_exits_2(trained, tmp_path):
    root, wd = trained
    other = tmp_path / "other"
    shutil.copytree(root / "data" / "val", other)
    (other / "digit 6").rename(other / "digit six")
    r = run_module("launch.evaluate", f"--workdir={wd}", f"--dataset=folder:{other}")
    assert r.returncode == 2
    assert "missing ['digit 6']" in r.stderr and "unexpected ['digit six']" in r.stderr
    assert "Traceback" not in r.stderr


def test_predict_reports_a_corrupt_file_and_predicts_the_rest(trained, tmp_path):
    root, wd = trained
    folder = tmp_path / "imgs"
    shutil.copytree(root / "data" / "val" / "digit 3", folder)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    for model in (wd / "export", wd / "export" / "model.keras"):
        r = run_module("launch.predict", f"--model={model}", "--json", str(folder))
        assert r.returncode == 1
        assert "broken.png" in r.stderr
        out = json.loads(r.stdout)
        assert len(out["predictions"]) == 20 and [f["image"] for f in out["failed"]] == [str(folder / "broken.png")]
        hits = sum(p["top"][0]["class"] == "digit 3" for p in out["predictions"])
        assert hits >= 19, out["predictions"]  # a good model: at most one of the 20 wrong
        # The same answers as the SavedModel's own bytes signature.
        sm = tf.saved_model.load(str(wd / "export" / "saved_model"))
        files = [p["image"] for p in out["predictions"]]
        ref = sm.signatures["serving_default"](tf.constant([open(f, "rb").read() for f in files]))["probabilities"]
        for p, row in zip(out["predictions"], ref.numpy()):
            assert p["top"][0]["probability"] == pytest.approx(row.max(), rel=1e-5)
