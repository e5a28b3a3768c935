"""Data sources: class subsets, folder splits, augmentation (TFDS: tests/test_tfds.py)."""

import numpy as np
import pytest

from research import data, sources
from research.config import AugmentConfig, DataConfig, UserError


def test_parse_classes():
    names = [f"c{i}" for i in range(10)]
    assert sources.parse_classes("", names) == list(range(10))
    assert sources.parse_classes("0-2,7", names) == [0, 1, 2, 7]
    assert sources.parse_classes("c9,c1", names) == [1, 9]
    for bad in ("0", "3-1", "nope", "11"):
        with pytest.raises(UserError):
            sources.parse_classes(bad, names)


def test_digits_subset_is_relabelled():
    src = sources.load_source(DataConfig(classes="5-9"), 16)
    assert src.class_names == ["5", "6", "7", "8", "9"]
    labels = np.concatenate([y.numpy() for _, y in src.val.batch(500)])
    assert set(labels) == {0, 1, 2, 3, 4}
    assert src.num_train + src.num_val + src.num_test == 896  # every digit 5-9 of the 1797
    assert (src.num_val, src.num_test) == (179, 89)  # 20 % and 10 %, per class


def test_folder_without_val_is_split_deterministically(tiny_folder):
    cfg = DataConfig(dataset=f"folder:{tiny_folder}", val_fraction=0.2, batch_size=4)
    a, b = sources.load_source(cfg, 16), sources.load_source(cfg, 16)
    # 3 classes x 30 images: 20 % validation and 10 % test each
    assert (a.num_train, a.num_val, a.num_test) == (63, 18, 9)
    va = np.concatenate([x.numpy() for x, _ in a.val.batch(100)])
    vb = np.concatenate([x.numpy() for x, _ in b.val.batch(100)])
    assert np.array_equal(va, vb)
    assert va.shape[1:] == (16, 16, 3) and va.dtype == np.uint8


def test_epoch_order_and_augmentation_are_functions_of_seed_and_epoch(tiny_folder):
    src = sources.load_source(DataConfig(dataset=f"folder:{tiny_folder}", batch_size=8), 16)
    aug = AugmentConfig(horizontal_flip=True, rotation=20, zoom=0.2, contrast=0.2, width_shift=0.1)

    def epoch(e, seed=0):
        p = data.Pipeline(src, batch_size=8, preprocess=lambda x: x / 255.0, augment=aug, seed=seed)
        return np.concatenate([x.numpy() for x, _ in p.train_dataset(e)])

    assert np.array_equal(epoch(3), epoch(3))
    assert not np.array_equal(epoch(3), epoch(4))
    assert not np.array_equal(epoch(3), epoch(3, seed=1))


def test_one_stream_over_epochs_equals_the_epochs_built_alone():
    """Training pulls every epoch from one iterator; epoch e must not depend on where it started."""
    src = sources.load_source(DataConfig(dataset="digits", image_size=16), 16)
    p = data.Pipeline(src, batch_size=64, preprocess=lambda x: x / 255.0, seed=3,
                      augment=AugmentConfig(horizontal_flip=True, rotation=20, zoom=0.1))
    n = p.steps_per_epoch

    def arrays(ds):
        xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
        return np.concatenate(xs), np.concatenate(ys)

    x, y = arrays(p.train_stream(2, 3))
    assert len(y) == 3 * n * 64
    for i, e in enumerate((2, 3, 4)):
        xe, ye = arrays(p.train_dataset(e))
        assert np.array_equal(x[i * n * 64:(i + 1) * n * 64], xe) and np.array_equal(y[i * n * 64:(i + 1) * n * 64], ye)
    xs, _ = arrays(p.train_stream(3, 2, skip=5))  # resuming 5 batches into epoch 3
    assert np.array_equal(xs, x[(n + 5) * 64:])
    _, yt = arrays(p.train_stream(2, 2, batches_per_epoch=n - 1))  # gradient accumulation remainder
    assert np.array_equal(yt, np.concatenate([y[:(n - 1) * 64], y[n * 64:(2 * n - 1) * 64]]))


def test_unaugmented_order_changes_with_epoch_and_seed():
    """The shuffle itself is seeded by (seed, epoch): without augmentation, epochs 3 and 4
    of one seed, and epoch 3 of seeds 0 and 1, see the examples in different orders
    (not only differently augmented images). Each example is identified by its pixels."""
    src = sources.load_source(DataConfig(dataset="digits", image_size=8, batch_size=64), 8)

    def order(epoch, seed=0):
        p = data.Pipeline(src, batch_size=64, preprocess=lambda x: x, augment=AugmentConfig(), seed=seed)
        xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in p.train_stream(epoch, 1, augment=False)])
        x, y = np.concatenate(xs), np.concatenate(ys)
        return [hash(row.tobytes()) for row in x.astype(np.uint8)], y

    (a, ya), (b, yb), (c, yc) = order(3), order(4), order(3, seed=1)
    assert order(3)[0] == a  # reproducible
    assert len(a) == len(b) == len(c) == (src.num_train // 64) * 64
    assert len(set(a)) > 0.95 * len(a)  # the digits are (nearly) all distinct images
    for other, y_other, what in ((b, yb, "epoch 4"), (c, yc, "seed 1")):
        same_place = np.mean(np.array(a) == np.array(other))
        assert same_place < 0.05, f"{what}: {same_place:.0%} of examples at the same position as epoch 3 seed 0"
        assert not np.array_equal(ya, y_other), what


def test_a_long_image_check_shows_its_progress(tmp_path, capsys):
    from PIL import Image
    path = tmp_path / "one.png"
    Image.new("RGB", (8, 8), (10, 200, 30)).save(path)
    good, bad = sources.check_images([str(path)] * 2400, skip_bad=False)
    assert len(good) == 2400 and bad == []
    out = capsys.readouterr().out
    # Redirected (not a terminal): the step is named, then one plain line when it ends.
    assert out.startswith("checking 2400 images ...\n") and "2400/2400" in out and "\r" not in out, out
    sources.check_images([str(path)] * 10, skip_bad=False)
    assert capsys.readouterr().out == ""  # a short check stays quiet
