"""Every backbone builds, has ordered contiguous blocks, and runs a training step."""

import numpy as np
import pytest
import tensorflow as tf

from research.model import backbones, unfreeze
from research.config import TrainConfig
from research.run.loop import Trainer
from research.model.optim import build_optimizer

SIZES = {"small_cnn": 16, "vgg16": 32, "inception_v3": 75, "mobilenet": 32, "mobilenet_v2": 32,
         "resnet50": 32, "efficientnet_b0": 32, "xception": 71}  # the newer ones: tests/test_modern_backbones.py
NEWER = {"mobilenet_v3_small": ["stem"] + [f"block{i}" for i in range(11)] + ["top"],
         "mobilenet_v3_large": ["stem"] + [f"block{i}" for i in range(15)] + ["top"],
         "resnet50_v2": ["stem"] + [f"conv{s}_block{b}" for s, n in ((2, 3), (3, 4), (4, 6), (5, 3))
                                    for b in range(1, n + 1)],
         "efficientnet_v2_b0": ["stem"] + [f"block{i}" for i in range(1, 7)] + ["top"],
         "efficientnet_v2_s": ["stem"] + [f"block{i}" for i in range(1, 7)] + ["top"],
         "convnext_tiny": ["stem"] + [f"stage{s}_block{b}" for s, n in enumerate((3, 3, 9, 3)) for b in range(n)],
         "convnext_small": ["stem"] + [f"stage{s}_block{b}" for s, n in enumerate((3, 3, 27, 3)) for b in range(n)]}
EXPECTED_BLOCKS = {
    "small_cnn": ["block1", "block2", "block3"],
    "vgg16": [f"block{i}" for i in range(1, 6)],
    "inception_v3": ["stem"] + [f"mixed{i}" for i in range(11)],
    "mobilenet": ["stem"] + [f"conv_dw_{i}" for i in range(1, 14)],
    "mobilenet_v2": ["stem"] + [f"block_{i}" for i in range(17)] + ["top"],
    "resnet50": ["stem"] + [f"conv{s}_block{b}" for s, n in ((2, 3), (3, 4), (4, 6), (5, 3)) for b in range(1, n + 1)],
    "efficientnet_b0": ["stem"] + [f"block{i}" for i in range(1, 8)] + ["top"],
    "xception": [f"block{i}" for i in range(1, 15)],
    **NEWER,
}


def test_registry_is_complete():
    assert set(backbones.BACKBONES) == set(SIZES) | set(NEWER)
    # The names the registry gives before any model is built (specs are checked against
    # them before TensorFlow starts) are those the built model has (the test below).
    for name, entry in backbones.BACKBONES.items():
        assert list(entry.block_names) == EXPECTED_BLOCKS[name], name


@pytest.mark.parametrize("name", list(SIZES))
def test_backbone_builds_and_trains_one_step(name):
    size = SIZES[name]
    base = backbones.build_base(name, image_size=size, alpha=0.25 if "mobilenet" in name else 1.0)
    model = backbones.build_classifier(base, 3)
    assert backbones.blocks(base, name) == EXPECTED_BLOCKS[name] == list(backbones.get(name).block_names)
    # Blocks are contiguous runs of layers in model order.
    seq = list(backbones.get(name).block_of(base).values())
    runs = [seq[0]] + [b for a, b in zip(seq, seq[1:]) if a != b]
    assert runs == EXPECTED_BLOCKS[name]

    sel = unfreeze.select(model, name, "all")
    unfreeze.apply_policy(model, name, sel)
    opt = build_optimizer(TrainConfig(optimizer="sgd"), 0.01)
    opt.build(sel.variables)
    trainer = Trainer(model, opt, strategy=tf.distribute.get_strategy())
    trainer.set_trainable(sel.variables)
    x = np.random.RandomState(0).uniform(0, 255, (4, size, size, 3)).astype("float32")
    x = backbones.get(name).preprocess(x)
    before = [v.numpy().copy() for v in sel.variables]
    sums, bad = trainer.train(iter(tf.data.Dataset.from_tensors((x, np.array([0, 1, 2, 0]))).repeat()), 1)
    assert bad == -1 and sums["count"] == 4 and np.isfinite(sums["loss_sum"])
    assert any(not np.array_equal(b, v.numpy()) for b, v in zip(before, sel.variables))
    logits = model(x, training=False)
    assert logits.dtype == tf.float32 and logits.shape == (4, 3)
