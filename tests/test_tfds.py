"""The tfds: source: the real prepare path offline (a tiny builder), named splits, mock data.

`tests/tiny_tfds.py` defines a `GeneratorBasedBuilder` whose `download_and_prepare`
runs for real (no network: it generates its examples). Users' builders download
first; everything after the download is this same code.
"""

import json
import zlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from research.data import sources
from research.config import DataConfig, UserError
from tests import tiny_tfds
from tests.conftest import run_module


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """tiny_colors prepared by `research.data.pipeline` itself (which calls `download_and_prepare`)."""
    data_dir = tmp_path_factory.mktemp("tfds")
    src = sources.load_source(DataConfig(dataset="tfds:tiny_colors", data_dir=str(data_dir), batch_size=8), 16)
    return data_dir, src


def test_a_builder_is_prepared_for_real_and_its_validation_split_chosen(prepared):
    data_dir, src = prepared
    version_dir = data_dir / "tiny_colors" / "1.0.0"
    assert (version_dir / "dataset_info.json").exists()
    assert sorted(p.name.split(".")[0] for p in version_dir.glob("*.tfrecord*")) == [
        "tiny_colors-test", "tiny_colors-train", "tiny_colors-validation"]
    assert src.class_names == tiny_tfds.CLASSES
    # No --val_split: TFDS's own `validation` split, not a slice of train.
    assert (src.num_train, src.num_val) == (48, 12)
    x, y = next(iter(src.val.batch(12)))
    assert x.shape == (12, 16, 16, 3) and x.dtype == tf.uint8
    assert sorted(np.bincount(y.numpy())) == [4, 4, 4]


def test_train_on_a_prepared_dataset_with_a_named_val_split(prepared, tmp_path):
    """The launcher loads the prepared files by name (its process never imports the builder's code)."""
    data_dir, _ = prepared
    wd = tmp_path / "run"
    r = run_module("launch.train", f"--workdir={wd}", "--dataset=tfds:tiny_colors", f"--data_dir={data_dir}",
                   "--val_split=test", "--test=none", "--image_size=16", "--batch_size=8", "--finetune_epochs=4", "--lr=3e-3",
                   "--noexport")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((wd / "results.json").read_text())
    assert res["class_names"] == tiny_tfds.CLASSES
    assert (res["num_train"], res["num_val"]) == (48, 18)  # validated on `test`, not `validation`
    assert res["final"]["val/accuracy"] >= 0.9, res["final"]


def test_sizes_come_from_the_metadata_and_class_counts_only_when_asked(prepared):
    data_dir, src = prepared
    # All classes: the split sizes are the builder's metadata, nothing was read to count.
    assert src.train_counts == [] and (src.num_train, src.num_val, src.num_test) == (48, 12, 18)
    counted = np.bincount([int(y) for _, y in src.train.as_numpy_iterator()], minlength=3).tolist()
    assert src.class_counts() == counted and sum(counted) == 48
    # A class subset has no metadata: its labels are counted (the images left undecoded).
    sub = sources.load_source(DataConfig(dataset="tfds:tiny_colors", data_dir=str(data_dir), batch_size=8,
                                         classes="red,blue"), 16)
    assert sub.train_counts == [counted[0], counted[2]] and sub.num_train == counted[0] + counted[2]
    assert sub.num_train == sum(1 for _ in sub.train)


def test_the_tfds_test_split_is_the_test_split_and_never_validation(prepared):
    data_dir, src = prepared
    assert src.num_test == 18 and "split 'test'" in src.test_from
    with pytest.raises(UserError, match="'test' would be both the validation and the test split"):
        sources.load_source(DataConfig(dataset="tfds:tiny_colors", data_dir=str(data_dir), val_split="test"), 16)
    # Without a validation split of its own, validation and test are disjoint slices of train.
    carved = sources.load_source(DataConfig(dataset="tfds:tiny_colors", data_dir=str(data_dir), test="val",
                                            batch_size=8), 16)
    assert (carved.num_train, carved.num_val, carved.num_test) == (38, 10, 12)
    seen = [{x.tobytes() for x, _ in ds.as_numpy_iterator()} for ds in (carved.train, carved.val, carved.test)]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    # Slices of one split cannot be checked for overlap; a carve below a whole percent is empty.
    with pytest.raises(UserError, match="slices of the same split"):
        sources.load_source(DataConfig(dataset="tfds:tiny_colors", data_dir=str(data_dir), val_split="test[:50%]"), 16)
    with pytest.raises(UserError, match="each must be at least 0.01"):
        sources.load_source(DataConfig(dataset="tfds:tiny_colors", data_dir=str(data_dir), test="val",
                                       val_fraction=0.004), 16)


def test_unknown_tfds_name_is_a_user_error_naming_the_data_dir(tmp_path):
    with pytest.raises(UserError, match=r"tfds:no_such_set: no such TFDS dataset, and no prepared copy in "
                                        r"--data_dir=.*no_such_set/VERSION/dataset_info.json"):
        sources.load_source(DataConfig(dataset="tfds:no_such_set", data_dir=str(tmp_path)), 16)


def test_unknown_val_split_lists_the_splits(prepared):
    data_dir, _ = prepared
    with pytest.raises(UserError, match="--val_split='valid' not in tfds:tiny_colors; splits: "):
        sources.load_source(DataConfig(dataset="tfds:tiny_colors", data_dir=str(data_dir), val_split="valid"), 16)


def test_mock_data_labels_are_learned(tmp_path):
    """tf_flowers under `tfds.testing.mock_data`, with examples a model can learn.

    TFDS's default mock examples are random pixels with random labels; these
    are tinted by their label instead, and each split (the train slice and the
    validation slice carved from it) draws its own examples, so a high
    validation accuracy means the labels went through the tfds: path intact.
    """
    from research.run import train as train_lib
    from research.config import ExperimentConfig, ModelConfig, StageConfig, TrainConfig

    def as_dataset(self, split, **kwargs):
        rng = np.random.RandomState(zlib.crc32(str(split).encode()))
        labels = np.arange(60) % 5
        images = np.stack([tiny_tfds.example_image(int(y) % 3, rng, side=20) for y in labels])
        return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels.astype(np.int64)})

    cfg = ExperimentConfig(data=DataConfig(dataset="tfds:tf_flowers", image_size=16, batch_size=8, classes="0-2"),
                           model=ModelConfig(), train=TrainConfig(export=False),
                           stages=(StageConfig(epochs=4, lr=3e-3),))
    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        res = train_lib.train_and_evaluate(cfg, str(tmp_path / "run"), verbose=False)
    assert res["class_names"] == ["dandelion", "daisy", "tulips"]
    assert res["num_val"] == 36  # labels 3 and 4 left out by --classes
    assert res["final"]["val/accuracy"] >= 0.9, res["final"]
