"""The Keras transfer-learning guide's recipe, run through `model.fit`: the reference
this codebase's defaults are measured against (`launch.ablate --study=recipes`).

As keras.io/guides/transfer_learning writes it (Keras 3.15): the augmentation is
a `RandomFlip("horizontal")` and a `RandomRotation(0.1)` inside the model; the
base is called with `training=False`, then global average pooling, dropout and a
Dense; Adam at a constant learning rate; first the head alone with
`base.trainable = False`, then `base.trainable = True`, compile again at a lower
rate and fit again. Two things are taken from the config instead of the guide's
Xception / cats-vs-dogs values, so that both recipes see the same problem: the
data and its splits (`research/data/sources.py`, so the same test images), the
backbone, its weights and input side, the batch size, the dropout, and each
stage's epochs and learning rate.

Nothing else of the config is read, but `--deterministic`: no schedule, warmup, BatchNorm policy,
augmentation flags, early stopping or checkpoints. In particular the guide's
`training=False` does not keep BatchNorm in inference mode once the base is
trainable, since the outer `training=True` of `fit` overrides it (keras issue
20285): what the guide's user gets, and so what is measured.

The run is short and not resumable: interrupted, it starts again.
"""

from __future__ import annotations

import json
import os
import time

import keras
import tensorflow as tf
from keras import layers

from research import provenance
from research.model import backbones
from research.run import distribute
from research.data import sources
from research.config import ExperimentConfig, UserError

RECIPE = "keras-guide"


def check(config: ExperimentConfig) -> None:
    """The guide trains the head, then the whole base.

    Raises:
      UserError: stages other than `none` (head) and/or `all`, or `ckpt:` weights.
    """
    specs = [s.unfreeze for s in config.stages]
    if specs not in (["none", "all"], ["all"], ["none"]):
        raise UserError(f"the Keras guide's recipe trains the head, then the whole base; these stages unfreeze "
                        f"{specs} (give --head_epochs, --finetune_epochs and --unfreeze=all)")
    if config.model.init_run is not None:
        raise UserError("the Keras guide's recipe starts from pretrained weights (imagenet or a .h5 file), "
                        "not another run's checkpoint")
    if config.model.features != "top":
        raise UserError(f"--features={config.model.features}: the Keras guide's recipe puts the head on the base's "
                        "output; give --features to the recipes that use it (--recipe=NAME:--features=...)")
    if config.data.eval_crop != 1.0:
        raise UserError(f"--eval_crop={config.data.eval_crop}: the Keras guide's recipe evaluates whole images; "
                        "give --eval_crop to the recipes that use it (--recipe=NAME:--eval_crop=...)")


def build(config: ExperimentConfig, num_classes: int) -> tuple[keras.Model, keras.Model]:
    """The guide's model: augmentation, base(training=False), pooling, dropout, Dense."""
    cfg_m = config.model
    size = backbones.input_size(cfg_m.backbone, config.data.image_size)
    base = backbones.build_base(cfg_m.backbone, image_size=size, alpha=cfg_m.alpha)
    if cfg_m.weights not in ("none", ""):
        backbones.load_pretrained(base, cfg_m.backbone, cfg_m.weights, image_size=size, alpha=cfg_m.alpha)
    base.trainable = False
    augmentation = keras.Sequential([layers.RandomFlip("horizontal"), layers.RandomRotation(0.1)],
                                    name="augmentation")
    inputs = keras.Input((size, size, 3))
    x = augmentation(inputs)
    x = base(x, training=False)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(cfg_m.dropout)(x)
    outputs = layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs), base


def run(config: ExperimentConfig, workdir: str, *, log=print) -> dict:
    """Fits the guide's recipe and writes `config.json` and `results.json` in `workdir`,
    in the layout of `launch.train`'s (`final` holds `val/...` and `test/...`).

    Raises:
      UserError: stages the guide does not have, or data / weights problems.
    """
    check(config)
    if os.path.isdir(os.path.join(workdir, "ckpt")):
        raise UserError(f"--workdir={workdir} holds a training run; give the guide's recipe its own --workdir")
    t0, session = time.time(), provenance.provenance()
    distribute.set_determinism(config.train.deterministic)
    keras.utils.set_random_seed(config.train.seed)
    entry = backbones.get(config.model.backbone)
    size = backbones.input_size(config.model.backbone, config.data.image_size)
    source = sources.load_source(config.data, size)
    model, base = build(config, source.num_classes)

    # Preprocessing is a per-channel affine map (or a channel swap), which commutes
    # with the flip and the bilinear, reflect-filled rotation: applying it in the
    # input pipeline, as the guide does its resize, is the guide's Rescaling layer.
    def batches(ds, shuffle: bool):
        ds = ds.cache()
        if shuffle:
            ds = ds.shuffle(source.num_train, seed=config.train.seed, reshuffle_each_iteration=True)
        ds = ds.batch(config.data.batch_size)
        return ds.map(lambda x, y: (entry.preprocess(tf.cast(x, tf.float32)), y)).prefetch(tf.data.AUTOTUNE)

    train_ds, val_ds = batches(source.train, True), batches(source.val, False)
    history, stages, epoch, fit_seconds = [], [], 0, 0.0
    names = {"loss": "train/loss", "accuracy": "train/accuracy", "val_loss": "val/loss", "val_accuracy": "val/accuracy"}
    for stage in config.stages:
        base.trainable = stage.unfreeze == "all"
        model.compile(optimizer=keras.optimizers.Adam(stage.lr),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        log(f"[guide] {stage.name}: base.trainable={base.trainable}, Adam({stage.lr:g}), {stage.epochs} epochs")
        t_fit = time.time()
        h = model.fit(train_ds, epochs=epoch + stage.epochs, initial_epoch=epoch, validation_data=val_ds,
                      verbose=0)
        fit_seconds += time.time() - t_fit
        epoch += stage.epochs
        for i in range(stage.epochs):
            history.append({"stage": stage.name, **{names.get(k, k): float(v[i]) for k, v in h.history.items()}})
        stages.append({"name": stage.name, "unfreeze": stage.unfreeze, "epochs": stage.epochs,
                       "trainable_params": int(sum(v.numpy().size for v in model.trainable_weights))})
    final = {}
    for split, ds in (("val", val_ds), ("test", None if source.test is None else batches(source.test, False))):
        if ds is not None:
            loss, acc = model.evaluate(ds, verbose=0)
            final.update({f"{split}/loss": float(loss), f"{split}/accuracy": float(acc)})
    wall = time.time() - t0
    # images/s over fit's time (validation passes included), as launch.train's counts its steps' time.
    results = {"recipe": RECIPE, "final": final, "best": None, "best_epoch": None, "epochs_run": epoch,
               "early_stopping_fired": False, "stages": stages, "history": history, "wall_time_s": wall,
               "images_per_second": source.num_train * epoch / max(fit_seconds, 1e-9), "num_test": source.num_test,
               "test_from": source.test_from, "provenance": [dict(session, ended=provenance.now())]}
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=2)
    tmp = os.path.join(workdir, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, os.path.join(workdir, "results.json"))  # a trial is finished when results.json exists
    return results
