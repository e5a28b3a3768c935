"""Frozen dataclasses describing one experiment, and their validation.

A config is built once (by `launch/train.py` from flags, or by a test directly),
validated, saved as `config.json` in the workdir, and passed read-only to the
library. Nothing in `research/` reads absl flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from research.errors import UserError

__all__ = ["UserError"]  # re-exported: most modules import it from here


OPTIMIZERS = ("adam", "sgd", "adamw")
JIT = ("auto", "true", "false")
BN_POLICIES = ("frozen", "train", "adapt")
TEST_SOURCES = ("auto", "val", "none")
SAMPLERS = ("shuffle", "balanced")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker", "tpu")
ES_MODES = ("auto", "min", "max")


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are batched.

    Attributes:
      dataset: `digits`, `folder:PATH` or `tfds:NAME`.
      data_dir: TFDS data directory (None: TFDS's default).
      train_split / val_split: TFDS split names; an empty `val_split` means
        `validation` or `val` if the dataset has one, else "carve `val_fraction`
        out of the training split".
      val_fraction: held-out fraction when the source has no validation split.
      test: where the test split, which no training decision ever sees, comes from:
        `auto`: the source's own (`PATH/test`, the TFDS `test_split`) if it has
        one, else a `test_fraction` slice carved from the training images;
        `val`: the source's validation split is the test split, and validation
        is carved from the training images (datasets that ship only train/val);
        `none`: no test split.
      test_split: TFDS test split name (empty: `test` if the dataset has one).
      test_fraction: the fraction carved for test when the source has no test split.
      classes: subset of classes by name or index (`0-4`, `ants,bees`), relabelled 0..k-1.
      image_size: side of the square model input; 0 means the backbone's default.
      batch_size: the global batch size.
      shuffle_buffer: tf.data shuffle buffer (capped at the dataset size).
      cache: where the decoded, resized images are kept between epochs: `memory`,
        `disk` (written once to `cache_dir`, reused by resumes and later runs on the
        same data and size), `none` (decoded every epoch), or `auto` (memory when
        they take under a quarter of the available RAM, else disk).
      cache_dir: the disk cache and the folder check's results (`images.json`);
        empty: `WORKDIR/cache`. Share one between runs to decode a dataset once.
      sampler: `shuffle`: each training image once per epoch; `balanced`: every
        draw picks a class uniformly, then the next image of its shuffled cycle,
        as many draws per epoch as there are training images (for imbalanced
        folders; an alternative to `class_weight`, not a complement).
      eval_crop: the central fraction of each side that evaluation keeps (validation,
        test, `launch.evaluate`, and the exported model, so `launch.predict` too),
        resized back to the input side; 0.875 is the ImageNet convention that
        pairs with random-resized-crop training; 1 keeps the whole image.
      skip_bad_images: drop unreadable images (and report how many) instead of failing.
      threads: tf.data threads of the input pipeline; 0 picks them (see
        `research/data/pipeline.py:pipeline_threads`).
    """

    dataset: str = "digits"
    data_dir: str | None = None
    train_split: str = "train"
    val_split: str = ""
    val_fraction: float = 0.2
    test: str = "auto"
    test_split: str = ""
    test_fraction: float = 0.1
    classes: str = ""
    image_size: int = 0
    batch_size: int = 32
    shuffle_buffer: int = 10000
    cache: str = "auto"
    cache_dir: str = ""
    sampler: str = "shuffle"
    eval_crop: float = 1.0
    skip_bad_images: bool = False
    threads: int = 0


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation settings, the ImageDataGenerator knobs (see research/data/augment.py).

    Attributes:
      horizontal_flip / vertical_flip: random left-right / up-down flips.
      crop_scale: Inception-style random-resized-crop, `MIN,MAX` fraction of the
        image area kept (e.g. `0.08,1`; empty: off), at an aspect ratio drawn
        log-uniformly in `crop_ratio` (`MIN,MAX`), resized back to the full side.
      rotation: maximum rotation in degrees (ImageDataGenerator's rotation_range).
      width_shift / height_shift: maximum shift as a fraction of the side.
      zoom: maximum zoom in or out as a fraction (0.1 means 90%..110%).
      contrast: maximum contrast change as a fraction.
      brightness: maximum brightness shift, a fraction of the value range added
        to every pixel (Keras's `RandomBrightness`).
      saturation: maximum saturation change: saturation times U(1 - s, 1 + s).
      hue: maximum hue rotation, a fraction of the colour circle (<= 0.5).
      erase_prob: probability of random erasing (Zhong et al., 2020; torchvision's
        box rule: 2-33 % of the area, aspect ratio 0.3-3.3), the box filled with noise.
      randaugment: operations per image of RandAugment (Cubuk et al., 2020; Keras's
        `RandAugment` operations, drawn per image); 0: off. 2 is the paper's.
      randaugment_magnitude: their strength, Keras's `factor` in [0, 1].
      mixup / cutmix: α of the Beta(α, α) mixing weight of mixup / CutMix (0:
        off); training targets become soft (research/data/mix.py).
      mix_prob: probability that a training batch is mixed.
    """

    horizontal_flip: bool = False
    vertical_flip: bool = False
    crop_scale: str = ""
    crop_ratio: str = "0.75,1.3333"
    rotation: float = 0.0
    width_shift: float = 0.0
    height_shift: float = 0.0
    zoom: float = 0.0
    contrast: float = 0.0
    brightness: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    erase_prob: float = 0.0
    randaugment: int = 0
    randaugment_magnitude: float = 0.5
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0

    @property
    def enabled(self) -> bool:
        """Any per-image augmentation (mixing is a batch-level step of its own)."""
        return bool(self.horizontal_flip or self.vertical_flip or self.crop_scale or self.rotation
                    or self.width_shift or self.height_shift or self.zoom or self.contrast
                    or self.brightness or self.saturation or self.hue or self.erase_prob or self.randaugment)

    def crop_range(self, name: str) -> tuple[float, float]:
        """`crop_scale` or `crop_ratio` as (min, max)."""
        lo, hi = (float(v) for v in getattr(self, name).split(","))
        return lo, hi

    @property
    def mixes(self) -> bool:
        return bool(self.mixup or self.cutmix) and self.mix_prob > 0


@dataclass(frozen=True)
class ModelConfig:
    """Backbone and head.

    Attributes:
      backbone: a name from `research.model.backbones.BACKBONES`.
      weights: `imagenet`, `none`, a path to a `.h5` weights file, or
        `ckpt:WORKDIR` (another run's backbone, head skipped).
      alpha: width multiplier for `mobilenet` / `mobilenet_v2`.
      dropout: dropout rate before the classification Dense.
      bn: the BatchNorm policy (`research/model/unfreeze.py`, `research/run/actions/adabn.py`):
        `frozen` (default): every BN layer in inference mode, its moving
        statistics and gamma/beta fixed; the standard fine-tuning advice, and
        what keeps small-data runs stable.
        `train`: BN layers of unfrozen blocks train (batch statistics,
        moving-average updates, gamma/beta).
        `adapt`: frozen as above, but at the start of every stage the moving
        statistics of every BN layer are re-estimated on the training images
        (AdaBN, Li et al. 2016), for target data far from the pretraining data.
      init_blocks: with `ckpt:` weights, copy only the first N blocks of the
        other run's backbone and keep the rest freshly initialised (0: all);
        the transfer study's "copy the first n layers".
    """

    backbone: str = "small_cnn"
    weights: str = "none"
    alpha: float = 1.0
    dropout: float = 0.2
    bn: str = "frozen"
    init_blocks: int = 0

    @property
    def train_bn(self) -> bool:
        return self.bn == "train"


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """Keras-compatible early stopping, applied to each stage separately.

    With `enabled=False` (the default) nothing stops; the run's best epoch by
    `monitor` is kept in `best/` whether or not stopping is enabled.
    """

    enabled: bool = False
    monitor: str = "val/loss"
    mode: str = "auto"
    min_delta: float = 0.0
    patience: int = 5
    baseline: float | None = None
    start_from_epoch: int = 0
    restore_best_weights: bool = False


@dataclass(frozen=True)
class StageConfig:
    """One training stage: what is trainable, for how long, how fast.

    Attributes:
      name: label used in logs, TensorBoard and results.
      unfreeze: an unfreeze spec (`none`, `all`, `top:K`, `blocks:a,b`,
        `from:NAME`, `regex:PATTERN`), see `research/model/unfreeze.py`.
      epochs: maximum epochs of this stage.
      lr: peak learning rate.
      schedule: `constant` or `cosine` (decays to 0 over the stage).
      warmup_epochs: linear warmup from 0 to `lr`.
      gradual_every: if > 0, gradual unfreezing: the stage starts with the top
        block of its spec and unfreezes one more block every this many epochs.
      lr_decay_per_block: layer-wise LR decay; block i below the top block
        trains at lr * decay**i (1.0 disables it).
      patience: per-stage override of the early-stopping patience (None: global).
    """

    name: str = "train"
    unfreeze: str = "all"
    epochs: int = 20
    lr: float = 2e-3
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    gradual_every: int = 0
    lr_decay_per_block: float = 1.0
    patience: int | None = None


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, loop and run-control settings shared by all stages.

    Attributes:
      jit_compile: `auto` (Keras's own rule: XLA on GPU/TPU, off on CPU, where it
        made MobileNetV2 ~8x slower), `true` or `false`.
      label_smoothing: the training targets put 1 - s on the class and s / k on
        every class (Keras's `CategoricalCrossentropy(label_smoothing=s)`);
        `train/loss` is that objective, `val/` and `test/` losses stay plain
        cross-entropy so that runs with and without it compare.
      class_weight: `none`, `balanced` (class c weighs n / (k n_c) on the
        training split, scikit-learn's rule) or a JSON file `{class name:
        weight}`; each training example's loss is multiplied by its class's
        weight, as `model.fit(class_weight=...)` does. Evaluation is unweighted.
      log_block_grads: per block, each epoch, TensorBoard's `block_rgn/BLOCK` (the
        relative gradient norm: the RMS over the epoch's steps of the block's
        gradient norm, over its weight norm) and `block_change/BLOCK`
        (‖θ - θ_start‖ / ‖θ_start‖ since the stage began), research/model/probe.py.
      ema_decay: keep an exponential moving average of the trained weights
        (Keras's optimizer EMA, `ema_momentum`); 0 disables it. The averaged
        weights are scored each epoch (`val_ema/...`), can be monitored for
        `best/`, and are scored on test at the end (`test_ema/...`).
    """

    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    clipnorm: float = 0.0
    label_smoothing: float = 0.0
    class_weight: str = "none"
    ema_decay: float = 0.0
    steps_per_loop: int = 20
    seed: int = 0
    deterministic: bool = False
    jit_compile: str = "auto"
    precision: str = "float32"
    strategy: str = "auto"
    grad_accum_steps: int = 1
    collective_timeout: float = 0.0
    checkpoint_keep: int = 3
    checkpoint_every_steps: int = 0
    histogram_every_epochs: int = 0
    log_block_grads: bool = False
    cache_features: bool = False
    export: bool = True
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stages: tuple[StageConfig, ...] = (StageConfig(),)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExperimentConfig":
        es = EarlyStoppingConfig(**d["train"].get("early_stopping", {}))
        train = dict(d["train"], early_stopping=es)
        if isinstance(train.get("jit_compile"), bool):  # config.json written before `auto` existed
            train["jit_compile"] = str(train["jit_compile"]).lower()
        data = dict(d["data"])
        if isinstance(data.get("cache"), bool):  # config.json written before the cache modes existed
            data["cache"] = "memory" if data["cache"] else "none"
        model = dict(d["model"])
        if "train_bn" in model:  # config.json written before `bn` existed
            model["bn"] = "train" if model.pop("train_bn") else "frozen"
        return cls(
            data=DataConfig(**data),
            augment=AugmentConfig(**d["augment"]),
            model=ModelConfig(**model),
            train=TrainConfig(**train),
            stages=tuple(StageConfig(**s) for s in d["stages"]),
        )


def writable_dir(path: str) -> bool:
    """Whether `path` is a writable directory, or could be created as one (its nearest
    existing ancestor is a writable directory)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


def _choice(name: str, value: str, allowed) -> None:
    _check(value in allowed, f"--{name}={value!r} is not valid; allowed values: {', '.join(allowed)}")


def resolve_paths(config: ExperimentConfig) -> ExperimentConfig:
    """Makes every path in the config absolute (`folder:`, `ckpt:`, weights files, data_dir).

    `config.json` then names the same data from any working directory, and the
    same data given by a relative or an absolute path is the same config.
    """
    d, m = config.data, config.model
    ds = d.dataset
    for kind in ("folder:", "tfrecord:"):
        if ds.startswith(kind) and ds[len(kind):]:
            ds = kind + os.path.abspath(os.path.expanduser(ds[len(kind):]))
    data_dir = os.path.abspath(os.path.expanduser(d.data_dir)) if d.data_dir else d.data_dir
    cache_dir = os.path.abspath(os.path.expanduser(d.cache_dir)) if d.cache_dir else d.cache_dir
    w = m.weights
    if w.startswith("ckpt:") and w[len("ckpt:"):]:
        w = "ckpt:" + os.path.abspath(os.path.expanduser(w[len("ckpt:"):]))
    elif w not in ("imagenet", "none"):
        w = os.path.abspath(os.path.expanduser(w))
    cw = config.train.class_weight
    if cw not in ("none", "balanced"):
        cw = os.path.abspath(os.path.expanduser(cw))
    return dataclasses.replace(config, data=dataclasses.replace(d, dataset=ds, data_dir=data_dir, cache_dir=cache_dir),
                               model=dataclasses.replace(m, weights=w),
                               train=dataclasses.replace(config.train, class_weight=cw))


_SPEC_FORMS = ("none", "all", "top:K", "blocks:a,b", "from:NAME", "regex:PATTERN", "auto:K", "auto:rgn:K",
               "auto:probe:K")


def _check_spec_syntax(stage: "StageConfig") -> None:
    kind, sep, arg = stage.unfreeze.partition(":")
    if kind == "auto":
        _check(bool(re.fullmatch(r"((rgn|probe):)?[1-9]\d*", arg)),
               f"stage {stage.name!r}: unfreeze spec {stage.unfreeze!r} is not valid; auto specs are auto:K, "
               "auto:rgn:K (relative gradient norms) or auto:probe:K (linear probes), K >= 1")
        return
    ok = (stage.unfreeze in ("none", "all") or (sep and arg and kind in ("top", "blocks", "from", "regex")))
    _check(bool(ok), f"stage {stage.name!r}: unfreeze spec {stage.unfreeze!r} is not valid; "
           f"allowed forms: {', '.join(_SPEC_FORMS)}")
    if kind == "top":
        _check(arg.isdigit(), f"stage {stage.name!r}: unfreeze spec {stage.unfreeze!r}: K must be a whole number")
    if kind == "regex":
        try:
            re.compile(arg)
        except re.error as e:
            raise UserError(f"unfreeze spec {stage.unfreeze!r}: invalid regular expression ({e})") from None


def validate(config: ExperimentConfig) -> ExperimentConfig:
    """Checks everything that needs neither TensorFlow nor the data's contents.

    Runs in well under a second, before TensorFlow is imported. What needs the
    built model (block names of unfreeze specs) or the data (class names, image
    files) is checked by `research/run/train.py` before anything is written.

    Args:
      config: the experiment to check.

    Returns:
      The config with every path made absolute (`resolve_paths`).

    Raises:
      UserError: naming the bad value and the allowed values.
    """
    from research.model import backbones  # imports no TensorFlow: the registry is lazy

    config = resolve_paths(config)
    d, m, t = config.data, config.model, config.train
    ds = d.dataset
    _check(ds == "digits" or ds.startswith(("folder:", "tfds:", "tfrecord:")),
           f"--dataset={ds!r} is not valid; allowed values: digits, folder:PATH, tfds:NAME, tfrecord:DIR")
    _check(not (ds.startswith("tfrecord:") and not ds[len("tfrecord:"):]),
           "--dataset=tfrecord: needs the directory launch.convert wrote, e.g. tfrecord:/data/flowers-shards")
    _check(not (ds.startswith("folder:") and not ds[len("folder:"):]), "--dataset=folder: needs a path, e.g. folder:/data/flowers")
    _check(not (ds.startswith("tfds:") and not ds[len("tfds:"):]), "--dataset=tfds: needs a dataset name, e.g. tfds:tf_flowers")
    for kind in ("folder:", "tfrecord:"):
        if ds.startswith(kind):
            _check(os.path.isdir(ds[len(kind):]), f"--dataset={ds}: no such directory")
    _choice("cache", d.cache, ("auto", "memory", "disk", "none"))
    _check(not d.cache_dir or writable_dir(d.cache_dir),
           f"--cache_dir={d.cache_dir}: not a directory this process can create and write into")
    _check(0.0 < d.val_fraction < 1.0, f"--val_fraction={d.val_fraction} must be strictly between 0 and 1")
    _choice("test", d.test, TEST_SOURCES)
    _check(0.0 < d.test_fraction < 1.0, f"--test_fraction={d.test_fraction} must be strictly between 0 and 1")
    _check(d.test == "none" or d.val_fraction + d.test_fraction < 0.9,
           f"--val_fraction={d.val_fraction} and --test_fraction={d.test_fraction} leave less than 10% to train")
    _check(d.batch_size >= 1, f"--batch_size={d.batch_size} must be >= 1")
    _check(d.image_size >= 0, f"--image_size={d.image_size} must be >= 0 (0 means the backbone's default)")
    _check(d.shuffle_buffer >= 1, f"--shuffle_buffer={d.shuffle_buffer} must be >= 1")
    _choice("sampler", d.sampler, SAMPLERS)
    _check(0.0 < d.eval_crop <= 1.0, f"--eval_crop={d.eval_crop} must be in (0, 1] (1: the whole image; 0.875 is common)")
    _check(not (d.sampler == "balanced" and config.train.class_weight != "none"),
           f"--sampler=balanced and --class_weight={config.train.class_weight} both correct for class imbalance; "
           "use one of them")
    _check(d.threads >= 0, f"--data_threads={d.threads} must be >= 0 (0: automatic)")

    a = config.augment
    for name in ("rotation", "width_shift", "height_shift", "zoom", "contrast"):
        v = getattr(a, name)
        _check(v >= 0 and math.isfinite(v), f"--{name}={v} must be a finite number >= 0")
    for name, low, high in (("crop_scale", 0.0, 1.0), ("crop_ratio", 0.0, math.inf)):
        if name == "crop_scale" and not a.crop_scale:
            continue
        try:
            lo, hi = a.crop_range(name)
        except ValueError:
            raise UserError(f"--{name}={getattr(a, name)!r} is not MIN,MAX (for example 0.08,1)") from None
        _check(low < lo <= hi <= high, f"--{name}={getattr(a, name)} needs {low} < MIN <= MAX <= {high}")
    for name in ("mixup", "cutmix"):
        _check(getattr(a, name) >= 0 and math.isfinite(getattr(a, name)),
               f"--{name}={getattr(a, name)} is the α of a Beta(α, α) and must be >= 0 (0: off; 0.2-1 is common)")
    _check(0.0 <= a.mix_prob <= 1.0, f"--mix_prob={a.mix_prob} must be in [0, 1]")
    _check(a.rotation <= 180, f"--rotation={a.rotation} is in degrees and must be <= 180")
    _check(0 <= a.randaugment <= 5, f"--randaugment={a.randaugment} is the number of operations per image, 0-5 "
           "(0: off; 2 is common)")
    for name, high in (("brightness", 1.0), ("saturation", 1.0), ("hue", 0.5), ("erase_prob", 1.0),
                       ("randaugment_magnitude", 1.0)):
        v = getattr(a, name)
        _check(0.0 <= v <= high, f"--{name}={v} must be in [0, {high}]")
    for name in ("width_shift", "height_shift", "zoom", "contrast"):
        _check(getattr(a, name) < 1, f"--{name}={getattr(a, name)} is a fraction and must be < 1")

    _choice("backbone", m.backbone, tuple(backbones.BACKBONES))
    entry = backbones.BACKBONES[m.backbone]
    size = backbones.input_size(m.backbone, d.image_size)
    _check(size >= entry.min_size,
           f"--image_size={size} is below the minimum input size {entry.min_size} of backbone {m.backbone!r}")
    w = m.weights
    _check(w in ("imagenet", "none") or w.startswith("ckpt:") or w.endswith((".h5", ".weights.h5", ".keras")),
           f"--weights={w!r} is not valid; allowed values: imagenet, none, a .h5 weights file, ckpt:WORKDIR")
    _check(not (w == "imagenet" and not entry.has_imagenet),
           f"--weights=imagenet is not available for backbone {m.backbone!r}; use none, a .h5 file or ckpt:WORKDIR")
    _check(0.0 <= m.dropout < 1.0, f"--dropout={m.dropout} must be in [0, 1)")
    _check(m.alpha > 0, f"--alpha={m.alpha} must be > 0")
    _check(m.alpha == 1.0 or entry.has_alpha,
           f"--alpha={m.alpha}: backbone {m.backbone!r} has no width multiplier; --alpha applies to "
           + ", ".join(n for n, e in backbones.BACKBONES.items() if e.has_alpha))
    _choice("bn", m.bn, BN_POLICIES)
    _check(m.init_blocks >= 0, f"--init_blocks={m.init_blocks} must be >= 0")
    _check(m.init_blocks == 0 or w.startswith("ckpt:"), "--init_blocks needs --weights=ckpt:WORKDIR")

    _choice("optimizer", t.optimizer, OPTIMIZERS)
    _choice("precision", t.precision, PRECISIONS)
    _choice("strategy", t.strategy, STRATEGIES)
    _choice("jit_compile", t.jit_compile, JIT)
    _check(t.steps_per_loop >= 1, f"--steps_per_loop={t.steps_per_loop} must be >= 1")
    _check(0.0 <= t.label_smoothing < 1.0, f"--label_smoothing={t.label_smoothing} must be in [0, 1)")
    _check(t.class_weight in ("none", "balanced") or os.path.isfile(t.class_weight),
           f"--class_weight={t.class_weight!r} is not valid; allowed values: none, balanced, or a JSON file "
           "mapping class names to weights")
    _check(0.0 <= t.ema_decay < 1.0, f"--ema_decay={t.ema_decay} must be in [0, 1) (0: off); 0.999 is common")
    _check(not (t.ema_decay and any(s.lr_decay_per_block != 1.0 for s in config.stages)),
           "--ema_decay with lr_decay_per_block is not supported: the average would miss the per-block rescaling")
    _check(t.clipnorm >= 0, f"--clipnorm={t.clipnorm} must be >= 0 (0 disables clipping)")
    _check(t.grad_accum_steps >= 1, f"--grad_accum_steps={t.grad_accum_steps} must be >= 1")
    _check(t.checkpoint_keep >= 1, f"--checkpoint_keep={t.checkpoint_keep} must be >= 1")
    _check(t.checkpoint_every_steps >= 0, f"--checkpoint_every_steps={t.checkpoint_every_steps} must be >= 0")
    _check(t.histogram_every_epochs >= 0, f"--histogram_every_epochs={t.histogram_every_epochs} must be >= 0")
    es = t.early_stopping
    _choice("early_stopping_mode", es.mode, ES_MODES)
    _check(es.monitor in MONITORS,
           f"--early_stopping_monitor={es.monitor!r} is not valid; allowed values: {', '.join(MONITORS)}")
    _check(not es.monitor.startswith("val_ema/") or t.ema_decay,
           f"--early_stopping_monitor={es.monitor} needs --ema_decay (the averaged weights it scores)")
    _check(es.patience >= 0, f"--early_stopping_patience={es.patience} must be >= 0")
    _check(es.start_from_epoch >= 0, f"--early_stopping_start_from_epoch={es.start_from_epoch} must be >= 0")

    _check(len(config.stages) >= 1, "at least one stage with epochs > 0 is needed (see --epochs, --stages, "
           "--head_epochs, --finetune_epochs)")
    names = [s.name for s in config.stages]
    _check(len(set(names)) == len(names), f"stage names must be unique, got {names}")
    for s in config.stages:
        _check(re.fullmatch(r"[A-Za-z0-9_.-]+", s.name) is not None,
               f"stage name {s.name!r} may only contain letters, digits, '_', '.', '-'")
        _check(s.epochs >= 1, f"stage {s.name!r}: epochs={s.epochs} must be >= 1")
        _check(s.lr > 0 and math.isfinite(s.lr), f"stage {s.name!r}: lr={s.lr} must be a finite number > 0")
        _choice("schedule", s.schedule, SCHEDULES)
        _check(0 <= s.warmup_epochs <= s.epochs, f"stage {s.name!r}: warmup_epochs={s.warmup_epochs} must be in [0, epochs={s.epochs}]")
        _check(s.gradual_every >= 0, f"stage {s.name!r}: gradual_every={s.gradual_every} must be >= 0")
        _check(0 < s.lr_decay_per_block <= 1, f"stage {s.name!r}: lr_decay_per_block={s.lr_decay_per_block} must be in (0, 1]")
        _check(s.patience is None or s.patience >= 0, f"stage {s.name!r}: patience must be >= 0")
        _check_spec_syntax(s)
    return config


MONITORS = ("val/loss", "val/accuracy", "val/top5_accuracy", "train/loss", "train/accuracy",
            "val_ema/loss", "val_ema/accuracy", "val_ema/top5_accuracy")


# --- The `--stages` mini-language -------------------------------------------------

_STAGE_KEYS = {
    "name": str, "unfreeze": str, "epochs": int, "lr": float, "schedule": str,
    "warmup": float, "warmup_epochs": float, "gradual_every": int,
    "lr_decay_per_block": float, "patience": int,
}


def parse_stages(text: str) -> tuple[StageConfig, ...]:
    """Parses `--stages`.

    Stages are separated by `;`; each is whitespace-separated `key=value` pairs:

        unfreeze=none epochs=10 lr=1e-3; unfreeze=top:2 epochs=5 lr=1e-4 warmup=1

    Keys: name, unfreeze, epochs, lr, schedule, warmup (epochs), gradual_every,
    lr_decay_per_block, patience. Unnamed stages are called `stage0`, `stage1`, ...

    Raises:
      UserError: on an unknown key or a value of the wrong type.
    """
    stages = []
    parts = [p.strip() for p in text.split(";") if p.strip()]
    _check(bool(parts), f"--stages={text!r} defines no stage; example: "
           "'unfreeze=none epochs=10 lr=1e-3; unfreeze=top:2 epochs=5 lr=1e-4'")
    for i, part in enumerate(parts):
        kwargs: dict[str, Any] = {"name": f"stage{i}"}
        for tok in part.split():
            key, sep, value = tok.partition("=")
            _check(bool(sep) and key in _STAGE_KEYS,
                   f"--stages: {tok!r} in stage {i} is not key=value with a known key; "
                   f"allowed keys: {', '.join(_STAGE_KEYS)}")
            try:
                kwargs["warmup_epochs" if key == "warmup" else key] = _STAGE_KEYS[key](value)
            except ValueError:
                raise UserError(f"--stages: {key}={value!r} in stage {i} is not a valid {_STAGE_KEYS[key].__name__}") from None
        stages.append(StageConfig(**kwargs))
    return tuple(stages)


def simple_stages(*, head_epochs: int, lr: float, unfreeze: str, finetune_epochs: int,
                  finetune_lr: float | None, schedule: str = StageConfig.schedule,
                  warmup_epochs: float = 0.0, gradual_every: int = 0,
                  lr_decay_per_block: float = 1.0) -> tuple[StageConfig, ...]:
    """The common recipe: an optional head-only stage, then a fine-tuning stage.

    Raises:
      UserError: a negative number of epochs (the stages themselves are checked
        by `validate`, the same checks as for `--stages`).
    """
    _check(head_epochs >= 0, f"--head_epochs={head_epochs} must be >= 0 (0: no head-only stage)")
    _check(finetune_epochs >= 0, f"--finetune_epochs={finetune_epochs} must be >= 0")
    stages = []
    if head_epochs > 0:
        stages.append(StageConfig(name="head", unfreeze="none", epochs=head_epochs, lr=lr,
                                  schedule=schedule, warmup_epochs=warmup_epochs))
    if finetune_epochs > 0:
        stages.append(StageConfig(
            name="finetune" if head_epochs > 0 else "train", unfreeze=unfreeze,
            epochs=finetune_epochs, lr=finetune_lr if finetune_lr else lr, schedule=schedule,
            warmup_epochs=warmup_epochs, gradual_every=gradual_every,
            lr_decay_per_block=lr_decay_per_block))
    return tuple(stages)


# --- Comparing configs -------------------------------------------------------------

# Fields that may change on resume: they change speed or bookkeeping, not the maths.
# The same list decides when a sweep trial that ran before counts as stale.
RESUME_SAFE_FIELDS = {"train.steps_per_loop", "train.checkpoint_keep", "train.checkpoint_every_steps",
                      "train.histogram_every_epochs", "train.strategy", "train.collective_timeout", "train.export",
                      "train.cache_features", "train.jit_compile", "data.threads", "train.log_block_grads",
                      "data.cache", "data.cache_dir"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, dict) for x in v):
            v = {str(i): x for i, x in enumerate(v)}
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every field that differs and changes the maths.

    The old config is read back through `ExperimentConfig.from_dict` first, so a
    field added to the code since it was written takes its default; then every
    key counts, including a stage that only one of them has.
    """
    try:
        old = ExperimentConfig.from_dict(old).to_dict()
    except (TypeError, KeyError):  # a field since removed: compare as written
        pass
    a, b = _flatten(json.loads(json.dumps(old))), _flatten(json.loads(json.dumps(new)))
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "(absent)") != b.get(k, "(absent)")
                  and k not in RESUME_SAFE_FIELDS)
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in keys]
