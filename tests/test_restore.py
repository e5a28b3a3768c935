"""One restore vocabulary: `checkpoints.restore(workdir, latest|best|ema|PATH, ...)`.

Loading a run reads the run's own files, never its dataset; skipping the head
reads the backbone only.
"""

import shutil

import numpy as np
import pytest
import tensorflow as tf

from research.config import DataConfig, ExperimentConfig, StageConfig, TrainConfig, UserError
from research.model import backbones
from research.run import checkpoints
from research.run import train as train_lib


def _train(tmp_path, folder):
    cfg = ExperimentConfig(data=DataConfig(dataset=f"folder:{folder}", image_size=16, batch_size=8),
                           train=TrainConfig(steps_per_loop=4, export=False),
                           stages=(StageConfig(name="s", unfreeze="all", epochs=2, lr=3e-3),))
    wd = tmp_path / "run"
    train_lib.train_and_evaluate(cfg, str(wd), verbose=False)
    return wd


def test_loading_a_run_never_reads_its_dataset(tmp_path, tiny_folder):
    wd = _train(tmp_path, tiny_folder)
    expected = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(wd / "ckpt")))
    # Neither the images nor results.json (which names the classes) are there any more:
    # the class names come from the checkpoint's run state.
    shutil.rmtree(tiny_folder)
    (wd / "results.json").unlink()
    config, model, names, path = checkpoints.load_run(str(wd), checkpoint="latest")
    assert names == ["class 0", "class 1", "class 2"]
    kernel = model.get_layer("head").kernel
    saved = [k for k, shape in expected.get_variable_to_shape_map().items()
             if list(shape) == list(kernel.shape)]
    assert saved and any(np.array_equal(expected.get_tensor(k), kernel.numpy()) for k in saved)


def test_skipping_the_head_reads_the_backbone_only(tmp_path, tiny_folder):
    wd = _train(tmp_path, tiny_folder)
    config, trained, _, _ = checkpoints.load_run(str(wd), checkpoint="best")
    base = backbones.build_base(config.model.backbone, image_size=16)
    model = backbones.build_classifier(base, 7)  # another task's head: 7 classes
    fresh_head = model.get_layer("head").kernel.numpy().copy()
    checkpoints.restore(str(wd), "best", base=base, skip=("head",))
    for a, b in zip(base.weights, backbones.base_of(trained).weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(model.get_layer("head").kernel.numpy(), fresh_head)
    with pytest.raises(UserError, match="does not fit the run's model"):
        checkpoints.restore(str(wd), "best", model=model)  # 7 classes do not fit a 3-class head
    with pytest.raises(UserError, match="no checkpoint in .*ema"):
        checkpoints.restore(str(wd), "ema", model=trained)
