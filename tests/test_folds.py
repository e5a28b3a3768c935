"""`--folds=K --fold=I`: validation is one fold of a stratified K-fold partition of the pool
(the images that are neither test nor the source's own validation split). Checked without
TensorFlow on the carve and on a folder's files, on classes of unequal sizes."""

import dataclasses

import numpy as np
import pytest

from research.config import DataConfig, UserError
from research.data import layout

# Three classes of 23, 7 and 12 images: sizes no fold count divides.
LABELS = np.repeat([0, 1, 2], [23, 7, 12])


def _folds(k, **kw):
    return [layout.carve(LABELS, 0.2, 0.1, folds=k, fold=i, **kw) for i in range(k)]


@pytest.mark.parametrize("k", [2, 3, 5])
def test_folds_are_disjoint_stratified_cover_the_pool_once_and_never_hold_a_test_image(k):
    train0, val0, test0 = layout.carve(LABELS, 0.2, 0.1)
    pool = np.sort(np.concatenate([train0, val0]))
    folds = _folds(k)
    vals = [v for _, v, _ in folds]
    assert np.array_equal(np.sort(np.concatenate(vals)), pool)  # every pool image in exactly one fold
    for train, val, test in folds:
        assert np.array_equal(test, test0)  # the test images of a run without folds
        assert not set(val) & set(train) and not (set(val) | set(train)) & set(test)
        assert np.array_equal(np.sort(np.concatenate([train, val])), pool)
    for c in range(3):
        per_fold = [int((LABELS[v] == c).sum()) for v in vals]
        assert max(per_fold) - min(per_fold) <= 1, (c, per_fold)


def test_folds_do_not_depend_on_the_seed_or_on_which_fold_is_asked_first():
    a = _folds(5)
    b = [layout.carve(LABELS, 0.2, 0.1, folds=5, fold=i) for i in reversed(range(5))][::-1]
    np.random.seed(7)  # a caller's global NumPy seed (the run's --seed) changes nothing
    c = _folds(5)
    for x, y, z in zip(a, b, c):
        for p, q, r in zip(x, y, z):
            assert np.array_equal(p, q) and np.array_equal(p, r)


def test_a_class_smaller_than_the_folds_is_refused():
    with pytest.raises(UserError, match="only 6 image"):
        layout.carve(np.repeat([0, 1], [20, 7]), 0.2, 0.1, folds=7, fold=0)  # class 1 keeps 6 after test


def _tree(root, splits):
    for split, per_class in splits.items():
        for c, n in per_class.items():
            d = root / split / c if split else root / c
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{i}.png").write_bytes(b"")


def test_a_folders_own_validation_split_is_left_out_of_the_pool_and_test_val_makes_it_test(tmp_path):
    _tree(tmp_path, {"train": {"a": 10, "b": 5}, "val": {"a": 3, "b": 3}, "test": {"a": 4, "b": 4}})
    cfg = DataConfig(dataset=f"folder:{tmp_path}", folds=5, fold=1)
    names, splits, _ = layout.folder_splits(cfg)
    own_val = {str(p) for p in (tmp_path / "val").rglob("*.png")}
    own_test = {str(p) for p in (tmp_path / "test").rglob("*.png")}
    train_files = {str(p) for p in (tmp_path / "train").rglob("*.png")}
    assert [len(f) for f in splits["val"]] == [2, 1]  # a fifth of train/'s 10 + 5
    got = {f for fs in splits["train"] + splits["val"] for f in fs}
    assert got == train_files and not got & own_val and {f for fs in splits["test"] for f in fs} == own_test
    # --test=val: the source's validation split is the test split, the pool is train/.
    names, splits, test_from = layout.folder_splits(dataclasses.replace(cfg, test="val"))
    assert {f for fs in splits["test"] for f in fs} == own_val and "validation split" in test_from
    assert {f for fs in splits["train"] + splits["val"] for f in fs} == train_files


@pytest.mark.parametrize("flags,message", [
    ({"folds": 1}, "at least 2"), ({"folds": 3, "fold": 3}, "0..2"), ({"fold": 1}, "without --folds"),
    ({"folds": 3, "dataset": "tfds:tf_flowers"}, "tfds datasets")])
def test_bad_fold_flags_are_refused_before_tensorflow(flags, message):
    with pytest.raises(UserError, match=message):
        DataConfig(**flags).validate()


def test_scrambling_the_test_labels_changes_no_fold(tmp_path):
    """What a fold trains and validates on is the same files with the same labels whatever
    the test split's labels; that no training decision reads test is
    tests/test_protocol.py's scrambled-labels run."""
    for copy, test_classes in (("real", ("a", "b")), ("scrambled", ("b", "a"))):
        _tree(tmp_path / copy, {"train": {"a": 11, "b": 8}, "test": {test_classes[0]: 4, test_classes[1]: 6}})
    got = {}
    for copy in ("real", "scrambled"):
        for fold in range(4):
            _, splits, _ = layout.folder_splits(DataConfig(dataset=f"folder:{tmp_path / copy}", folds=4, fold=fold))
            got[copy, fold] = {k: [sorted(f.split(copy, 1)[1] for f in fs) for fs in splits[k]]
                               for k in ("train", "val")}
            tests = [sorted(f.split(copy, 1)[1] for f in fs) for fs in splits["test"]]
            assert [len(t) for t in tests] == ([4, 6] if copy == "real" else [6, 4])
    for fold in range(4):
        assert got["real", fold] == got["scrambled", fold]
