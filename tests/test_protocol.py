"""The evaluation protocol: a test split no decision reads, and intervals over seeds.

- the three splits are disjoint, complete and the same for every seed;
- a run whose test labels are scrambled takes exactly the same decisions (best/,
  early stopping, bit-identical weights): only its test scores change;
- `best/`'s test score is the one `launch.evaluate` computes on `best/`;
- the t-intervals and paired differences equal scipy's and a hand-checked case;
- the sweep tables report them.
"""

import csv
import json
import math

import numpy as np
import pytest
import tensorflow as tf

from research.studies import stats, tables
from research.data import sources
from research.data import folders
from research.config import DataConfig, UserError
from tests.conftest import run_module, write_digit_folders

# --- the splits ----------------------------------------------------------------------------


def test_carve_is_disjoint_complete_stratified_and_keeps_validation():
    labels = np.repeat(np.arange(4), [50, 31, 7, 2])
    train, val, test = sources.carve(labels, 0.2, 0.1)
    every = np.concatenate([train, val, test])
    assert len(every) == len(set(every.tolist())) == len(labels)  # no index in two splits, none lost
    for c, n in zip(range(4), [50, 31, 7, 2]):
        assert np.sum(labels[val] == c) == (max(1, round(n * 0.2)))
        assert np.sum(labels[train] == c) >= 1  # every class keeps a training image
    assert np.sum(labels[test] == 0) == 5 and np.sum(labels[test] == 3) == 0  # a class of 2: nothing for test
    # Turning the test slice off gives back the same validation images.
    assert np.array_equal(sources.carve(labels, 0.2)[1], val)
    # The split is a function of the labels and fractions only, not of any global RNG.
    np.random.seed(7)
    tf.random.set_seed(7)
    again = sources.carve(labels, 0.2, 0.1)
    assert all(np.array_equal(a, b) for a, b in zip(again, (train, val, test)))


def _digits_images(split_ds):
    return {x.tobytes() for x, _ in split_ds.as_numpy_iterator()}


def test_digits_splits_are_disjoint_and_the_same_whatever_the_seed():
    import keras
    cfg = DataConfig(batch_size=1)
    splits = []
    for seed in (0, 1):
        keras.utils.set_random_seed(seed)
        src = sources.load_source(cfg, 8)
        splits.append([_digits_images(d) for d in (src.train, src.val, src.test)])
    assert splits[0] == splits[1]
    train, val, test = splits[0]
    # Digits has duplicate 8x8 images; the counts say no image was put in two splits.
    assert (src.num_train, src.num_val, src.num_test) == (1259, 359, 179)
    assert len(val & test) <= 2 and len(train & test) <= 5


def test_a_digits_split_does_not_depend_on_the_class_subset():
    """Pretraining on 0-9 and fine-tuning on 5-9 must not put the second run's test images
    in the first run's training set: each digit's split is the same under any --classes."""
    every = sources.load_source(DataConfig(batch_size=1), 8)
    half = sources.load_source(DataConfig(batch_size=1, classes="5-9"), 8)

    def of_digit(ds, label):
        return {x.tobytes() for x, y in ds.as_numpy_iterator() if y == label}

    for split in ("train", "val", "test"):
        # digit 7 is label 7 of the full set and label 2 of the 5-9 subset
        assert of_digit(getattr(every, split), 7) == of_digit(getattr(half, split), 2), split


def _write_folder(root, counts, seed=0):
    """Class folders of tiny PNGs under `root`; returns every file written."""
    from PIL import Image
    rng = np.random.RandomState(seed)
    files = []
    for c, n in enumerate(counts):
        d = root / f"c{c}"
        d.mkdir(parents=True)
        for j in range(n):
            p = d / f"{root.name}_{c}_{j}.png"
            Image.fromarray(rng.randint(0, 255, (8, 8, 3), dtype=np.uint8)).save(p)
            files.append(str(p))
    return files


