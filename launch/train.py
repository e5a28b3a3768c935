"""Runs one experiment: `python -m launch.train --workdir=DIR [--preset=NAME] [flags]`.

Running it again with the same --workdir resumes from the latest checkpoint.
Default: small_cnn trained from scratch on the embedded digits, 20 epochs
(~30 s on a 2-core CPU, val accuracy ~0.97). Exit status: 0 done, 2 user
error, 3 non-finite loss, 4 workdir not writable, 75 interrupted (resumable).
"""

from __future__ import annotations

from launch import common  # noqa: F401  (sets TF log level before TF loads)

from absl import app, flags

from research import config as C

F = flags.FLAGS
_D, _A, _M, _S, _T, _E = (C.DataConfig, C.AugmentConfig, C.ModelConfig, C.StageConfig, C.TrainConfig,
                          C.EarlyStoppingConfig)


def define_flags(fv: flags.FlagValues) -> None:
    """Defines every flag on `fv`; defaults come from the config dataclasses (one source)."""
    def d(kind, name, default, help_, enum_values=None):
        if kind == "enum":
            flags.DEFINE_enum(name, default, enum_values, help_, flag_values=fv)
        else:
            getattr(flags, f"DEFINE_{kind}")(name, default, help_, flag_values=fv)

    d("string", "workdir", None, "Run directory (config, checkpoints, TensorBoard logs, results).")
    d("string", "preset", None, "A named recipe (research/studies/presets.py: quickstart, ants_top2, features, lp_ft); "
      "flags given override it.")
    # Data
    d("string", "dataset", _D.dataset, "digits | folder:PATH | tfds:NAME | tfrecord:DIR (shards written by launch.convert)")
    d("string", "data_dir", _D.data_dir, "TFDS data directory.")
    d("string", "train_split", _D.train_split, "TFDS training split.")
    d("string", "val_split", _D.val_split, "TFDS validation split (default: validation/val if present, else a slice of train).")
    d("float", "val_fraction", _D.val_fraction, "Held-out fraction when the source has no validation split.")
    d("enum", "test", _D.test, "The test split, never used for a training decision: auto = the source's own "
      "(PATH/test, TFDS test) or a --test_fraction slice of train; val = the source's validation split, with "
      "validation carved from train (datasets with only train/val); none = no test split.",
      enum_values=list(C.TEST_SOURCES))
    d("string", "test_split", _D.test_split, "TFDS test split (default: test if present).")
    d("float", "test_fraction", _D.test_fraction, "Fraction carved for test when the source has no test split.")
    d("string", "classes", _D.classes, "Class subset by name or index, e.g. 0-4 or ants,bees (relabelled 0..k-1).")
    d("integer", "image_size", _D.image_size, "Input side in pixels (0: the backbone's default).")
    d("integer", "batch_size", _D.batch_size, "Global batch size.")
    d("integer", "shuffle_buffer", _D.shuffle_buffer, "Shuffle buffer size.")
    d("enum", "cache", _D.cache, "Where decoded, resized images are kept between epochs: memory | disk (written "
      "once to --cache_dir, reused on resume and by later runs) | none (decoded every epoch) | auto (memory if "
      "they take under 25% of the available RAM, else disk).", enum_values=["auto", "memory", "disk", "none"])
    d("string", "cache_dir", _D.cache_dir, "The disk cache and the image check's results (default: WORKDIR/cache); "
      "share one between runs to decode a dataset once.")
    d("enum", "sampler", _D.sampler, "Training draws: shuffle (each image once per epoch) | balanced (each draw "
      "picks a class uniformly, then its next image; for imbalanced folders).", enum_values=list(C.SAMPLERS))
    d("float", "eval_crop", _D.eval_crop, "Evaluation (val, test, evaluate, the export) keeps this central fraction "
      "of each side, resized back (0.875 is the ImageNet convention; 1: the whole image).")
    d("integer", "data_threads", _D.threads, "tf.data threads (0: half the cores when training on CPU, all with a GPU/TPU).")
    d("bool", "skip_bad_images", _D.skip_bad_images, "Skip unreadable images instead of failing.")
    # Augmentation
    d("bool", "horizontal_flip", _A.horizontal_flip, "Random horizontal flips.")
    d("bool", "vertical_flip", _A.vertical_flip, "Random vertical flips.")
    d("string", "crop_scale", _A.crop_scale, "Random-resized-crop: MIN,MAX fraction of the area kept, e.g. 0.08,1 "
      "(empty: off).")
    d("string", "crop_ratio", _A.crop_ratio, "Random-resized-crop: MIN,MAX aspect ratio (log-uniform).")
    d("float", "rotation", _A.rotation, "Max random rotation, degrees.")
    d("float", "width_shift", _A.width_shift, "Max horizontal shift, fraction of width.")
    d("float", "height_shift", _A.height_shift, "Max vertical shift, fraction of height.")
    d("float", "zoom", _A.zoom, "Max zoom in/out, fraction.")
    d("float", "contrast", _A.contrast, "Max contrast change, fraction.")
    d("float", "brightness", _A.brightness, "Max brightness shift, fraction of the value range (added).")
    d("float", "saturation", _A.saturation, "Max saturation change: saturation times U(1-s, 1+s).")
    d("float", "hue", _A.hue, "Max hue rotation, fraction of the colour circle (<= 0.5).")
    d("float", "erase_prob", _A.erase_prob, "Random erasing probability (a box of 2-33% of the area, noise-filled).")
    d("integer", "randaugment", _A.randaugment, "RandAugment: operations per image (Keras's RandAugment ops, "
      "drawn per image; 0: off, 2 is common).")
    d("float", "randaugment_magnitude", _A.randaugment_magnitude, "RandAugment strength, Keras's factor in [0, 1].")
    d("float", "mixup", _A.mixup, "Mixup: α of the Beta(α, α) mixing weight (0: off; 0.2-1 is common).")
    d("float", "cutmix", _A.cutmix, "CutMix: α of the Beta(α, α) box area (0: off; 1 is common).")
    d("float", "mix_prob", _A.mix_prob, "Probability that a training batch is mixed (mixup or CutMix).")
    # Model
    d("string", "backbone", _M.backbone, "small_cnn | vgg16 | inception_v3 | mobilenet | mobilenet_v2 | resnet50 | efficientnet_b0 | xception")
    d("string", "weights", _M.weights, "imagenet | none | PATH.h5 | ckpt:WORKDIR (another run's backbone)")
    d("float", "alpha", _M.alpha, "Width multiplier for mobilenet / mobilenet_v2.")
    d("float", "dropout", _M.dropout, "Dropout before the classifier.")
    d("integer", "init_blocks", _M.init_blocks, "With --weights=ckpt:DIR, copy only the first N blocks (0: all).")
    d("enum", "bn", _M.bn, "BatchNorm policy: frozen (inference mode, statistics fixed), train (BN of unfrozen "
      "blocks trains), adapt (frozen, statistics re-estimated on the training images at each stage start: AdaBN).",
      enum_values=list(C.BN_POLICIES))
    d("bool", "train_bn", False, "Alias of --bn=train.")
    # Stages
    d("integer", "epochs", None, "Epochs of a single-stage run (the same as --finetune_epochs without --head_epochs).")
    d("integer", "head_epochs", 0, "Epochs of a head-only first stage (0: none).")
    d("float", "lr", _S.lr, "Learning rate (of the head stage, and of fine-tuning unless --finetune_lr).")
    d("string", "unfreeze", _S.unfreeze, "Unfreeze spec of the (fine-tuning) stage: none | all | top:K | blocks:a,b | "
      "from:NAME | regex:PAT | auto:K (= auto:rgn:K) | auto:probe:K (chosen at the stage's start)")
    d("integer", "finetune_epochs", _S.epochs, "Epochs of the (fine-tuning) stage.")
    d("float", "finetune_lr", None, "Learning rate of the fine-tuning stage (default: --lr).")
    d("enum", "schedule", _S.schedule, "Learning-rate schedule within each stage.", enum_values=list(C.SCHEDULES))
    d("float", "warmup_epochs", _S.warmup_epochs, "Linear warmup at the start of each stage, in epochs.")
    d("integer", "gradual_every", _S.gradual_every, "Gradual unfreezing: one more block every N epochs (0: off).")
    d("float", "lr_decay_per_block", _S.lr_decay_per_block, "Layer-wise LR decay per block below the top (1: off).")
    d("string", "stages", "", "General stages, overriding the simple flags: "
      "'unfreeze=none epochs=5 lr=1e-3; unfreeze=top:2 epochs=5 lr=1e-4 warmup=1'")
    # Optimisation and loop
    d("enum", "optimizer", _T.optimizer, "Optimizer.", enum_values=list(C.OPTIMIZERS))
    d("float", "momentum", _T.momentum, "SGD momentum.")
    d("float", "weight_decay", _T.weight_decay, "AdamW weight decay.")
    d("float", "clipnorm", _T.clipnorm, "Global-norm gradient clipping (0: off).")
    d("float", "label_smoothing", _T.label_smoothing, "Label smoothing of the training targets (0: off).")
    d("string", "class_weight", _T.class_weight, "none | balanced (n / (k n_c) on the training split) | a JSON file "
      "{class name: weight}: each training example's loss times its class's weight, as model.fit(class_weight=).")
    d("float", "ema_decay", _T.ema_decay, "EMA of the weights (e.g. 0.999; 0: off): scored each epoch as val_ema/*, "
      "monitorable for best/, scored on test at the end as test_ema/*.")
    d("bool", "cache_features", _T.cache_features, "Head-only stages without augmentation: run the frozen base once "
      "and train the head on cached features (much faster per epoch).")
    d("integer", "steps_per_loop", _T.steps_per_loop, "Steps per tf.function call.")
    d("integer", "seed", _T.seed, "Random seed.")
    d("bool", "deterministic", _T.deterministic, "Op determinism (bit-exact resume; the input pipeline is reproducible either way).")
    d("enum", "jit_compile", _T.jit_compile, "XLA-compile the step: auto (on with a GPU/TPU, off on CPU, where it "
      "is slower) | true | false.", enum_values=list(C.JIT))
    d("enum", "precision", _T.precision, "Keras dtype policy.", enum_values=list(C.PRECISIONS))
    d("enum", "strategy", _T.strategy, "tf.distribute strategy.", enum_values=list(C.STRATEGIES))
    d("integer", "cpu_devices", 1, "Split the CPU into N logical devices (test mirrored training without GPUs).")
    d("integer", "grad_accum_steps", _T.grad_accum_steps, "Micro-batches per optimizer step.")
    d("float", "collective_timeout", _T.collective_timeout, "Multi-worker collective timeout in seconds (0: none).")
    # Checkpoints, early stopping, summaries
    d("integer", "checkpoint_keep", _T.checkpoint_keep, "Latest checkpoints kept in ckpt/.")
    d("integer", "checkpoint_every_steps", _T.checkpoint_every_steps, "Also checkpoint every K steps (0: only every epoch).")
    d("bool", "log_block_grads", _T.log_block_grads, "TensorBoard per block and epoch: block_rgn/BLOCK (relative "
      "gradient norm) and block_change/BLOCK (relative weight change since the stage began).")
    d("integer", "histogram_every_epochs", _T.histogram_every_epochs, "Weight histograms every N epochs and at the last (0: off).")
    d("bool", "early_stopping", _E.enabled, "Stop a stage when the monitor stops improving.")
    d("string", "early_stopping_monitor", _E.monitor, " | ".join(C.MONITORS))
    d("enum", "early_stopping_mode", _E.mode, "Direction of improvement.", enum_values=list(C.ES_MODES))
    d("float", "early_stopping_min_delta", _E.min_delta, "Minimum change that counts as an improvement.")
    d("integer", "early_stopping_patience", _E.patience, "Epochs without improvement before stopping.")
    d("float", "early_stopping_baseline", _E.baseline, "Value the monitor must beat to reset patience.")
    d("integer", "early_stopping_start_from_epoch", _E.start_from_epoch, "Epochs (per stage) before monitoring starts.")
    d("bool", "restore_best_weights", _E.restore_best_weights, "At the end of each stage, restore the weights of the "
      "run's best epoch so far (best/).")
    d("bool", "export", _T.export, "At the end, export the final model to WORKDIR/export (.keras, SavedModel, labels).")
    d("bool", "allow_config_change", False, "Resume an unfinished run even though the config changed.")


