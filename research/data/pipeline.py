"""The tf.data input pipeline: a `Source` (research/data/sources.py) -> training and validation batches.

decode and resize (parallel) -> cache -> shuffle (seeded per epoch) -> batch ->
augment -> preprocess -> prefetch.

The cache (`--cache`) keeps the decoded, resized images `memory` (in RAM), on
`disk` (written once by `Pipeline.prepare` into a directory named after the split's
fingerprint, and read back by every later epoch, resume and run on the same data),
or `none` (decode every epoch). Each yields the same images in the same order, so
the batches of an epoch do not depend on the mode; `auto` picks memory when the
decoded images take under a quarter of the available RAM, else disk
(`choose_cache`).

Shuffling and augmentation are seeded by `(seed, epoch)`, so epoch e sees the same
order and the same augmented images whether or not the run was interrupted before
it: resume needs no iterator state in the checkpoint.
"""

from __future__ import annotations

import os
import shutil
import socket
import time

import numpy as np
import tensorflow as tf
from absl import logging

from research.data import augment as augment_lib
from research.data import mix as mix_lib
from research.config import AugmentConfig
from research.errors import StorageError, UserError
from research.data.sources import Source, progress_bar

AUTOTUNE = tf.data.AUTOTUNE

CACHE_MODES = ("auto", "memory", "disk", "none")
MEMORY_SHARE = 0.25  # `auto` caches in RAM when the decoded images take less than this share of it


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def choose_cache(mode: str, num_images: int, size: int, *, available_bytes: int | None = None) -> tuple[str, str]:
    """`--cache`'s mode for `num_images` decoded images of side `size`, and why.

    `auto` is `memory` when the estimate (N x size^2 x 3 bytes) is under
    `MEMORY_SHARE` of `available_bytes` (default: the RAM available now), else `disk`.
    """
    if mode != "auto":
        return mode, f"--cache={mode}"
    if available_bytes is None:
        import psutil
        available_bytes = psutil.virtual_memory().available
    need = num_images * size * size * 3
    pick = "memory" if need < MEMORY_SHARE * available_bytes else "disk"
    return pick, (f"auto: {num_images} decoded images at {size}x{size} px take ~{_gib(need)}, "
                  f"{need / max(available_bytes, 1):.0%} of the {_gib(available_bytes)} of RAM available; "
                  f"memory below {MEMORY_SHARE:.0%}")