def _as_sets(splits):
    return {k: {f for fs in per_class for f in fs} for k, per_class in splits.items()}


def test_folder_splits_are_disjoint_for_every_layout(tmp_path):
    # A flat folder: train, val and test carved from it, together exactly its files.
    flat = _write_folder(tmp_path / "flat", [20, 13, 9])
    _, splits, test_from = folders.folder_splits(DataConfig(dataset=f"folder:{tmp_path / 'flat'}"))
    s = _as_sets(splits)
    assert s["train"] | s["val"] | s["test"] == set(flat)
    assert not (s["train"] & s["val"] or s["train"] & s["test"] or s["val"] & s["test"])
    assert len(s["test"]) == 2 + 1 + 1 and test_from.startswith("a 10% slice")
    assert "test" not in folders.folder_splits(DataConfig(dataset=f"folder:{tmp_path / 'flat'}", test="none"))[1]

    # train/ + val/: test carved from train; with --test=val the val folder is the test split.
    tv = tmp_path / "tv"
    train, val = _write_folder(tv / "train", [20, 20]), _write_folder(tv / "val", [6, 6])
    s = _as_sets(folders.folder_splits(DataConfig(dataset=f"folder:{tv}"))[1])
    assert s["val"] == set(val) and s["train"] | s["test"] == set(train) and not s["train"] & s["test"]
    _, splits, test_from = folders.folder_splits(DataConfig(dataset=f"folder:{tv}", test="val"))
    s = _as_sets(splits)
    assert s["test"] == set(val) and s["train"] | s["val"] == set(train) and not s["train"] & s["val"]
    assert "the source's validation split" in test_from

    # train/ + val/ + test/: each folder is its split.
    tvt = tmp_path / "tvt"
    own = {k: set(_write_folder(tvt / k, [5, 5])) for k in ("train", "val", "test")}
    assert _as_sets(folders.folder_splits(DataConfig(dataset=f"folder:{tvt}"))[1]) == own
    # train/ + test/ without val/: validation carved from train, never from test.
    tt = tmp_path / "tt"
    train, test = _write_folder(tt / "train", [10, 10]), _write_folder(tt / "TEST", [3, 3])
    s = _as_sets(folders.folder_splits(DataConfig(dataset=f"folder:{tt}"))[1])
    assert s["test"] == set(test) and s["train"] | s["val"] == set(train) and not s["train"] & s["val"]
    with pytest.raises(UserError, match="--test=val holds out the source's validation split"):
        folders.folder_splits(DataConfig(dataset=f"folder:{tt}", test="val"))


# --- no decision reads test ------------------------------------------------------------------

@pytest.fixture(scope="module")
def digit_folders(tmp_path_factory):
    """Digits 0-2 as train/val/test class folders (`real`), and a copy whose test images
    are all filed under the wrong class (`scrambled`)."""
    root = tmp_path_factory.mktemp("protocol")
    write_digit_folders(root, {"train": slice(0, 40), "val": slice(40, 55), "test": slice(55, 75)})
    return root


def _tensors(path):
    reader = tf.train.load_checkpoint(path)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if "VARIABLE_VALUE" in k and not k.startswith(("meta/", "save_counter/"))}


def _without_test(record):
    return {k: v for k, v in record.items() if not k.startswith("test/")}


