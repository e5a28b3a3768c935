"""The tf.data input pipeline: a `Source` (research/sources.py) -> training and validation batches.

decode and resize (parallel) -> cache -> shuffle (seeded per epoch) -> batch ->
augment -> preprocess -> prefetch.

Shuffling and augmentation are seeded by `(seed, epoch)`, so epoch e sees the same
order and the same augmented images whether or not the run was interrupted before
it: resume needs no iterator state in the checkpoint.
"""

from __future__ import annotations

import os
import time

import numpy as np
import tensorflow as tf

from research import augment as augment_lib
from research import mix as mix_lib
from research.config import AugmentConfig
from research.sources import Source, progress_bar

AUTOTUNE = tf.data.AUTOTUNE


def pipeline_threads(requested: int, *, cached: bool) -> int | None:
    """tf.data threads: `requested` if set; else half the cores when training on CPU
    from a filled cache (`Pipeline.fill_cache`), TF's default pool otherwise.

    On CPU the training step's own thread pool already spans every core, and an
    input pipeline free to use all of them too takes whole cores away from the
    step while it augments: on 2 cores, capping tf.data at one thread raised the
    augmented pipeline from 0.78 to 0.85 of the step's ceiling (docs/BENCHMARKS.md).
    A pipeline that decodes every epoch (no cache) is decode-bound and keeps every
    core, as does any pipeline feeding a GPU or TPU.
    """
    if requested:
        return requested
    if not cached or tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"):
        return None
    return max(1, (os.cpu_count() or 2) // 2)


def per_class(elements: tf.data.Dataset, class_counts: list[int], *, cache: bool) -> list[tuple[tf.data.Dataset, int]]:
    """`(the class's elements, their number)` for every class with training images.

    Each class's elements are filtered out of `elements` once and, with `cache`,
    kept in their own cache, so that drawing from a class does not scan the others.
    """
    out = []
    for c, n in enumerate(class_counts):
        if n > 0:
            ds = elements.filter(lambda x, y, c=c: tf.equal(tf.cast(y, tf.int64), c))
            out.append((ds.cache() if cache else ds, n))
    return out


def balanced(classes: list[tuple[tf.data.Dataset, int]], seed) -> tf.data.Dataset:
    """An endless stream of `(x, label)` elements whose label is uniform over `classes`.

    Each draw picks a class with probability 1/k, then that class's next image in a
    shuffled cycle of its images (reshuffled at every pass): an image comes back only
    after every image of its class has. A function of `seed` only.
    """
    streams = [ds.shuffle(n, seed=seed + i).repeat() for i, (ds, n) in enumerate(classes)]
    return tf.data.Dataset.sample_from_datasets(streams, [1.0 / len(streams)] * len(streams), seed=seed)


def epoch_stream(elements: tf.data.Dataset, epoch_seeds: list[int], *, shuffle_buffer: int, batch_size: int,
                 batches_per_epoch: int, classes: list[tuple[tf.data.Dataset, int]] | None = None
                 ) -> tf.data.Dataset:
    """Consecutive epochs of shuffled full batches of `elements`, as (epoch seed, batch index, batch).

    Epoch i is shuffled with `epoch_seeds[i]` alone, so an epoch's batches do not
    depend on where the stream started. With `classes` (`--sampler=balanced`, from
    `per_class`) an epoch is `batches_per_epoch` batches of `balanced` draws.
    """
    def one_epoch(seed):
        # A tensor op seed needs a graph-level seed that is not 0 (TF compares the
        # pair with (0, 0) in Python); any constant keeps the order a function of seed.
        tf.random.set_seed(1)
        if classes:
            batches = balanced(classes, seed)
        else:
            batches = elements.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
        batches = batches.batch(batch_size, drop_remainder=True).take(batches_per_epoch)
        return tf.data.Dataset.zip(tf.data.Dataset.from_tensors(seed).repeat(),
                                   tf.data.Dataset.range(batches_per_epoch), batches)

    return tf.data.Dataset.from_tensor_slices(tf.constant(epoch_seeds, tf.int64)).flat_map(one_epoch)


class Pipeline:
    """Builds the per-epoch training dataset and the validation dataset.

    Args:
      source: decoded data.
      batch_size: global batch size.
      preprocess: the backbone's `preprocess_input` (float [0, 255] RGB in).
      augment: augmentation settings (applied to training batches only).
      seed: base seed; epoch e shuffles and augments with seeds derived from (seed, e).
      cache: keep the decoded images in memory after the first epoch.
      shuffle_buffer: shuffle buffer size (capped at the training set size).
      threads: size of the pipeline's own tf.data thread pool (None: TF's shared
        pool over every core); see `pipeline_threads`.
      deterministic: the run enables op determinism (`--deterministic`).
      sampler: `shuffle` (each training image once per epoch) or `balanced`
        (classes drawn uniformly, `balanced`).
      eval_crop: the central fraction of each side that validation and test
        images keep, resized back (`augment.eval_view`); 1 keeps the whole image.
    """

    def __init__(self, source: Source, *, batch_size: int, preprocess, augment: AugmentConfig,
                 seed: int = 0, cache: bool = True, shuffle_buffer: int = 10000, threads: int | None = None,
                 deterministic: bool = False, sampler: str = "shuffle", eval_crop: float = 1.0):
        self.source = source
        self.sampler = sampler
        self.batch_size = batch_size
        self.preprocess = preprocess
        self.augment_cfg = augment
        self.seed = seed
        self.cache = cache
        self.threads = threads
        self.deterministic = deterministic
        self.shuffle_buffer = max(1, min(shuffle_buffer, source.num_train))
        self._train = source.train.cache() if cache else source.train
        self._val = source.val.cache() if cache else source.val
        self._classes = per_class(self._train, source.train_counts, cache=cache) if sampler == "balanced" else None
        # Traced once per pipeline rather than once per dataset built (every validation
        # pass and every training stream builds one): tracing the augmentation again in
        # Python held back the first batch by ~60 ms (docs/BENCHMARKS.md).
        images = tf.TensorSpec([None, source.image_size, source.image_size, 3], tf.uint8)
        self._augment = augment_lib.build(augment)
        self._augment_and_preprocess = tf.function(
            self._augment_and_preprocess_fn, input_signature=[images, tf.TensorSpec([2], tf.int64)])
        self._preprocess = tf.function(lambda x: preprocess(tf.cast(x, tf.float32)), input_signature=[images])
        self.train_preprocess = self._preprocess  # uint8 batches -> model input
        view = augment_lib.eval_view(source.image_size, eval_crop)
        self.eval_preprocess = self._preprocess if view is None else tf.function(
            lambda x: preprocess(view(tf.cast(x, tf.float32))), input_signature=[images])

    def fill_cache(self) -> float:
        """Decodes every training image into the cache now, before training, on every
        core (the training stream may then run on fewer threads); returns seconds."""
        t0 = time.perf_counter()
        if self.cache:
            n = self.source.num_train
            bar = progress_bar(n, f"decoding {n} training images into the cache")
            done = 0
            for images, _ in self._train.batch(256).prefetch(AUTOTUNE):
                done += int(images.shape[0])
                if bar:
                    bar.update(done)
        return time.perf_counter() - t0

    @property
    def steps_per_epoch(self) -> int:
        return self.source.num_train // self.batch_size

    @property
    def cached_train(self) -> tf.data.Dataset:
        return self._train

    @property
    def cached_val(self) -> tf.data.Dataset:
        return self._val

    def epoch_seed(self, epoch: int) -> int:
        """The shuffle and augmentation seed of `epoch` (a function of (seed, epoch) only)."""
        return int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0] % (2**31 - 1))

    def options(self) -> tf.data.Options:
        opts = tf.data.Options()
        opts.deterministic = True
        # In-memory sources have no files to shard: each worker keeps its share of
        # elements (multi-worker); explicit, so TF does not warn and fall back.
        opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        if self.threads:
            opts.threading.private_threadpool_size = self.threads
        return opts

    def _augment_and_preprocess_fn(self, x, seed):
        return self.preprocess(self._augment(tf.cast(x, tf.float32), seed))

    def train_stream(self, first_epoch: int, num_epochs: int, *, batches_per_epoch: int | None = None,
                     skip: int = 0, augment: bool = True) -> tf.data.Dataset:
        """The training batches of epochs first_epoch, first_epoch + 1, ... as one dataset.

        Epoch e's batches are a function of (seed, e) only, whichever epoch the
        stream starts at. Training pulls every epoch from one iterator so the
        prefetch runs on across epoch boundaries: a dataset and iterator built per
        epoch started each epoch with an empty pipeline (graph rewrites, function
        instantiation, shuffle buffer fill, first augmented batch): 85 ms on
        ants/bees with augmentation, against ~340 ms of compute per epoch
        (docs/BENCHMARKS.md).

        Args:
          first_epoch: global epoch of the first batch.
          num_epochs: epochs in the stream.
          batches_per_epoch: batches taken from each epoch (default: all full
            batches); fewer when gradient accumulation leaves a remainder.
          skip: batches of the first epoch to skip (resuming mid-epoch); skipped
            batches are not augmented.
          augment: False for the un-augmented images.
        """
        n = batches_per_epoch or self.steps_per_epoch
        ds = epoch_stream(self._train, [self.epoch_seed(e) for e in range(first_epoch, first_epoch + num_epochs)],
                          shuffle_buffer=self.shuffle_buffer, batch_size=self.batch_size,
                          batches_per_epoch=n, classes=self._classes).skip(skip)
        if augment and self._augment is not None:
            # A stateless seed per batch, (epoch seed, batch index): the same images under
            # a parallel map, run to run and across a resume.
            def images(seed, index, x):
                return self._augment_and_preprocess(x, tf.stack([seed, index]))
        else:
            def images(seed, index, x):
                return self._preprocess(x)
        if augment and self.augment_cfg.mixes:
            # Linear preprocessing commutes with blending and pasting: mixing after it is
            # mixing the pixels. Targets become soft, [batch, classes].
            def transform(seed, index, batch):
                return mix_lib.mix_batch(self.augment_cfg, images(seed, index, batch[0]), batch[1],
                                         self.source.num_classes, tf.stack([seed, index]))
        else:
            def transform(seed, index, batch):
                return images(seed, index, batch[0]), batch[1]
        # Under op determinism TF runs this map (it calls a traced function) sequentially
        # anyway, and logs an error-looking line about the rewrite: ask for it directly.
        ds = ds.map(transform, num_parallel_calls=None if self.deterministic else AUTOTUNE)
        return ds.prefetch(AUTOTUNE).with_options(self.options())

    def train_dataset(self, epoch: int, *, augment: bool = True) -> tf.data.Dataset:
        """The training batches of epoch `epoch` (fixed shapes: drop_remainder)."""
        return self.train_stream(epoch, 1, augment=augment)

    def raw_train_batch(self, epoch: int, n: int = 16) -> tf.Tensor:
        """Augmented training images in [0, 255] (for TensorBoard image grids)."""
        x = tf.cast(next(iter(self._train.batch(n)))[0], tf.float32)
        if self._augment is None:
            return x
        return self._augment(x, tf.constant([self.epoch_seed(epoch), 0], tf.int64))

    def val_dataset(self) -> tf.data.Dataset:
        return self._eval_batches(self._val)

    def test_dataset(self) -> tf.data.Dataset | None:
        """The test batches (not cached: the run reads them once or twice, at its end)."""
        return None if self.source.test is None else self._eval_batches(self.source.test)

    def _eval_batches(self, elements: tf.data.Dataset) -> tf.data.Dataset:
        ds = elements.batch(self.batch_size)
        ds = ds.map(lambda x, y: (self.eval_preprocess(x), y),
                    num_parallel_calls=None if self.deterministic else AUTOTUNE)
        return ds.prefetch(AUTOTUNE).with_options(self.options())
