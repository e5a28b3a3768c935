"""Runs one experiment: `python -m launch.train --workdir=DIR [flags]`.

Running it again with the same --workdir resumes from the latest checkpoint.
Default: small_cnn trained from scratch on the embedded digits, 20 epochs
(~30 s on a 2-core CPU, val accuracy ~0.97). Exit status: 0 done, 2 user
error, 3 non-finite loss, 4 workdir not writable, 75 interrupted (resumable).
"""

from __future__ import annotations

from launch import common  # noqa: F401  (sets TF log level before TF loads)

from absl import app, flags

F = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory (config, checkpoints, TensorBoard logs, results).")
# Data
flags.DEFINE_string("dataset", "digits", "digits | folder:PATH | tfds:NAME")
flags.DEFINE_string("data_dir", None, "TFDS data directory.")
flags.DEFINE_string("train_split", "train", "TFDS training split.")
flags.DEFINE_string("val_split", "", "TFDS validation split (default: validation/test if present, else a slice of train).")
flags.DEFINE_float("val_fraction", 0.2, "Held-out fraction when the source has no validation split.")
flags.DEFINE_string("classes", "", "Class subset by name or index, e.g. 0-4 or ants,bees (relabelled 0..k-1).")
flags.DEFINE_integer("image_size", 0, "Input side in pixels (0: the backbone's default).")
flags.DEFINE_integer("batch_size", 32, "Global batch size.")
flags.DEFINE_integer("shuffle_buffer", 10000, "Shuffle buffer size.")
flags.DEFINE_bool("cache", True, "Cache decoded, resized images in memory.")
flags.DEFINE_integer("data_threads", 0, "tf.data threads (0: half the cores when training on CPU, all with a GPU/TPU).")
flags.DEFINE_bool("skip_bad_images", False, "Skip unreadable images instead of failing.")
# Augmentation
flags.DEFINE_bool("horizontal_flip", False, "Random horizontal flips.")
flags.DEFINE_float("rotation", 0.0, "Max random rotation, degrees.")
flags.DEFINE_float("width_shift", 0.0, "Max horizontal shift, fraction of width.")
flags.DEFINE_float("height_shift", 0.0, "Max vertical shift, fraction of height.")
flags.DEFINE_float("zoom", 0.0, "Max zoom in/out, fraction.")
flags.DEFINE_float("contrast", 0.0, "Max contrast change, fraction.")
# Model
flags.DEFINE_string("backbone", "small_cnn", "small_cnn | vgg16 | inception_v3 | mobilenet | mobilenet_v2 | resnet50 | efficientnet_b0 | xception")
flags.DEFINE_string("weights", "none", "imagenet | none | PATH.h5 | ckpt:WORKDIR (another run's backbone)")
flags.DEFINE_float("alpha", 1.0, "Width multiplier for mobilenet / mobilenet_v2.")
flags.DEFINE_float("dropout", 0.2, "Dropout before the classifier.")
flags.DEFINE_integer("init_blocks", 0, "With --weights=ckpt:DIR, copy only the first N blocks (0: all).")
flags.DEFINE_bool("train_bn", False, "Let BatchNorm layers in unfrozen blocks train (default: frozen, inference mode).")
# Stages
flags.DEFINE_integer("head_epochs", 0, "Epochs of a head-only first stage (0: none).")
flags.DEFINE_float("lr", 2e-3, "Learning rate (of the head stage, and of fine-tuning unless --finetune_lr).")
flags.DEFINE_string("unfreeze", "all", "Unfreeze spec of the fine-tuning stage: none | all | top:K | blocks:a,b | from:NAME | regex:PAT")
flags.DEFINE_integer("finetune_epochs", 20, "Epochs of the (fine-tuning) stage.")
flags.DEFINE_float("finetune_lr", None, "Learning rate of the fine-tuning stage (default: --lr).")
flags.DEFINE_enum("schedule", "cosine", ["constant", "cosine"], "Learning-rate schedule within each stage.")
flags.DEFINE_float("warmup_epochs", 0.0, "Linear warmup at the start of each stage, in epochs.")
flags.DEFINE_integer("gradual_every", 0, "Gradual unfreezing: one more block every N epochs (0: off).")
flags.DEFINE_float("lr_decay_per_block", 1.0, "Layer-wise LR decay per block below the top (1: off).")
flags.DEFINE_string("stages", "", "General stages, overriding the simple flags: "
                    "'unfreeze=none epochs=5 lr=1e-3; unfreeze=top:2 epochs=5 lr=1e-4 warmup=1'")