def test_scrambled_test_labels_change_no_training_decision(digit_folders, tmp_path):
    root = digit_folders
    # Two stages, early stopping with restore_best_weights, dropout and augmentation: every
    # decision the controller takes is exercised.
    args = ["--deterministic", "--image_size=16", "--batch_size=16", "--dropout=0.2", "--horizontal_flip",
            "--stages=name=head unfreeze=none epochs=3 lr=3e-3; name=ft unfreeze=all epochs=6 lr=3e-3",
            "--early_stopping", "--early_stopping_patience=1", "--early_stopping_min_delta=0.02",
            "--restore_best_weights", "--noexport"]
    res = {}
    for name in ("real", "scrambled"):
        wd = tmp_path / name
        r = run_module("launch.train", f"--workdir={wd}", f"--dataset=folder:{root / name}", *args)
        assert r.returncode == 0, r.stderr[-3000:]
        res[name] = json.loads((wd / "results.json").read_text())
    a, b = res["real"], res["scrambled"]
    assert a["num_test"] == b["num_test"] == 60 and a["test_from"].endswith("real/test")
    # The decisions: every epoch's metrics, the best record, each stage's early stopping.
    timing = ("images_per_second", "train_seconds")  # measured, not decided
    assert [{k: v for k, v in h.items() if k not in timing} for h in a["history"]] == \
        [{k: v for k, v in h.items() if k not in timing} for h in b["history"]]
    assert _without_test(a["best"]) == _without_test(b["best"])
    assert a["stages"] == b["stages"]
    assert a["early_stopping_fired"], "the test needs early stopping to have fired"
    for ckpt in ("ckpt", "best"):
        ta = _tensors(tf.train.latest_checkpoint(str(tmp_path / "real" / ckpt)))
        tb = _tensors(tf.train.latest_checkpoint(str(tmp_path / "scrambled" / ckpt)))
        assert ta.keys() == tb.keys() and len(ta) > 10
        for k in ta:
            assert np.array_equal(ta[k], tb[k]), (ckpt, k)
    # And test was really read: the scrambled labels are scored as wrong.
    assert a["final"]["test/accuracy"] > 0.8 > 0.2 > b["final"]["test/accuracy"]
    assert a["final"]["val/accuracy"] == b["final"]["val/accuracy"]


def test_best_weights_are_scored_on_test_as_evaluate_scores_them(digit_folders, tmp_path):
    """results.json's best/ test score is launch.evaluate's on best/, and the final one on the
    last checkpoint, also when they are different weights (no restore_best_weights)."""
    root = digit_folders
    wd = tmp_path / "run"
    # A second stage at a high learning rate: its last epoch is unlikely to be the best.
    r = run_module("launch.train", f"--workdir={wd}", f"--dataset=folder:{root / 'real'}", "--image_size=16",
                   "--deterministic", "--batch_size=16", "--stages=name=a unfreeze=all epochs=3 lr=3e-3; name=b unfreeze=all epochs=2 "
                   "lr=5e-2 schedule=constant", "--noexport")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((wd / "results.json").read_text())
    assert "test (final weights)" in r.stdout
    assert res["best"]["global_epoch"] < res["epochs_run"], "best/ and the final weights must differ here"
    for ckpt, record in (("best", res["best"]), ("latest", res["final"])):
        r = run_module("launch.evaluate", f"--workdir={wd}", f"--checkpoint={ckpt}", "--split=test", f"--name={ckpt}")
        assert r.returncode == 0, r.stderr[-2000:]
        report = json.loads((wd / "eval" / f"{ckpt}.json").read_text())
        assert report["num_examples"] == 60
        assert record["test/accuracy"] == pytest.approx(report["accuracy"], abs=1e-9), ckpt
        assert record["test/loss"] == pytest.approx(report["loss"], rel=1e-5), ckpt
    # TensorBoard has the test scores beside train/ and val/.
    assert list((wd / "test").glob("events.out.tfevents.*"))


def test_test_none_and_test_split_errors(tmp_path):
    wd = tmp_path / "run"
    r = run_module("launch.train", f"--workdir={wd}", "--image_size=16", "--epochs=1", "--test=none", "--noexport")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((wd / "results.json").read_text())
    assert res["num_test"] == 0 and "test/accuracy" not in res["final"] and res["num_train"] == 1438
    assert "(no test split)" in r.stdout
    r = run_module("launch.evaluate", f"--workdir={wd}", "--split=test")
    assert r.returncode == 2 and "has no test split here" in r.stderr and "Traceback" not in r.stderr
    for flag, message in (("--test=maybe", "--test"), ("--test_fraction=1.5", "--test_fraction=1.5 must be"),
                          ("--test=val", "--test=val holds out the source's validation split")):
        r = run_module("launch.train", f"--workdir={tmp_path / 'bad'}", flag, "--epochs=1")
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (flag, r.stderr[-1500:])
        assert not (tmp_path / "bad").exists()