def apply_preset(fv: flags.FlagValues) -> None:
    """Fills every flag not given on the command line from `--preset`.

    Raises:
      UserError: an unknown preset.
    """
    if not fv.preset:
        return
    from research.studies import presets
    for name, value in presets.get(fv.preset).items():
        if not fv[name].present:
            fv[name].value = value


def _bn_policy(fv) -> str:
    if fv["train_bn"].present and fv.train_bn:
        if fv["bn"].present and fv.bn != "train":
            raise C.UserError(f"--train_bn is --bn=train; it contradicts --bn={fv.bn}")
        return "train"
    return fv.bn


def config_from_flags(fv: flags.FlagValues = F) -> C.ExperimentConfig:
    """Flags -> a validated ExperimentConfig (no TensorFlow import).

    Raises:
      UserError: any invalid value.
    """
    apply_preset(fv)
    finetune_epochs = fv.finetune_epochs
    if fv.epochs is not None:
        if fv.head_epochs or fv["finetune_epochs"].present or fv.stages:
            raise C.UserError("--epochs is for single-stage runs; with --head_epochs use --finetune_epochs, "
                              "or give every stage's epochs in --stages")
        finetune_epochs = fv.epochs
    if fv.stages:
        stages = C.parse_stages(fv.stages)
    else:
        stages = C.simple_stages(head_epochs=fv.head_epochs, lr=fv.lr, unfreeze=fv.unfreeze,
                                 finetune_epochs=finetune_epochs, finetune_lr=fv.finetune_lr,
                                 schedule=fv.schedule, warmup_epochs=fv.warmup_epochs,
                                 gradual_every=fv.gradual_every, lr_decay_per_block=fv.lr_decay_per_block)
    return C.validate(C.ExperimentConfig(
        data=C.DataConfig(dataset=fv.dataset, data_dir=fv.data_dir, train_split=fv.train_split,
                          val_split=fv.val_split, val_fraction=fv.val_fraction, test=fv.test, test_split=fv.test_split,
                          test_fraction=fv.test_fraction, classes=fv.classes,
                          image_size=fv.image_size, batch_size=fv.batch_size, shuffle_buffer=fv.shuffle_buffer,
                          cache=fv.cache, cache_dir=fv.cache_dir or "", sampler=fv.sampler, eval_crop=fv.eval_crop,
                          skip_bad_images=fv.skip_bad_images, threads=fv.data_threads),
        augment=C.AugmentConfig(horizontal_flip=fv.horizontal_flip, vertical_flip=fv.vertical_flip,
                                crop_scale=fv.crop_scale, crop_ratio=fv.crop_ratio,
                                rotation=fv.rotation, width_shift=fv.width_shift,
                                height_shift=fv.height_shift, zoom=fv.zoom, contrast=fv.contrast,
                                brightness=fv.brightness, saturation=fv.saturation, hue=fv.hue,
                                erase_prob=fv.erase_prob, randaugment=fv.randaugment,
                                randaugment_magnitude=fv.randaugment_magnitude,
                                mixup=fv.mixup, cutmix=fv.cutmix, mix_prob=fv.mix_prob),
        model=C.ModelConfig(backbone=fv.backbone, weights=fv.weights, alpha=fv.alpha, dropout=fv.dropout,
                            bn=_bn_policy(fv), init_blocks=fv.init_blocks),
        train=C.TrainConfig(
            optimizer=fv.optimizer, momentum=fv.momentum, weight_decay=fv.weight_decay, clipnorm=fv.clipnorm,
            label_smoothing=fv.label_smoothing, class_weight=fv.class_weight, ema_decay=fv.ema_decay,
            steps_per_loop=fv.steps_per_loop, seed=fv.seed, deterministic=fv.deterministic,
            jit_compile=fv.jit_compile, precision=fv.precision, strategy=fv.strategy,
            grad_accum_steps=fv.grad_accum_steps, collective_timeout=fv.collective_timeout,
            checkpoint_keep=fv.checkpoint_keep, checkpoint_every_steps=fv.checkpoint_every_steps,
            histogram_every_epochs=fv.histogram_every_epochs, log_block_grads=fv.log_block_grads, export=fv.export, cache_features=fv.cache_features,
            early_stopping=C.EarlyStoppingConfig(
                enabled=fv.early_stopping, monitor=fv.early_stopping_monitor, mode=fv.early_stopping_mode,
                min_delta=fv.early_stopping_min_delta, patience=fv.early_stopping_patience,
                baseline=fv.early_stopping_baseline, start_from_epoch=fv.early_stopping_start_from_epoch,
                restore_best_weights=fv.restore_best_weights)),
        stages=stages))


