"""After training: evaluate (checked against scikit-learn), export (.keras, SavedModel), predict."""

import io
import json
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from research.model import backbones
from research.run.checkpoints import load_run
from research.serve.export import decode_and_resize, preprocessing_layers
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


@pytest.mark.parametrize("backbone", list(backbones.BACKBONES))
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
        r = run_module("launch.predict", f"--model={model}", "--json", "--batch_size=6", str(folder))
        assert r.returncode == 1
        assert "broken.png" in r.stderr
        out = json.loads(r.stdout)
        assert len(out["predictions"]) == 20 and [f["image"] for f in out["failed"]] == [str(folder / "broken.png")]
        # Said in words, without TensorFlow's graph internals.
        error = out["failed"][0]["error"]
        assert error.startswith("not an image TensorFlow can decode") and "{{" not in error and "[Op:" not in error
        assert "{{" not in r.stderr and "function_node" not in r.stderr
        hits = sum(p["top"][0]["class"] == "digit 3" for p in out["predictions"])
        assert hits >= 19, out["predictions"]  # a good model: at most one of the 20 wrong
        # The same answers as the SavedModel's own bytes signature.
        sm = tf.saved_model.load(str(wd / "export" / "saved_model"))
        files = [p["image"] for p in out["predictions"]]
        ref = sm.signatures["serving_default"](tf.constant([open(f, "rb").read() for f in files]))["probabilities"]
        for p, row in zip(out["predictions"], ref.numpy()):
            assert p["top"][0]["probability"] == pytest.approx(row.max(), rel=1e-5)


def _flat_copy(root, dest):
    """The run's val images as one folder per class, without train/val sub-folders (140 images)."""
    shutil.copytree(root / "data" / "val", dest)
    return dest


def test_evaluate_scores_a_folder_without_splits_whole(trained, tmp_path):
    root, wd = trained
    flat = _flat_copy(root, tmp_path / "flat")
    r = run_module("launch.evaluate", f"--workdir={wd}", f"--dataset=folder:{flat}", "--name=flat")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((wd / "eval" / "flat.json").read_text())
    assert report["split"] == "all"
    assert report["num_examples"] == len(list(flat.glob("*/*.png"))) == 140  # not its 20% slice (28)
    assert "[all] 140 images" in r.stdout


def test_evaluate_skip_bad_images(trained, tmp_path):
    root, wd = trained
    flat = _flat_copy(root, tmp_path / "flat")
    (flat / "digit 2" / "broken.png").write_bytes(b"\x89PNG not really")
    r = run_module("launch.evaluate", f"--workdir={wd}", f"--dataset=folder:{flat}", "--name=bad")
    assert r.returncode == 2
    assert "broken.png" in r.stderr and "--skip_bad_images" in r.stderr and "Traceback" not in r.stderr
    # The flag the message advises exists, and does what it says.
    r = run_module("launch.evaluate", f"--workdir={wd}", f"--dataset=folder:{flat}", "--name=bad",
                   "--skip_bad_images")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((wd / "eval" / "bad.json").read_text())
    assert report["num_examples"] == 140
    assert report["skipped_images"] == [str(flat / "digit 2" / "broken.png")]
    assert "skipped 1 unreadable image(s)" in r.stderr


def test_predict_without_images_says_what_it_found(trained, tmp_path):
    _, wd = trained
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_module("launch.predict", f"--model={wd / 'export'}", str(empty))
    assert r.returncode == 2
    assert f"error: no images to classify in {empty}: found no files" in r.stderr
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("hello")
    r = run_module("launch.predict", f"--model={wd / 'export'}", str(notes))
    assert r.returncode == 2
    assert "found only 1 other file(s)" in r.stderr and "readme.txt" in r.stderr and ".webp" in r.stderr
    assert "Traceback" not in r.stderr