# --- intervals ----------------------------------------------------------------------------------

def test_t_interval_against_scipy_and_a_hand_checked_case():
    from scipy import stats as sp

    # 3 seeds: mean 0.85, sample sd 0.05, t(0.975, 2) = 4.302653: half-width 0.124207.
    iv = stats.t_interval([0.80, 0.85, 0.90])
    assert (iv.mean, iv.n) == (pytest.approx(0.85), 3)
    assert (iv.lo, iv.hi) == (pytest.approx(0.725793, abs=1e-6), pytest.approx(0.974207, abs=1e-6))
    rng = np.random.RandomState(0)
    for n in (2, 3, 5, 10):
        x = rng.normal(0.8, 0.05, n)
        lo, hi = sp.t.interval(0.95, n - 1, loc=x.mean(), scale=sp.sem(x))
        iv = stats.t_interval(x)
        assert (iv.lo, iv.hi) == (pytest.approx(lo), pytest.approx(hi))
    # Paired: the differences per seed (0.02, 0.04, 0.06), not two independent samples.
    d = stats.paired_difference({0: 0.82, 1: 0.89, 2: 0.96, 3: 0.5}, {0: 0.80, 1: 0.85, 2: 0.90})
    assert d.n == 3 and d.mean == pytest.approx(0.04)
    assert (d.lo, d.hi) == (pytest.approx(0.04 - 4.302653 * 0.02 / math.sqrt(3), abs=1e-6),
                            pytest.approx(0.04 + 4.302653 * 0.02 / math.sqrt(3), abs=1e-6))
    assert not d.excludes_zero()  # 0.04 ± 0.0497
    assert stats.paired_difference({0: 0.9, 1: 0.91, 2: 0.92}, {0: 0.8, 1: 0.8, 2: 0.8}).excludes_zero()
    one = stats.t_interval([0.7])
    assert one.n == 1 and not one.has_interval and "no interval" in one.format()


def test_intervals_stay_inside_what_the_metric_can_take_and_two_seeds_say_so():
    from scipy import stats as sp

    # Two seeds whose t-interval (12.7 standard errors) runs past both ends of [0, 1].
    x = [0.6144, 0.7190]
    lo, hi = sp.t.interval(0.95, 1, loc=np.mean(x), scale=sp.sem(x))
    assert lo < 0.01 and hi > 1.3
    iv = stats.t_interval(x, within=stats.bounds("test/accuracy"))
    assert (iv.mean, iv.lo, iv.hi) == (pytest.approx(0.6667), pytest.approx(max(lo, 0.0)), 1.0)
    assert "only 2 seeds: too few for the interval to mean much" in iv.format()
    three = stats.t_interval([0.80, 0.85, 0.90], within=stats.bounds("val/accuracy"))
    assert "too few" not in three.format() and three.lo == pytest.approx(0.725793, abs=1e-6)
    assert stats.t_interval([10.0, 200.0], within=stats.bounds("wall_time_s")).lo == 0.0
    assert stats.t_interval([0.5, 0.7], within=stats.bounds("val/loss")).hi > 1  # a loss has no upper end
    d = stats.paired_difference({0: 0.1, 1: 0.95}, {0: 0.9, 1: 0.05}, metric="test/accuracy")
    assert (d.lo, d.hi) == (-1.0, 1.0)