def config_from_args(args: list[str]) -> C.ExperimentConfig:
    """`launch.train` arguments (without the program name) -> a validated config.

    What `launch/ablate.py` uses to validate and compare trials before running them.

    Raises:
      UserError: an unknown flag or an invalid value.
    """
    fv = flags.FlagValues()
    define_flags(fv)
    try:
        rest = fv(["launch.train", *args], known_only=True)[1:]
    except flags.Error as e:
        raise C.UserError(str(e)) from None
    # absl's own flags (--verbosity, --logtostderr, ...) are the process's, not the config's;
    # any other flag of the calling program (launch.ablate's --parallel) is not launch.train's.
    absl_flags = {f.name for m, fs in flags.FLAGS.flags_by_module_dict().items() if m.startswith("absl.")
                  for f in fs}
    for arg in rest:
        name = arg.lstrip("-").split("=", 1)[0]
        if not arg.startswith("-") or (name not in absl_flags and name.removeprefix("no") not in absl_flags):
            raise C.UserError(f"unknown launch.train flag or argument {arg!r}")
    return config_from_flags(fv)


def config_or_exit(argv, example_workdir: str) -> C.ExperimentConfig:
    """The command line's config (`--workdir` required); any user error exits 2, before
    TensorFlow is imported: a bad flag costs well under a second."""
    if len(argv) > 1:
        common.die(f"unexpected arguments {argv[1:]}; all options are --flags", common.EXIT_USER_ERROR)
    if not F.workdir:
        common.die(f"--workdir is required, e.g. --workdir={example_workdir}", common.EXIT_USER_ERROR)
    try:
        return config_from_flags()
    except C.UserError as e:
        common.die(str(e), common.EXIT_USER_ERROR)


