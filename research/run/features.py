"""Feature extraction: run the frozen base once, train the head on cached features.

For a head-only stage without augmentation every epoch recomputes the same
base outputs. `FeatureCache` computes the pooled features of every training
and validation image once (base in inference mode, BatchNorm frozen) and
trains the head -- the very same `head_dropout` and `head` layers, so the
variables, the optimizer slots and the checkpoints are those of the full
model -- on them. The order of examples per epoch is the image pipeline's
(same shuffle buffer and seed), so the result equals training the full model
with a frozen base, up to float rounding.
"""

from __future__ import annotations

import time

import keras
import numpy as np
import tensorflow as tf

from research.data.pipeline import AUTOTUNE, Pipeline, epoch_stream


def head_model(model: keras.Model) -> keras.Model:
    """pooled features -> the classifier's own dropout and Dense layers."""
    dropout = model.get_layer("head_dropout")
    inputs = keras.Input(dropout.input.shape[1:], name="features")
    return keras.Model(inputs, model.get_layer("head")(dropout(inputs)), name="head_on_features")


def extract(model: keras.Model, ds: tf.data.Dataset, preprocess) -> tuple[np.ndarray, np.ndarray]:
    """Pooled base features of every (uint8 image, label) in `ds`, in order; `preprocess`
    maps uint8 batches to the model's input (`Pipeline.train_preprocess`, `eval_preprocess`).
    The features are what the head's dropout reads: pooled (and, for several blocks,
    normalised and concatenated, `backbones.build_classifier`)."""
    pooled = keras.Model(model.inputs, model.get_layer("head_dropout").input, name="features")

    @tf.function
    def features(x):
        return pooled(preprocess(x), training=False)

    feats, labels = [], []
    for x, y in ds.batch(128):
        feats.append(features(x).numpy())
        labels.append(y.numpy())
    return np.concatenate(feats).astype(np.float32), np.concatenate(labels).astype(np.int32)


class FeatureCache:
    """Cached features of a pipeline's training and validation images.

    Args:
      model: the classifier (its base must be frozen for the cache to be valid).
      pipeline: the image pipeline; its shuffle seeds and batch size are reused.
    """

    def __init__(self, model: keras.Model, pipeline: Pipeline):
        t0 = time.perf_counter()
        self.pipeline = pipeline
        self.head = head_model(model)
        self.train_x, self.train_y = extract(model, pipeline.cached_train, pipeline.train_preprocess)
        self.val_x, self.val_y = extract(model, pipeline.cached_val, pipeline.eval_preprocess)
        self.seconds = time.perf_counter() - t0

    def train_stream(self, first_epoch: int, num_epochs: int, *, batches_per_epoch: int | None = None,
                     skip: int = 0) -> tf.data.Dataset:
        """Feature batches in the order of `Pipeline.train_stream`'s image batches."""
        p = self.pipeline
        classes = None
        if p.sampler == "balanced":
            classes = [(tf.data.Dataset.from_tensor_slices((self.train_x[self.train_y == c],
                                                            self.train_y[self.train_y == c])), int(n))
                       for c, n in enumerate(np.bincount(self.train_y)) if n > 0]
        ds = epoch_stream(tf.data.Dataset.from_tensor_slices((self.train_x, self.train_y)),
                          [p.epoch_seed(e) for e in range(first_epoch, first_epoch + num_epochs)],
                          shuffle_buffer=p.shuffle_buffer, batch_size=p.batch_size,
                          batches_per_epoch=batches_per_epoch or p.steps_per_epoch, classes=classes)
        ds = ds.skip(skip).map(lambda seed, index, batch: batch)
        return ds.prefetch(AUTOTUNE).with_options(p.options())

    def train_dataset(self, epoch: int) -> tf.data.Dataset:
        return self.train_stream(epoch, 1)

    def distribute(self, strategy: tf.distribute.Strategy, make_dataset) -> tf.distribute.DistributedDataset:
        return strategy.experimental_distribute_dataset(make_dataset())

    def val_dataset(self) -> tf.data.Dataset:
        p = self.pipeline
        ds = tf.data.Dataset.from_tensor_slices((self.val_x, self.val_y)).batch(p.batch_size)
        return ds.prefetch(AUTOTUNE).with_options(p.options())