# Optimisation and loop
flags.DEFINE_enum("optimizer", "adam", ["adam", "sgd", "adamw"], "Optimizer.")
flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
flags.DEFINE_float("weight_decay", 1e-4, "AdamW weight decay.")
flags.DEFINE_float("clipnorm", 0.0, "Global-norm gradient clipping (0: off).")
flags.DEFINE_bool("cache_features", False, "Head-only stages without augmentation: run the frozen base once "
                  "and train the head on cached features (much faster per epoch).")
flags.DEFINE_integer("steps_per_loop", 20, "Steps per tf.function call.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_bool("deterministic", False, "Op determinism (bit-exact resume; the input pipeline is reproducible either way).")
flags.DEFINE_bool("jit_compile", False, "XLA-compile the step (slower on CPU).")
flags.DEFINE_enum("precision", "float32", ["float32", "mixed_float16", "mixed_bfloat16"], "Keras dtype policy.")
flags.DEFINE_enum("strategy", "auto", ["auto", "default", "one_device", "mirrored", "multi_worker", "tpu"], "tf.distribute strategy.")
flags.DEFINE_integer("cpu_devices", 1, "Split the CPU into N logical devices (test mirrored training without GPUs).")
flags.DEFINE_integer("grad_accum_steps", 1, "Micro-batches per optimizer step.")
flags.DEFINE_float("collective_timeout", 0.0, "Multi-worker collective timeout in seconds (0: none).")
# Checkpoints, early stopping, summaries
flags.DEFINE_integer("checkpoint_keep", 3, "Latest checkpoints kept in ckpt/.")
flags.DEFINE_integer("checkpoint_every_steps", 0, "Also checkpoint every K steps (0: only every epoch).")
flags.DEFINE_integer("histogram_every_epochs", 0, "Weight histograms every N epochs (0: off).")
flags.DEFINE_bool("early_stopping", False, "Stop a stage when the monitor stops improving.")
flags.DEFINE_string("early_stopping_monitor", "val/loss", "val/loss | val/accuracy | val/top5_accuracy | train/loss | train/accuracy")
flags.DEFINE_enum("early_stopping_mode", "auto", ["auto", "min", "max"], "Direction of improvement.")
flags.DEFINE_float("early_stopping_min_delta", 0.0, "Minimum change that counts as an improvement.")
flags.DEFINE_integer("early_stopping_patience", 5, "Epochs without improvement before stopping.")
flags.DEFINE_float("early_stopping_baseline", None, "Value the monitor must beat to reset patience.")
flags.DEFINE_integer("early_stopping_start_from_epoch", 0, "Epochs (per stage) before monitoring starts.")
flags.DEFINE_bool("restore_best_weights", False, "At the end of each stage, restore its best epoch's weights.")
flags.DEFINE_bool("export", True, "At the end, export the final model to WORKDIR/export (.keras, SavedModel, labels).")
flags.DEFINE_bool("allow_config_change", False, "Resume a workdir even though the config changed.")


def config_from_flags():
    """Flags -> a validated ExperimentConfig."""
    from research import config as C

    if F.stages:
        stages = C.parse_stages(F.stages)
    else:
        stages = C.simple_stages(head_epochs=F.head_epochs, lr=F.lr, unfreeze=F.unfreeze,
                                 finetune_epochs=F.finetune_epochs, finetune_lr=F.finetune_lr,
                                 schedule=F.schedule, warmup_epochs=F.warmup_epochs,
                                 gradual_every=F.gradual_every, lr_decay_per_block=F.lr_decay_per_block)
    return C.validate(C.ExperimentConfig(
        data=C.DataConfig(dataset=F.dataset, data_dir=F.data_dir, train_split=F.train_split,
                          val_split=F.val_split, val_fraction=F.val_fraction, classes=F.classes,
                          image_size=F.image_size, batch_size=F.batch_size, shuffle_buffer=F.shuffle_buffer,
                          cache=F.cache, skip_bad_images=F.skip_bad_images, threads=F.data_threads),
        augment=C.AugmentConfig(horizontal_flip=F.horizontal_flip, rotation=F.rotation, width_shift=F.width_shift,
                                height_shift=F.height_shift, zoom=F.zoom, contrast=F.contrast),
        model=C.ModelConfig(backbone=F.backbone, weights=F.weights, alpha=F.alpha, dropout=F.dropout,
                            train_bn=F.train_bn, init_blocks=F.init_blocks),
        train=C.TrainConfig(
            optimizer=F.optimizer, momentum=F.momentum, weight_decay=F.weight_decay, clipnorm=F.clipnorm,
            steps_per_loop=F.steps_per_loop, seed=F.seed, deterministic=F.deterministic,
            jit_compile=F.jit_compile, precision=F.precision, strategy=F.strategy,
            grad_accum_steps=F.grad_accum_steps, collective_timeout=F.collective_timeout, checkpoint_keep=F.checkpoint_keep,
            checkpoint_every_steps=F.checkpoint_every_steps, histogram_every_epochs=F.histogram_every_epochs,
            export=F.export, cache_features=F.cache_features,
            early_stopping=C.EarlyStoppingConfig(
                enabled=F.early_stopping, monitor=F.early_stopping_monitor, mode=F.early_stopping_mode,
                min_delta=F.early_stopping_min_delta, patience=F.early_stopping_patience,
                baseline=F.early_stopping_baseline, start_from_epoch=F.early_stopping_start_from_epoch,
                restore_best_weights=F.restore_best_weights)),
        stages=stages))


def main(argv):
    if len(argv) > 1:
        common.die(f"unexpected arguments {argv[1:]}; all options are --flags", common.EXIT_USER_ERROR)
    if not F.workdir:
        common.die("--workdir is required, e.g. --workdir=/tmp/run1", common.EXIT_USER_ERROR)
    from research import distribute
    from research.config import UserError
    try:
        distribute.split_cpu(F.cpu_devices)
        config = config_from_flags()
    except UserError as e:
        common.die(str(e), common.EXIT_USER_ERROR)

    from research import checkpoints
    from research import train as train_lib
    try:
        with train_lib.Preemption() as preemption:
            results = train_lib.train_and_evaluate(config, F.workdir, allow_config_change=F.allow_config_change,
                                                   preemption=preemption)
    except UserError as e:
        common.die(str(e), common.EXIT_USER_ERROR)
    except train_lib.Interrupted as e:
        common.die(str(e), common.EXIT_INTERRUPTED)
    except train_lib.NonFiniteLoss as e:
        common.die(str(e), common.EXIT_NON_FINITE)
    except checkpoints.StorageError as e:
        common.die(str(e), common.EXIT_STORAGE)
    f = results["final"]
    print(f"\nfinal val_accuracy {f['val_accuracy']:.4f}  val_loss {f['val_loss']:.4f}  "
          f"({results['epochs_run']} epochs, {results['wall_time_s']:.0f}s, "
          f"{results['train_images_per_sec']:.0f} train images/s)")
    print(f"results: {F.workdir}/results.json")
    if F.export:
        print(f"model:   {F.workdir}/export (model.keras, saved_model, labels.json)")
    print(f"inspect: tensorboard --logdir {F.workdir}")


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags_or_exit)
