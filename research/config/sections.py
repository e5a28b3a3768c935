"""The config's sections: frozen dataclasses, the one place a field is declared.

Each field is declared once, with `opt(default, help, ...)`: its default, its
`--help` text, its flag name when it is not the field's own (`flag=`), whether
its flag takes only listed values (`enum=`), and whether it may change when a
run resumes (`resume_safe=`: speed or bookkeeping, not the maths). The flags of
`launch.train` are generated from these fields (research/config/fields.py).
Each section checks its own values in `validate`; checks across sections are in
research/config/validate.py. Class docstrings say more where a field needs it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass
from typing import Any

from research.config.declare import check_enums as _check_enums
from research.config.declare import choice, opt  # noqa: F401  (the sections' own, re-exported)
from research.config.specs import SOURCE_KINDS, DatasetRef, check
from research.config.stage import OPTIMIZERS, SCHEDULES, StageConfig  # noqa: F401  (re-exported)
from research.errors import UserError
from research.model import backbones  # imports no TensorFlow: the registry is lazy

JIT = ("auto", "true", "false")
BN_POLICIES = ("frozen", "train", "adapt")
BACKBONE_NAMES = tuple(backbones.BACKBONES)
TEST_SOURCES = ("auto", "val", "none")
SAMPLERS = ("shuffle", "balanced")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker", "tpu")
ES_MODES = ("auto", "min", "max")
CACHE_MODES = ("auto", "memory", "disk", "none")
VARIANT_METRICS = ("loss", "accuracy", "top5_accuracy")  # what validation scores, also as val_NAME/ (val_ema/)
MONITORS = (*(f"val/{m}" for m in VARIANT_METRICS), "train/loss", "train/accuracy")


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are batched.

    `test` decides where the test split, which no training decision ever sees,
    comes from: `auto`: the source's own (`PATH/test`, the TFDS `test_split`) if it
    has one, else a `test_fraction` slice carved from the training images; `val`:
    the source's validation split is the test split, and validation is carved from
    the training images (datasets that ship only train/val); `none`: no test split.
    `cache=auto` keeps the decoded images in memory when they take under a quarter
    of the available RAM, else on disk. `eval_crop` reaches validation, test,
    `launch.evaluate` and the exported model, so prediction too.
    """

    dataset: str = opt("digits", "digits | folder:PATH | tfds:NAME | tfrecord:DIR (TFRecord shards written by the converter; README: Datasets larger than memory)")
    data_dir: str | None = opt(None, "TFDS data directory.")
    train_split: str = opt("train", "TFDS training split.")
    val_split: str = opt("", "TFDS validation split (default: validation/val if present, else a slice of train).")
    val_fraction: float = opt(0.2, "Held-out fraction when the source has no validation split.")
    test: str = opt("auto", "The test split, never used for a training decision: auto = the source's own "
                    "(PATH/test, TFDS test) or a --test_fraction slice of train; val = the source's validation split, "
                    "with validation carved from train (datasets with only train/val); none = no test split.",
                    enum=TEST_SOURCES)
    test_split: str = opt("", "TFDS test split (default: test if present).")
    test_fraction: float = opt(0.1, "Fraction carved for test when the source has no test split.")
    folds: int = opt(0, "K-fold cross-validation (0: off; digits and folder datasets): validation is fold --fold "
                     "of a stratified K-fold partition of the pool, the images that are neither test nor the "
                     "source's own validation split (PATH/val, which is then unused), fixed whatever --seed; "
                     "train is the other K-1 folds; test is the same as without folds.")
    fold: int = opt(0, "With --folds=K, the fold that is validation: 0..K-1.")
    refit: bool = opt(False, "Train on the whole pool (every fold; without --folds, train and the carved validation) "
                      "with no validation: give each stage its epochs (early stopping and best/ only on train/...); "
                      "test is unchanged.")
    classes: str = opt("", "Class subset by name or index, e.g. 0-4 or ants,bees (relabelled 0..k-1).")
    image_size: int = opt(0, "Input side in pixels (0: the backbone's default).")
    batch_size: int = opt(32, "Global batch size.")
    shuffle_buffer: int = opt(10000, "Shuffle buffer size (capped at the dataset size).")
    cache: str = opt("auto", "Where decoded, resized images are kept between epochs: memory | disk (written once to "
                     "--cache_dir, reused on resume and by later runs) | none (decoded every epoch) | auto (memory if "
                     "they take under 25% of the available RAM, else disk).", enum=CACHE_MODES, resume_safe=True)
    cache_dir: str = opt("", "The disk cache and the image check's results (default: WORKDIR/cache); share one "
                         "between runs to decode a dataset once.", resume_safe=True)
    sampler: str = opt("shuffle", "Training draws: shuffle (each image once per epoch) | balanced (each draw picks a "
                       "class uniformly, then its next image; for imbalanced folders).", enum=SAMPLERS)
    eval_crop: float = opt(1.0, "Evaluation (val, test, evaluate, the export) keeps this central fraction of each "
                           "side, resized back (0.875 is the ImageNet convention; 1: the whole image).")
    skip_bad_images: bool = opt(False, "Skip unreadable images instead of failing.")
    threads: int = opt(0, "tf.data threads (0: half the cores when training on CPU, all with a GPU/TPU).",
                       flag="data_threads", resume_safe=True)

    @functools.cached_property
    def source(self) -> DatasetRef:
        """The dataset, parsed once per config (the field stays the string of the flag and config.json)."""
        return DatasetRef.parse(self.dataset)

    def validate(self) -> None:
        _check_enums(self)
        ds, src = self.dataset, self.source
        check(ds == "digits" or (src.kind in SOURCE_KINDS[1:] and ":" in ds),
              f"--dataset={ds!r} is not valid; allowed values: digits, folder:PATH, tfds:NAME, tfrecord:DIR")
        check(not (src.kind == "tfrecord" and not src.arg),
              "--dataset=tfrecord: needs the directory of shards the converter wrote, e.g. tfrecord:/data/flowers-shards")
        check(not (src.kind == "folder" and not src.arg), "--dataset=folder: needs a path, e.g. folder:/data/flowers")
        check(not (src.kind == "tfds" and not src.arg), "--dataset=tfds: needs a dataset name, e.g. tfds:tf_flowers")
        if src.kind in ("folder", "tfrecord"):
            check(os.path.isdir(src.arg), f"--dataset={ds}: no such directory")
        check(not self.cache_dir or writable_dir(self.cache_dir),
              f"--cache_dir={self.cache_dir}: not a directory this process can create and write into")
        check(0.0 < self.val_fraction < 1.0, f"--val_fraction={self.val_fraction} must be strictly between 0 and 1")
        check(0.0 < self.test_fraction < 1.0,
              f"--test_fraction={self.test_fraction} must be strictly between 0 and 1")
        check(self.test == "none" or self.val_fraction + self.test_fraction < 0.9,
              f"--val_fraction={self.val_fraction} and --test_fraction={self.test_fraction} leave less than 10% to "
              "train")
        check(self.folds == 0 or self.folds >= 2, f"--folds={self.folds} must be 0 (off) or at least 2")
        check(0 <= self.fold < max(self.folds, 1),
              f"--fold={self.fold} must be in 0..{max(self.folds, 1) - 1}" + ("" if self.folds else " without --folds"))
        check(not (self.folds or self.refit) or src.kind in ("digits", "folder"),
              f"--{'folds' if self.folds else 'refit'} splits a digits or folder dataset's images; {src.kind} "
              "datasets are split by their own splits or shards")
        check(self.batch_size >= 1, f"--batch_size={self.batch_size} must be >= 1")
        check(self.image_size >= 0, f"--image_size={self.image_size} must be >= 0 (0 means the backbone's default)")
        check(self.shuffle_buffer >= 1, f"--shuffle_buffer={self.shuffle_buffer} must be >= 1")
        check(0.0 < self.eval_crop <= 1.0,
              f"--eval_crop={self.eval_crop} must be in (0, 1] (1: the whole image; 0.875 is common)")
        check(self.threads >= 0, f"--data_threads={self.threads} must be >= 0 (0: automatic)")


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation settings, the ImageDataGenerator knobs (see research/data/augment.py).

    Random erasing follows Zhong et al., 2020 (torchvision's box rule: 2-33 % of the
    area, aspect ratio 0.3-3.3, the box filled with noise); RandAugment, Cubuk et al.,
    2020 (Keras's operations, drawn per image); mixup and CutMix make the training
    targets soft (research/data/mix.py).
    """

    horizontal_flip: bool = opt(False, "Random horizontal flips.")
    vertical_flip: bool = opt(False, "Random vertical flips.")
    crop_scale: str = opt("", "Random-resized-crop: MIN,MAX fraction of the area kept, e.g. 0.08,1 (empty: off).")
    crop_ratio: str = opt("0.75,1.3333", "Random-resized-crop: MIN,MAX aspect ratio (log-uniform).")
    rotation: float = opt(0.0, "Max random rotation, degrees.")
    width_shift: float = opt(0.0, "Max horizontal shift, fraction of width.")
    height_shift: float = opt(0.0, "Max vertical shift, fraction of height.")
    zoom: float = opt(0.0, "Max zoom in/out, fraction.")
    contrast: float = opt(0.0, "Max contrast change, fraction.")
    brightness: float = opt(0.0, "Max brightness shift, fraction of the value range (added).")
    saturation: float = opt(0.0, "Max saturation change: saturation times U(1-s, 1+s).")
    hue: float = opt(0.0, "Max hue rotation, fraction of the colour circle (<= 0.5).")
    erase_prob: float = opt(0.0, "Random erasing probability (a box of 2-33% of the area, noise-filled).")
    randaugment: int = opt(0, "RandAugment: operations per image (Keras's RandAugment ops, drawn per image; 0: off, "
                           "2 is common).")
    randaugment_magnitude: float = opt(0.5, "RandAugment strength, Keras's factor in [0, 1].")
    mixup: float = opt(0.0, "Mixup: α of the Beta(α, α) mixing weight (0: off; 0.2-1 is common).")
    cutmix: float = opt(0.0, "CutMix: α of the Beta(α, α) box area (0: off; 1 is common).")
    mix_prob: float = opt(1.0, "Probability that a training batch is mixed (mixup or CutMix).")

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

    def validate(self) -> None:
        _check_enums(self)
        for name in ("rotation", "width_shift", "height_shift", "zoom", "contrast"):
            v = getattr(self, name)
            check(v >= 0 and math.isfinite(v), f"--{name}={v} must be a finite number >= 0")
        for name, low, high in (("crop_scale", 0.0, 1.0), ("crop_ratio", 0.0, math.inf)):
            if name == "crop_scale" and not self.crop_scale:
                continue
            try:
                lo, hi = self.crop_range(name)
            except ValueError:
                raise UserError(f"--{name}={getattr(self, name)!r} is not MIN,MAX (for example 0.08,1)") from None
            check(low < lo <= hi <= high, f"--{name}={getattr(self, name)} needs {low} < MIN <= MAX <= {high}")
        for name in ("mixup", "cutmix"):
            check(getattr(self, name) >= 0 and math.isfinite(getattr(self, name)),
                  f"--{name}={getattr(self, name)} is the α of a Beta(α, α) and must be >= 0 (0: off; 0.2-1 is common)")
        check(0.0 <= self.mix_prob <= 1.0, f"--mix_prob={self.mix_prob} must be in [0, 1]")
        check(self.rotation <= 180, f"--rotation={self.rotation} is in degrees and must be <= 180")
        check(0 <= self.randaugment <= 5, f"--randaugment={self.randaugment} is the number of operations per image, "
              "0-5 (0: off; 2 is common)")
        for name, high in (("brightness", 1.0), ("saturation", 1.0), ("hue", 0.5), ("erase_prob", 1.0),
                           ("randaugment_magnitude", 1.0)):
            v = getattr(self, name)
            check(0.0 <= v <= high, f"--{name}={v} must be in [0, {high}]")
        for name in ("width_shift", "height_shift", "zoom", "contrast"):
            check(getattr(self, name) < 1, f"--{name}={getattr(self, name)} is a fraction and must be < 1")


@dataclass(frozen=True)
class ModelConfig:
    """Backbone and head.

    `bn` is the BatchNorm policy (research/model/unfreeze.py, research/run/actions/adabn.py):
    `frozen` (default): every BN layer in inference mode, its moving statistics and
    gamma/beta fixed; the standard fine-tuning advice, and what keeps small-data runs
    stable. `train`: BN layers of unfrozen blocks train (batch statistics, moving-average
    updates, gamma/beta). `adapt`: frozen as above, but at the start of every stage the
    moving statistics of every BN layer are re-estimated on the training images (AdaBN,
    Li et al. 2016), for target data far from the pretraining data. The policy speaks of
    BatchNorm only: LayerNorm (ConvNeXt, ViT) keeps no statistics, computes the same
    thing in training and inference, and its gamma/beta train with their block under
    every policy; `adapt` is refused where the base has no BatchNorm. `init_blocks` is
    the transfer study's "copy the first n layers".
    """

    backbone: str = opt("small_cnn", " | ".join(BACKBONE_NAMES) + " | hub:PRESET (a KerasHub ViT preset or "
                        "directory; needs the [hub] extra)")
    weights: str = opt("none", "imagenet | none | PATH.h5 | ckpt:WORKDIR (another run's backbone, head skipped)")
    alpha: float = opt(1.0, "Width multiplier for mobilenet, mobilenet_v2 and mobilenet_v3_*.")
    dropout: float = opt(0.2, "Dropout before the classifier.")
    bn: str = opt("frozen", "BatchNorm policy: frozen (inference mode, statistics fixed), train (BN of unfrozen "
                  "blocks trains, and every BN layer whose gamma/beta a norm or bias spec trains runs on batch "
                  "statistics), adapt (frozen, statistics re-estimated on the training images at each stage "
                  "start: AdaBN). BatchNorm only: LayerNorm has no statistics and trains with its block under "
                  "every policy; adapt is refused on LayerNorm backbones (convnext_*, hub:).",
                  enum=BN_POLICIES)
    init_blocks: int = opt(0, "With --weights=ckpt:DIR, copy only the first N blocks (0: all).")
    lora_alpha: float = opt(0.0, "LoRA's alpha (lora:R unfreeze specs): the update A@B is scaled by alpha/R "
                            "(0: alpha = R, a scale of 1).")
    features: str = opt("top", "What the head reads: top (the base's output), BLOCK (the base cut at the end of "
                        "that block; the blocks above are dropped), A+B+... (several blocks' pooled outputs, "
                        "concatenated), auto (the block the linear probes peak at on validation, measured at the "
                        "run's start). Every choice but top is normalised (--features_norm).")
    features_norm: str = opt("layer", "With --features other than top: normalise each block's pooled output "
                             "(layer: LayerNormalization without parameters, before any concatenation) or not "
                             "(none).", enum=("layer", "none"))

    @property
    def train_bn(self) -> bool:
        return self.bn == "train"

    @functools.cached_property
    def init_run(self) -> str | None:
        """The other run's workdir of `--weights=ckpt:WORKDIR` (None: other weights), parsed once."""
        return self.weights[len("ckpt:"):] if self.weights.startswith("ckpt:") else None

    def validate(self) -> None:
        _check_enums(self)
        entry = backbones.get(self.backbone)
        w = self.weights
        check(w in ("imagenet", "none") or self.init_run is not None or w.endswith((".h5", ".weights.h5", ".keras")),
              f"--weights={w!r} is not valid; allowed values: imagenet, none, a .h5 weights file, ckpt:WORKDIR")
        check(not (w == "imagenet" and not entry.has_imagenet),
              f"--weights=imagenet is not available for backbone {self.backbone!r}; use none, a .h5 file or "
              "ckpt:WORKDIR")
        check(0.0 <= self.dropout < 1.0, f"--dropout={self.dropout} must be in [0, 1)")
        check(not (self.bn == "adapt" and entry.norm == "layer"),
              f"--bn=adapt re-estimates BatchNorm statistics, and {self.backbone} has no BatchNorm layer "
              f"({backbones.NORM_MEANING[entry.norm]}): use --bn=frozen")
        check(self.alpha > 0, f"--alpha={self.alpha} must be > 0")
        check(self.alpha == 1.0 or entry.has_alpha,
              f"--alpha={self.alpha}: backbone {self.backbone!r} has no width multiplier; --alpha applies to "
              + ", ".join(n for n, e in backbones.BACKBONES.items() if e.has_alpha))
        check(self.init_blocks >= 0, f"--init_blocks={self.init_blocks} must be >= 0")
        check(self.init_blocks == 0 or self.init_run is not None, "--init_blocks needs --weights=ckpt:WORKDIR")
        if self.features != "auto":
            backbones.feature_blocks(self.backbone, self.features)
        check(not (self.features == "auto" and w == "none"),
              "--features=auto reads the block where pretrained features peak; with --weights=none every block "
              "is random: name a block, or give weights")


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """Keras-compatible early stopping, applied to each stage separately.

    With `enabled=False` (the default) nothing stops; the run's best epoch by
    `monitor` is kept in `best/` whether or not stopping is enabled.
    """

    enabled: bool = opt(False, "Stop a stage when the monitor stops improving.", flag="early_stopping")
    monitor: str = opt("val/loss", " | ".join(MONITORS) + " | val_VARIANT/METRIC of a weight variant "
                       "(val_ema/accuracy with --ema_decay)", flag="early_stopping_monitor")
    mode: str = opt("auto", "Direction of improvement.", flag="early_stopping_mode", enum=ES_MODES)
    min_delta: float = opt(0.0, "Minimum change that counts as an improvement.", flag="early_stopping_min_delta")
    patience: int = opt(5, "Epochs without improvement before stopping.", flag="early_stopping_patience")
    baseline: float | None = opt(None, "Value the monitor must beat to reset patience.",
                                 flag="early_stopping_baseline")
    start_from_epoch: int = opt(0, "Epochs (per stage) before monitoring starts.",
                                flag="early_stopping_start_from_epoch")
    restore_best_weights: bool = opt(False, "At the end of each stage, restore the weights of the run's best epoch "
                                     "so far (best/).")

    def validate(self) -> None:
        _check_enums(self)
        variant, _, metric = self.monitor.partition("/")
        check(self.monitor in MONITORS or (variant.startswith("val_") and metric in VARIANT_METRICS),
              f"--early_stopping_monitor={self.monitor!r} is not valid; allowed values: {', '.join(MONITORS)}, "
              f"or val_VARIANT/{{{','.join(VARIANT_METRICS)}}} of a weight variant (val_ema/ with --ema_decay)")
        check(self.patience >= 0, f"--early_stopping_patience={self.patience} must be >= 0")
        check(self.start_from_epoch >= 0,
              f"--early_stopping_start_from_epoch={self.start_from_epoch} must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, loop and run-control settings shared by all stages.

    `label_smoothing`: the training targets put 1 - s on the class and s / k on every
    class; `train/loss` is that objective, `val/` and `test/` losses stay plain
    cross-entropy so that runs with and without it compare. `class_weight`: class c
    weighs n / (k n_c) on the training split with `balanced` (scikit-learn's rule);
    evaluation is unweighted. `ema_decay`: the averaged weights are scored each epoch
    (`val_ema/...`), can be monitored for `best/`, and are scored on test at the end.
    `jit_compile=auto` is Keras's own rule: XLA on GPU/TPU, off on CPU, where it made
    MobileNetV2 ~8x slower.
    """

    optimizer: str = opt("adam", "Optimizer.", enum=OPTIMIZERS)
    momentum: float = opt(0.9, "SGD momentum.")
    weight_decay: float = opt(1e-4, "AdamW weight decay.")
    clipnorm: float = opt(0.0, "Global-norm gradient clipping (0: off).")
    label_smoothing: float = opt(0.0, "Label smoothing of the training targets (0: off).")
    class_weight: str = opt("none", "none | balanced (n / (k n_c) on the training split) | a JSON file {class name: "
                            "weight}: each training example's loss times its class's weight, as "
                            "model.fit(class_weight=).")
    ema_decay: float = opt(0.0, "EMA of the weights (e.g. 0.999; 0: off): scored each epoch as val_ema/*, "
                           "monitorable for best/, scored on test at the end as test_ema/*.")
    steps_per_loop: int = opt(20, "Steps per tf.function call.", resume_safe=True)
    seed: int = opt(0, "Random seed.")
    deterministic: bool = opt(False, "Op determinism (bit-exact resume; the input pipeline is reproducible either "
                              "way).")
    jit_compile: str = opt("auto", "XLA-compile the step: auto (on with a GPU/TPU, off on CPU, where it is slower) | "
                           "true | false.", enum=JIT, resume_safe=True)
    precision: str = opt("float32", "Keras dtype policy.", enum=PRECISIONS)
    strategy: str = opt("auto", "tf.distribute strategy.", enum=STRATEGIES, resume_safe=True)
    cpu_devices: int = opt(1, "Split the CPU into N logical devices (test mirrored training without GPUs).",
                           resume_safe=True)
    grad_accum_steps: int = opt(1, "Micro-batches per optimizer step.")
    collective_timeout: float = opt(0.0, "Multi-worker collective timeout in seconds (0: none).", resume_safe=True)
    checkpoint_keep: int = opt(3, "Latest checkpoints kept in ckpt/.", resume_safe=True)
    checkpoint_every_steps: int = opt(0, "Also checkpoint every K steps (0: only every epoch).", resume_safe=True)
    histogram_every_epochs: int = opt(0, "Weight histograms every N epochs and at the last (0: off).",
                                      resume_safe=True)
    log_block_grads: bool = opt(False, "TensorBoard per block and epoch: block_rgn/BLOCK (relative gradient norm) "
                                "and block_change/BLOCK (relative weight change since the stage began).",
                                resume_safe=True)
    cache_features: bool = opt(False, "Head-only stages without augmentation: run the frozen base once and train the "
                               "head on cached features (much faster per epoch).", resume_safe=True)
    export: bool = opt(True, "At the end, export the final model to WORKDIR/export (.keras, SavedModel, labels).",
                       resume_safe=True)
    early_stopping: EarlyStoppingConfig = opt(None, "", factory=EarlyStoppingConfig)

    def validate(self) -> None:
        _check_enums(self)
        t = self
        check(t.steps_per_loop >= 1, f"--steps_per_loop={t.steps_per_loop} must be >= 1")
        check(0.0 <= t.label_smoothing < 1.0, f"--label_smoothing={t.label_smoothing} must be in [0, 1)")
        check(t.class_weight in ("none", "balanced") or os.path.isfile(t.class_weight),
              f"--class_weight={t.class_weight!r} is not valid; allowed values: none, balanced, or a JSON file "
              "mapping class names to weights")
        check(t.clipnorm >= 0, f"--clipnorm={t.clipnorm} must be >= 0 (0 disables clipping)")
        check(0 <= t.momentum <= 1, f"--momentum={t.momentum} must be in [0, 1]")
        check(t.cpu_devices >= 1, f"--cpu_devices={t.cpu_devices} must be >= 1")
        check(t.cpu_devices == 1 or t.strategy in ("mirrored", "multi_worker"),
              f"--cpu_devices={t.cpu_devices} splits the CPU for a mirrored run; it does nothing with "
              f"--strategy={t.strategy}: add --strategy=mirrored")
        check(t.grad_accum_steps >= 1, f"--grad_accum_steps={t.grad_accum_steps} must be >= 1")
        check(t.checkpoint_keep >= 1, f"--checkpoint_keep={t.checkpoint_keep} must be >= 1")
        check(t.checkpoint_every_steps >= 0, f"--checkpoint_every_steps={t.checkpoint_every_steps} must be >= 0")
        check(t.histogram_every_epochs >= 0, f"--histogram_every_epochs={t.histogram_every_epochs} must be >= 0")
        t.early_stopping.validate()


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = opt(None, "", factory=DataConfig)
    augment: AugmentConfig = opt(None, "", factory=AugmentConfig)
    model: ModelConfig = opt(None, "", factory=ModelConfig)
    train: TrainConfig = opt(None, "", factory=TrainConfig)
    stages: tuple[StageConfig, ...] = opt((StageConfig(),), "", flag=False)

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
