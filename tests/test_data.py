"""Data sources: class subsets, folder splits, augmentation (TFDS: tests/test_tfds.py)."""

import numpy as np
import pytest
import tensorflow as tf

from research.data import pipeline as data, sources

from research.data import folders
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
    good, bad, _ = folders.check_images([str(path)] * 2400, skip_bad=False)
    assert len(good) == 2400 and bad == []
    out = capsys.readouterr().out
    # Redirected (not a terminal): the step is named, then one plain line when it ends.
    assert out.startswith("checking 2400 images ...\n") and "2400/2400" in out and "\r" not in out, out
    folders.check_images([str(path)] * 10, skip_bad=False)
    assert capsys.readouterr().out == ""  # a short check stays quiet


def _imbalanced_source(counts, size=4):
    """A Source whose image i of class c is filled with the value 100 c + i (its identity)."""
    ys = np.concatenate([np.full(n, c) for c, n in enumerate(counts)]).astype(np.int32)
    ids = np.concatenate([100 * c + np.arange(n) for c, n in enumerate(counts)])
    xs = np.broadcast_to(ids[:, None, None, None], (len(ids), size, size, 3)).astype(np.uint8)
    ds = tf.data.Dataset.from_tensor_slices((xs, ys))
    return sources.Source(train=ds, val=ds.take(2), num_train=len(ys), num_val=2,
                          class_names=[f"c{c}" for c in range(len(counts))], image_size=size,
                          train_counts=list(counts))


def test_balanced_sampler_draws_classes_uniformly_and_cycles_each_class():
    counts = [60, 12, 8]  # 80 images; the rarest class is 7.5x rarer than the commonest
    p = data.Pipeline(_imbalanced_source(counts), batch_size=8, preprocess=lambda x: x, augment=AugmentConfig(),
                      seed=0, sampler="balanced")
    assert p.steps_per_epoch == 10
    epochs = 30
    batches = [(x.numpy(), y.numpy()) for x, y in p.train_stream(0, epochs, augment=False)]
    ids = np.concatenate([x[:, 0, 0, 0] for x, _ in batches]).astype(int)
    y = np.concatenate([y for _, y in batches])
    assert np.array_equal(ids // 100, y)  # images keep their labels
    # Uniform over classes: each of 3 classes ~ Binomial(2400, 1/3); 5 standard deviations is ~115.
    freq = np.bincount(y, minlength=3)
    assert len(y) == epochs * 80 and np.all(np.abs(freq - len(y) / 3) < 5 * np.sqrt(len(y) * 2 / 9)), freq
    # Shuffled cycles within a class, restarted each epoch: in an epoch, every run of n_c
    # consecutive draws of class c, aligned on its cycles, holds every image of c once.
    for e in range(epochs):
        ids_e, y_e = ids[e * 80:(e + 1) * 80], y[e * 80:(e + 1) * 80]
        for c, n in enumerate(counts):
            seq = ids_e[y_e == c]
            for start in range(0, len(seq) - n + 1, n):
                assert sorted(seq[start:start + n]) == list(range(100 * c, 100 * c + n)), (e, c)
    # A function of (seed, epoch): the stream started at epoch 4, or resumed 3 batches into it,
    # gives the same batches; another seed does not.
    again = [(x.numpy(), y.numpy()) for x, y in p.train_stream(4, 2, augment=False)]
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(again, batches[40:60]))
    resumed = [x.numpy() for x, _ in p.train_stream(4, 1, skip=3, augment=False)]
    assert all(np.array_equal(a, b[0]) for a, b in zip(resumed, batches[43:50]))
    other = data.Pipeline(_imbalanced_source(counts), batch_size=8, preprocess=lambda x: x,
                          augment=AugmentConfig(), seed=1, sampler="balanced")
    assert not np.array_equal(next(iter(other.train_stream(0, 1, augment=False)))[0].numpy(), batches[0][0])


def test_default_sampler_sees_each_image_once_per_epoch():
    p = data.Pipeline(_imbalanced_source([60, 12, 8]), batch_size=8, preprocess=lambda x: x, augment=AugmentConfig())
    ids = np.concatenate([x.numpy()[:, 0, 0, 0] for x, _ in p.train_dataset(0, augment=False)]).astype(int)
    assert sorted(ids) == sorted(np.concatenate([100 * c + np.arange(n) for c, n in enumerate([60, 12, 8])]))
