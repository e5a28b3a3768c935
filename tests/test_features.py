"""Feature-extraction workflow: head-only on cached features equals head-only through the base."""

import numpy as np
import pytest
import tensorflow as tf

from research.run import build as build_lib, train as train_lib
from research.config import DataConfig, ExperimentConfig, ModelConfig, StageConfig, TrainConfig


def _cfg(weights="none", spec="all", cache=False, epochs=3, features="top"):
    return ExperimentConfig(
        data=DataConfig(dataset="digits", image_size=16, classes="0-4"),
        model=ModelConfig(backbone="small_cnn", weights=weights, dropout=0.0, features=features),
        train=TrainConfig(cache_features=cache, export=False, steps_per_loop=7),
        stages=(StageConfig(name="s", unfreeze=spec, epochs=epochs, lr=3e-3),))


def _head(wd, features="top"):
    model = build_lib.build(_cfg(features=features), 5, tf.distribute.get_strategy()).model
    tf.train.Checkpoint(model=model).restore(tf.train.latest_checkpoint(str(wd / "ckpt"))).expect_partial()
    return {v.path: v.numpy() for v in model.weights}


# `block1+block2`: the base cut above block2, the head on both blocks' normalised outputs.
@pytest.mark.parametrize("features", ["top", "block1+block2"])
def test_cached_features_train_the_same_head(tmp_path, features):
    train_lib.train_and_evaluate(_cfg(), str(tmp_path / "pre"), verbose=False)
    ref = train_lib.train_and_evaluate(_cfg(f"ckpt:{tmp_path / 'pre'}", "none", features=features),
                                       str(tmp_path / "plain"), verbose=False)
    got = train_lib.train_and_evaluate(_cfg(f"ckpt:{tmp_path / 'pre'}", "none", cache=True, features=features),
                                       str(tmp_path / "cached"), verbose=False)
    a, b = _head(tmp_path / "plain", features), _head(tmp_path / "cached", features)
    pre = _head(tmp_path / "pre")
    assert a.keys() == b.keys() and a
    if features == "top":
        assert not np.allclose(a["head/kernel"], pre["head/kernel"])  # the head did train
    else:
        assert a["head/kernel"].shape == (32 + 64, 5) and not any(k.startswith("block3") for k in a)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-5, err_msg=k)
    # Lower blocks of a base pretrained for 3 epochs separate the digits less well: chance is 0.2.
    assert got["final"]["val/accuracy"] == ref["final"]["val/accuracy"] > (0.8 if features == "top" else 0.5)