def test_a_sweep_of_seeds_only_has_its_summary_and_plot(tmp_path):
    rows = [_row("none", s, t, v) for s, t, v in (("0", 0.80, 0.81), ("1", 0.85, 0.86), ("2", 0.90, 0.91))]
    for r in rows:
        r.pop("unfreeze")
        r["group"] = ""
    tables.write_tables(str(tmp_path), rows, ["seed"])
    md = (tmp_path / "results.md").read_text()
    assert "| all | 3 | 0.8500 [0.7258, 0.9742] | 0.8600 [0.7358, 0.9842] |" in md
    (summary,) = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert summary["n"] == "3" and float(summary["test/accuracy_lo"]) == pytest.approx(0.725793, abs=1e-6)
    assert tables.plot(str(tmp_path), rows, ["seed"]) and (tmp_path / "results.png").exists()


def _row(unfreeze, seed, test, val):
    return {"trial": f"{unfreeze}-{seed}", "unfreeze": unfreeze, "seed": seed, "group": unfreeze, "status": "done",
            "test/accuracy": test, "val/accuracy": val, "best/test/accuracy": test, "best/val/accuracy": val,
            "wall_time_s": 1.0, "test_from": "a 10% slice of the training images"}


def test_sweep_tables_report_intervals_and_paired_differences(tmp_path):
    rows = [_row("none", s, t, v) for s, t, v in (("0", 0.80, 0.81), ("1", 0.85, 0.86), ("2", 0.90, 0.91))]
    rows += [_row("all", s, t, v) for s, t, v in (("0", 0.82, 0.9), ("1", 0.89, 0.9), ("2", 0.96, 0.9))]
    keys = ["unfreeze", "seed"]
    base = tables.parse_baseline(None, keys, rows)
    assert base == ("unfreeze", "none")
    tables.write_tables(str(tmp_path), rows, keys, baseline=base)
    md = (tmp_path / "results.md").read_text()
    assert "| none | 3 | 0.8500 [0.7258, 0.9742] | 0.8600 [0.7358, 0.9842] | (baseline) |  |" in md
    # The t-interval's upper end, 1.0639, is cut at the most an accuracy can be.
    assert "| all | 3 | 0.8900 [0.7161, 1.0000] | 0.9000 [0.9000, 0.9000] | +0.0400 [-0.0097, +0.0897] | no |" in md
    assert "Test split: a 10% slice of the training images" in md
    summary = {r["unfreeze"]: r for r in csv.DictReader(open(tmp_path / "summary.csv"))}
    assert float(summary["all"]["diff_mean"]) == pytest.approx(0.04)
    assert summary["all"]["diff_excludes_zero"] == "False" and summary["none"]["diff_mean"] == ""
    assert tables.plot(str(tmp_path), rows, keys)
    with pytest.raises(UserError, match="takes the values none, all"):
        tables.parse_baseline("unfreeze:top:9", keys, rows)
    with pytest.raises(UserError, match="swept keys: unfreeze"):
        tables.parse_baseline("lr:1", keys, rows)
    # Without a test split the table says its numbers are validation's, and optimistic.
    for r in rows:
        r.pop("test/accuracy")
    tables.write_tables(str(tmp_path), rows, keys, baseline=base)
    assert "these are validation numbers" in (tmp_path / "results.md").read_text()


def test_a_weight_variant_s_test_score_gets_its_column(tmp_path):
    rows = [dict(_row("none", s, 0.8, 0.8), **{"test_ema/accuracy": 0.81}) for s in ("0", "1")]
    tables.write_tables(str(tmp_path), rows, ["unfreeze", "seed"])
    header = next(csv.reader(open(tmp_path / "results.csv")))
    assert header[header.index("best/val/accuracy") + 1] == "test_ema/accuracy"
    plain = [_row("none", s, 0.8, 0.8) for s in ("0", "1")]
    tables.write_tables(str(tmp_path), plain, ["unfreeze", "seed"])
    assert "test_ema/accuracy" not in next(csv.reader(open(tmp_path / "results.csv")))