def test_predict_reads_webp_in_folders(trained, tmp_path):
    from PIL import Image
    root, wd = trained
    folder = tmp_path / "webp"
    folder.mkdir()
    sources = _files(root)[::20]  # one image per class
    for f in sources:
        Image.open(f).save(folder / (f.parent.name + ".webp"), lossless=True)
    (folder / "notes.txt").write_text("not an image")
    r = run_module("launch.predict", f"--model={wd / 'export'}", "--json", str(folder))
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert sorted(p["image"] for p in out["predictions"]) == sorted(str(p) for p in folder.glob("*.webp"))
    assert out["skipped"] == [str(folder / "notes.txt")] and "notes.txt" in r.stderr
    # Lossless WebP: the same pixels, so the same probabilities as the PNG originals.
    sm = tf.saved_model.load(str(wd / "export" / "saved_model"))
    ref = sm.signatures["serving_default"](tf.constant([f.read_bytes() for f in sources]))["probabilities"].numpy()
    by_name = {p["image"]: p["top"][0]["probability"] for p in out["predictions"]}
    for f, row in zip(sources, ref):
        assert by_name[str(folder / (f.parent.name + ".webp"))] == pytest.approx(row.max(), rel=1e-5)


def test_damaged_jpegs_are_reported_once_plainly_without_libjpegs_own_lines(trained, tmp_path):
    """libjpeg prints "Improper call to JPEG library in state 201" for a header cut short and "Premature end
    of JPEG data" for a body cut short; `launch.predict` reports each file once, in its own words."""
    from PIL import Image
    root, wd = trained
    good = tmp_path / "good.jpg"
    Image.open(_files(root)[0]).convert("RGB").resize((64, 64)).save(good, quality=95)
    data = good.read_bytes()
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a_good.jpg").write_bytes(data)
    (folder / "b_header.jpg").write_bytes(data[:300])
    (folder / "c_body.jpg").write_bytes(data[:len(data) // 2])
    env = {"TF_CPP_MIN_LOG_LEVEL": "0"}  # even with every TensorFlow log line on
    r = run_module("launch.predict", f"--model={wd / 'export'}", str(folder), env=env)
    assert r.returncode == 1 and r.stdout.startswith(str(folder / "a_good.jpg")), r.stdout
    errors = [ln for ln in r.stderr.splitlines() if "JPEG" in ln or "jpeg" in ln]
    assert [ln.split(":")[0:2] for ln in errors] == [["error", " cannot read " + str(folder / "b_header.jpg")],
                                                     ["error", " cannot read " + str(folder / "c_body.jpg")]], r.stderr


def test_exif_orientation_in_predict_and_the_saved_model(trained, tmp_path):
    """A photo stored sideways with an orientation tag is classified upright by both."""
    from PIL import Image
    root, wd = trained
    upright = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in _files(root)[::20]])
    folder = tmp_path / "photos"
    folder.mkdir()
    raws = []
    for i, image in enumerate(upright):
        # Stored turned 90 degrees counter-clockwise; orientation 6 says "turn 90 clockwise to view".
        exif = Image.Exif()
        exif[0x0112] = 6
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(np.rot90(image, k=1))).save(buf, "JPEG", quality=95, exif=exif.tobytes())
        raws.append(buf.getvalue())
        (folder / f"{i}.jpg").write_bytes(raws[-1])
    stored = [tf.io.decode_jpeg(raw, channels=3).numpy() for raw in raws]
    resize = lambda x: tf.image.resize(tf.cast(x, tf.float32), [16, 16], antialias=True)  # noqa: E731
    turned = np.stack([np.clip(np.round(resize(np.rot90(x, k=-1))), 0, 255) for x in stored])
    sideways = np.stack([np.clip(np.round(resize(x)), 0, 255) for x in stored])
    sm = tf.saved_model.load(str(wd / "export" / "saved_model"))
    want = sm.signatures["predict_float"](tf.constant(turned))["probabilities"].numpy()
    assert np.abs(sm.signatures["predict_float"](tf.constant(sideways))["probabilities"].numpy() - want).max() > 0.05
    served = sm.signatures["serving_default"](tf.constant(raws))["probabilities"].numpy()
    np.testing.assert_allclose(served, want, rtol=1e-5, atol=1e-6)
    r = run_module("launch.predict", f"--model={wd / 'export'}", "--json", "--top_k=7", str(folder))
    assert r.returncode == 0, r.stderr[-3000:]
    for p in json.loads(r.stdout)["predictions"]:
        i = int(p["image"].rsplit("/", 1)[1].split(".")[0])
        names = json.loads((wd / "export" / "labels.json").read_text())["class_names"]
        got = {t["class"]: t["probability"] for t in p["top"]}
        np.testing.assert_allclose([got[c] for c in names], want[i], rtol=1e-5, atol=1e-6)