def main(argv):
    config = config_or_exit(argv, "/tmp/run1")

    with common.quiet_tensorflow_startup():
        from research.run import distribute
        distribute.split_cpu(F.cpu_devices)
        if config.train.strategy != "multi_worker":  # its collectives need an uninitialised context
            distribute.list_devices()
    from research.run import train as train_lib
    # Errors end in one line and their exit status (launch/common.py:exit_status_of).
    with train_lib.Preemption() as preemption:
        results = train_lib.train_and_evaluate(config, F.workdir, allow_config_change=F.allow_config_change,
                                               preemption=preemption)
    f = results["final"]
    test = f"test/accuracy {f['test/accuracy']:.4f}  " if "test/accuracy" in f else "(no test split)  "
    print(f"\nfinal {test}val/accuracy {f['val/accuracy']:.4f}  val/loss {f['val/loss']:.4f}  "
          f"({results['epochs_run']} epochs, {results['wall_time_s']:.0f}s, "
          f"{results['images_per_second']:.0f} train images/s)")
    print(f"results: {F.workdir}/results.json")
    if F.export:
        print(f"model:   {F.workdir}/export (model.keras, saved_model, labels.json)")
    print(f"inspect: tensorboard --logdir {F.workdir}")


if __name__ == "__main__":
    define_flags(F)
    app.run(common.guarded(main), flags_parser=common.parse_flags_or_exit)