def pipeline_threads(requested: int, *, cached: bool) -> int | None:
    """tf.data threads: `requested` if set; else half the cores when training on CPU
    from a filled cache (`Pipeline.prepare`), TF's default pool otherwise.

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
      cache: `memory`, `disk` or `none` (see the module's docstring; `auto` is
        resolved by `choose_cache`).
      cache_dir: where the `disk` cache is written (one directory per split and
        fingerprint).
      shuffle_buffer: shuffle buffer size (capped at the training set size).
      threads: size of the pipeline's own tf.data thread pool (None: TF's shared
        pool over every core); see `pipeline_threads`.
      deterministic: the run enables op determinism (`--deterministic`).
      sampler: `shuffle` (each training image once per epoch) or `balanced`
        (classes drawn uniformly, `balanced`).
      eval_crop: the central fraction of each side that validation and test
        images keep, resized back (`augment.eval_view`); 1 keeps the whole image.
      replicas: the strategy's replicas in sync (used only by a source sharded by worker).
    """

    def __init__(self, source: Source, *, batch_size: int, preprocess, augment: AugmentConfig,
                 seed: int = 0, cache: str = "memory", cache_dir: str | None = None, shuffle_buffer: int = 10000,
                 threads: int | None = None, deterministic: bool = False, sampler: str = "shuffle",
                 eval_crop: float = 1.0, replicas: int = 1):
        self.source = source
        self.sampler = sampler
        self.batch_size = batch_size
        self.preprocess = preprocess
        self.augment_cfg = augment
        self.seed = seed
        self.cache = cache
        if self.cache not in ("memory", "disk", "none"):
            raise ValueError(f"cache={cache!r}: resolve `auto` with choose_cache first")
        if self.cache == "disk" and not cache_dir:
            raise ValueError("cache='disk' needs a cache_dir")
        self.cache_dir = cache_dir
        self.threads = threads
        self.deterministic = deterministic
        # A source sharded by worker (`Source.shard`) feeds each replica its own batches
        # (`distribute`): a replica's share of the global batch, `local` per step on each worker.
        index, workers = source.shard
        self.sharded = workers > 1
        if self.sharded and batch_size % replicas:
            raise UserError(f"--batch_size={batch_size} must be a multiple of the {replicas} replicas when each "
                            "worker reads its own shards of a tfrecord: source")
        self.stream_batch = batch_size // replicas if self.sharded else batch_size
        self.local = replicas // workers if self.sharded else 1
        self.shuffle_buffer = max(1, min(shuffle_buffer, source.num_train))
        self._train = self._cached("train", source.train)
        self._val = self._cached("val", source.val)
        self._classes = (per_class(self._train, source.class_counts(), cache=self.cache == "memory")
                         if sampler == "balanced" else None)
        if self._classes and self.cache != "memory":
            logging.warning("--sampler=balanced with --cache=%s reads the training images once per class and "
                            "epoch (%d classes); --cache=memory reads them once", self.cache, len(self._classes))
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

    def _disk_path(self, split: str) -> str:
        return os.path.join(self.cache_dir, f"{split}-{self.source.image_size}px-{self.source.fingerprints[split]}")

    def _cached(self, split: str, elements: tf.data.Dataset) -> tf.data.Dataset:
        if self.cache == "memory":
            return elements.cache()
        if self.cache == "disk":
            # Read back once `prepare` has written it; tf.data would otherwise write a cache
            # of its own while training, and a kill mid-epoch would leave it half-written.
            return elements.cache(os.path.join(self._disk_path(split), "images"))
        return elements

    def prepare(self) -> float:
        """Writes what later starts reuse, before training: the folder check's results
        (`Source.remember`) and, with `disk`, the cache of the training and validation
        images; with `memory` and a capped thread pool, decodes the training images into
        RAM on every core (the stream then runs on fewer threads). Returns seconds."""
        t0 = time.perf_counter()
        try:
            if self.source.remember is not None:
                self.source.remember()
            if self.cache == "disk":
                self._write_disk_cache("train", self.source.train, self.source.num_train)
                self._write_disk_cache("val", self.source.val, self.source.num_val)
        except (OSError, tf.errors.OpError) as e:  # a full disk, a directory made read-only since
            raise StorageError(f"could not write the image check's results or the disk cache in "
                               f"{self.cache_dir}: {str(e).splitlines()[0]}; free some space, or pass another "
                               "--cache_dir (or --cache=none)") from None
        if self.cache == "memory" and self.threads:
            _decode_all(self._train, self.source.num_train, "decoding {n} training images into the cache")
        return time.perf_counter() - t0

    def _write_disk_cache(self, split: str, elements: tf.data.Dataset, n: int) -> None:
        """Writes `split`'s decoded images to its cache directory, whole or not at all:
        into a temporary directory renamed when complete, so that a run killed while
        writing leaves no cache that a later run would take for a whole one."""
        final = self._disk_path(split)
        if os.path.exists(os.path.join(final, "images.index")):
            return
        parent, base = os.path.split(final)
        os.makedirs(parent, exist_ok=True)
        # A cache directory may be shared between hosts: only this host's dead writers' leftovers go.
        mine = f"{base}.tmp-{socket.gethostname()}-"
        for name in os.listdir(parent):  # left by a killed run
            if name.startswith(mine) and not _alive(name[len(mine):]):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        tmp = os.path.join(parent, f"{mine}{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        _decode_all(elements.cache(os.path.join(tmp, "images")), n,
                         f"decoding {{n}} {split} images into the disk cache {parent}")
        try:
            os.rename(tmp, final)
        except OSError:  # another process (a second worker) finished the same cache first
            shutil.rmtree(tmp, ignore_errors=True)

    @property
    def steps_per_epoch(self) -> int:
        if self.sharded:  # every worker takes as many steps as the worker with the fewest images
            return self.source.min_worker_train // (self.stream_batch * self.local)
        return self.source.num_train // self.batch_size

    def distribute(self, strategy: tf.distribute.Strategy, make_dataset) -> tf.distribute.DistributedDataset:
        """`make_dataset()` distributed over `strategy`'s replicas: split into per-replica
        parts of each global batch, or, from a source sharded by worker, one stream per
        worker whose consecutive batches go to the worker's replicas."""
        if self.sharded:
            return strategy.distribute_datasets_from_function(lambda context: make_dataset())
        return strategy.experimental_distribute_dataset(make_dataset())

    @property
    def cached_train(self) -> tf.data.Dataset:
        return self._train

    @property
    def cached_val(self) -> tf.data.Dataset:
        return self._val

    def epoch_seed(self, epoch: int) -> int:
        """The shuffle and augmentation seed of `epoch` (a function of (seed, epoch) only;
        and of the worker, for a source sharded by worker)."""
        key = [self.seed, epoch] + ([self.source.shard[0]] if self.sharded else [])
        return int(np.random.SeedSequence(key).generate_state(1)[0] % (2**31 - 1))

    def options(self, *, training: bool = False) -> tf.data.Options:
        opts = tf.data.Options()
        opts.deterministic = True
        # Each worker keeps its share of the elements (multi-worker); explicit, so TF does
        # not warn and fall back. The training stream of a source sharded by worker is its
        # worker's share already.
        opts.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.OFF if training and self.sharded
            else tf.data.experimental.AutoShardPolicy.DATA)
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
        n = (batches_per_epoch or self.steps_per_epoch) * self.local
        ds = epoch_stream(self._train, [self.epoch_seed(e) for e in range(first_epoch, first_epoch + num_epochs)],
                          shuffle_buffer=self.shuffle_buffer, batch_size=self.stream_batch,
                          batches_per_epoch=n, classes=self._classes).skip(skip * self.local)
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
        return ds.prefetch(AUTOTUNE).with_options(self.options(training=True))

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


def _decode_all(elements: tf.data.Dataset, n: int, what: str) -> None:
    """Runs `elements` through once (filling the cache it ends in), with a progress bar."""
    bar = progress_bar(n, what.format(n=n))
    done = 0
    for images, _ in elements.batch(256).prefetch(AUTOTUNE):
        done += int(images.shape[0])
        if bar:
            bar.update(done)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # alive, and another user's
        pass
    return True