def test_test_time_augmentation_averages_the_views_probabilities(trained):
    """--tta=flip and --tta=crops against the exported model's probabilities on the same views."""
    root, wd = trained
    files = _files(root)
    pixels = np.stack([decode_and_resize(tf.constant(f.read_bytes()), 16).numpy() for f in files]).astype("float32")
    sm = tf.saved_model.load(str(wd / "export" / "saved_model"))

    def probs(views):
        return np.mean([sm.signatures["predict_float"](tf.constant(v))["probabilities"].numpy() for v in views], 0)

    big = tf.image.resize(pixels, (18, 18)).numpy()  # round(16 / 0.875)
    crops = [big[:, 1:17, 1:17], big[:, :16, :16], big[:, :16, 2:], big[:, 2:, :16], big[:, 2:, 2:]]
    expected = {"flip": probs([pixels, pixels[:, :, ::-1]]), "crops": probs(crops + [crops[0][:, :, ::-1]])}
    for mode, views in (("flip", 2), ("crops", 6)):
        r = run_module("launch.evaluate", f"--workdir={wd}", "--checkpoint=latest", f"--tta={mode}",
                       f"--name=tta_{mode}")
        assert r.returncode == 0, r.stderr[-3000:]
        report = json.loads((wd / "eval" / f"tta_{mode}.json").read_text())
        y = np.array([report["class_names"].index(f.parent.name) for f in files])
        p = expected[mode]
        assert report["tta"]["views"] == views
        assert report["tta"]["accuracy"] == pytest.approx((p.argmax(1) == y).mean(), abs=1e-9)
        assert report["tta"]["loss"] == pytest.approx(-np.log(p[np.arange(len(y)), y]).mean(), rel=1e-4)
        assert "accuracy" in report and f"test-time augmentation ({mode}" in r.stdout


@pytest.mark.slow  # a run, evaluate and two exports
def test_eval_crop_is_the_same_view_in_training_evaluate_and_the_export(tmp_path):
    """--eval_crop=0.75 at 16 px: the central 12x12 resized back to 16x16, pinned to a crop
    by slicing and tf.image.resize (not Keras's CenterCrop/Resizing, which implement it)."""
    wd = tmp_path / "run"
    r = run_module("launch.train", f"--workdir={wd}", "--image_size=16", "--classes=0-4", "--epochs=2",
                   "--eval_crop=0.75")
    assert r.returncode == 0, r.stderr[-3000:]
    final = json.loads((wd / "results.json").read_text())["final"]
    r = run_module("launch.evaluate", f"--workdir={wd}", "--checkpoint=latest", "--split=test", "--name=crop")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((wd / "eval" / "crop.json").read_text())["accuracy"] == pytest.approx(
        final["test/accuracy"], abs=1e-9)

    from research.data import sources
    config, model, _, _ = load_run(str(wd), checkpoint="latest")
    x, y = (np.concatenate(a) for a in zip(*[(a.numpy(), b.numpy()) for a, b in
                                             sources.load_source(config.data, 16).test.batch(256)]))
    x = x.astype(np.float32)
    cropped = tf.image.resize(x[:, 2:14, 2:14], (16, 16)).numpy()
    entry = backbones.get(config.model.backbone)
    reference = keras.ops.softmax(model(entry.preprocess(cropped), training=False)).numpy()
    assert float((reference.argmax(1) == y).mean()) == pytest.approx(final["test/accuracy"], abs=1e-9)
    uncropped = keras.ops.softmax(model(entry.preprocess(x), training=False)).numpy()
    assert not np.allclose(reference, uncropped, atol=1e-3)  # the crop changes the predictions
    exported = keras.models.load_model(wd / "export" / "model.keras")
    np.testing.assert_allclose(exported(x).numpy(), reference, atol=1e-5)
    saved = tf.saved_model.load(str(wd / "export" / "saved_model")).signatures["predict_float"]
    np.testing.assert_allclose(saved(tf.constant(x))["probabilities"].numpy(), reference, atol=1e-5)
