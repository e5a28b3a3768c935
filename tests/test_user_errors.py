"""Every user error exits with status 2, one clear message, and no traceback."""

import pytest

from tests.conftest import run_module


def _corrupt_folder(tmp_path, tiny_folder):
    bad = tiny_folder / "class 1" / "broken image.jpg"
    data = (tiny_folder / "class 1" / "img 0.jpg").read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # a truncated JPEG
    return tiny_folder, bad


CASES = {
    "unknown dataset": (["--dataset=mnist"], "allowed values: digits, folder:PATH, tfds:NAME"),
    "unknown backbone": (["--backbone=alexnet"], "allowed values: small_cnn, vgg16"),
    "unknown optimizer": (["--optimizer=lion"], "adam|sgd|adamw"),
    "bad flag value": (["--batch_size=abc"], "batch_size"),
    "negative value": (["--batch_size=0"], "--batch_size=0 must be >= 1"),
    "negative data threads": (["--data_threads=-1"], "--data_threads=-1 must be >= 0"),
    "missing folder": (["--dataset=folder:/nonexistent/data"], "no such directory"),
    "size below minimum": (["--backbone=inception_v3", "--image_size=40"], "minimum input size 75"),
    "bad unfreeze spec": (["--unfreeze=top:9"], "valid blocks of small_cnn"),
    "unknown block": (["--unfreeze=from:block7"], "block1, block2, block3"),
    "regex matches nothing": (["--unfreeze=regex:^nothing_here"], "matches no trainable base variable"),
    "bad classes": (["--classes=3-99"], "out of range"),
    "bad stages": (["--stages=unfreeze=all epochs=x"], "not a valid int"),
    "no weights file": (["--weights=/nonexistent.h5"], "no such file"),
    "eval crop out of range": (["--eval_crop=1.5"], "--eval_crop=1.5 must be in (0, 1]"),
    "unknown sampler": (["--sampler=weighted"], "shuffle|balanced"),
    "sampler and class weights": (["--sampler=balanced", "--class_weight=balanced"],
                                  "both correct for class imbalance"),
    "top-5 monitor with 5 classes": (["--classes=0-4", "--early_stopping_monitor=val/top5_accuracy"],
                                     "needs more than 5 classes"),
    "cpu devices without a mirrored strategy": (["--cpu_devices=2"], "add --strategy=mirrored"),
    "a batch that does not divide over the replicas": (["--strategy=mirrored", "--cpu_devices=2", "--batch_size=33"],
                                                       "must divide evenly over the 2 replicas"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_user_error_exit_2(tmp_path, name):
    args, message = CASES[name]
    r = run_module("launch.train", f"--workdir={tmp_path / 'run'}", "--finetune_epochs=1", *args)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr + r.stdout


def test_empty_class_folder(tmp_path, tiny_folder):
    (tiny_folder / "class 3").mkdir()
    r = run_module("launch.train", f"--workdir={tmp_path / 'run'}", f"--dataset=folder:{tiny_folder}")
    assert r.returncode == 2
    assert "class 3" in r.stderr and "holds no images" in r.stderr
    assert "Traceback" not in r.stderr


def test_corrupt_image_named_then_skipped(tmp_path, tiny_folder):
    folder, bad = _corrupt_folder(tmp_path, tiny_folder)
    r = run_module("launch.train", f"--workdir={tmp_path / 'run'}", f"--dataset=folder:{folder}",
                   "--finetune_epochs=1", "--batch_size=8", "--image_size=16")
    assert r.returncode == 2
    assert str(bad) in r.stderr and "--skip_bad_images" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_module("launch.train", f"--workdir={tmp_path / 'run2'}", f"--dataset=folder:{folder}",
                   "--finetune_epochs=1", "--batch_size=8", "--image_size=16", "--skip_bad_images")
    assert r.returncode == 0, r.stderr[-2000:]
    import json
    results = json.loads((tmp_path / "run2" / "results.json").read_text())
    assert results["skipped_images"] == [str(bad)]


def test_subset_checks_every_class_before_writing(tmp_path, tiny_folder):
    out = tmp_path / "subset"
    r = run_module("launch.subset", f"--src={tiny_folder}", f"--out={out}", "--train_per_class=20",
                   "--test_per_class=20")
    assert r.returncode == 2 and "fewer than 40 images" in r.stderr and "Traceback" not in r.stderr, r.stderr[-1000:]
    assert not out.exists()
    r = run_module("launch.subset", f"--src={tiny_folder}", f"--out={out}", "--train_per_class=20",
                   "--test_per_class=5")
    assert r.returncode == 0, r.stderr[-1000:]
    train = sorted(p.name for p in (out / "train" / "class 0").iterdir())
    test = sorted(p.name for p in (out / "test" / "class 0").iterdir())
    everything = sorted(p.name for p in (tiny_folder / "class 0").iterdir())
    assert train == everything[:20] and test == everything[-5:] and not set(train) & set(test)
    assert (out / "train" / "class 0" / train[0]).is_symlink()
