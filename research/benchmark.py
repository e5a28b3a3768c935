"""Throughput and memory measurements behind `launch/bench.py`.

Every ratio is measured as the median of interleaved repeats (A, B, A, B, ...
after one warm-up of each), because on a shared machine only ratios measured
in the same run mean anything. Each entry records both medians, all samples
and the repeat count.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np
import psutil
import tensorflow as tf

from research import backbones, unfreeze
from research.config import AugmentConfig, DataConfig, TrainConfig
from research.data import Pipeline, load_source
from research.features import FeatureCache
from research.loop import Trainer
from research.optim import build_optimizer


def interleaved(fns: dict, repeats: int) -> dict:
    """Runs each fn once to warm up, then `repeats` rounds A, B, A, B...; fn() -> images/s."""
    for fn in fns.values():
        fn()
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            samples[k].append(float(fn()))
    return {k: {"median": statistics.median(v), "samples": [round(s, 2) for s in v]} for k, v in samples.items()}


def ratio(name_a: str, name_b: str, res: dict, repeats: int, **extra) -> dict:
    a, b = res[name_a], res[name_b]
    return {"ratio": a["median"] / b["median"], name_a: a, name_b: b, "repeats": repeats, **extra}


def _timed_steps(trainer, iterator, steps: int, batch: int, per_call: int | None = None) -> float:
    """Runs `steps` optimizer steps in calls of `per_call` (all at once by default); images/s."""
    per_call = per_call or steps
    t0 = time.perf_counter()
    done = 0
    while done < steps:
        n = min(per_call, steps - done)
        trainer.train(iterator, n)
        done += n
    return steps * batch / (time.perf_counter() - t0)


def _model(backbone: str, size: int, alpha: float, num_classes: int, weights=None):
    keras.utils.set_random_seed(0)
    base = backbones.build_base(backbone, image_size=size, alpha=alpha)
    model = backbones.build_classifier(base, num_classes, dropout=0.0)
    if weights is not None:
        model.set_weights(weights)
    return model


def _select(model, backbone: str, spec: str):
    sel = unfreeze.select(model, backbone, spec)
    unfreeze.apply_policy(model, backbone, sel)
    return sel


def _synthetic(backbone: str, size: int, batch: int, num_classes: int = 10):
    rng = np.random.RandomState(0)
    x = backbones.get(backbone).preprocess(rng.uniform(0, 255, (batch * 4, size, size, 3)).astype("float32"))
    y = rng.randint(0, num_classes, batch * 4).astype("int32")
    return tf.data.Dataset.from_tensor_slices((np.asarray(x), y)).cache().repeat().batch(batch, drop_remainder=True)


def loop_vs_fit(backbone: str, size: int, alpha: float, spec: str, *, batch: int, steps: int,
                steps_per_loop: int, repeats: int) -> tuple[dict, dict]:
    """This loop vs `model.fit` (Keras defaults; then steps_per_execution matched), same
    model, initial weights, data, batch size, and trainable variables."""
    ours = _model(backbone, size, alpha, 10)
    sel = _select(ours, backbone, spec)
    opt = build_optimizer(TrainConfig(optimizer="adam"), 1e-4)
    opt.build(sel.variables)
    trainer = Trainer(ours, opt, strategy=tf.distribute.get_strategy())
    trainer.set_trainable(sel.variables)
    ds = _synthetic(backbone, size, batch)
    it = iter(ds)

    def run_ours():
        return _timed_steps(trainer, it, steps, batch, steps_per_loop)

    fits = {}
    for name, spe in (("fit", 1), ("fit_matched", steps_per_loop)):
        m = _model(backbone, size, alpha, 10, ours.get_weights())
        _select(m, backbone, spec)
        m.compile(optimizer=build_optimizer(TrainConfig(optimizer="adam"), 1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
                  jit_compile="auto", steps_per_execution=spe)

        def run_fit(m=m):
            t0 = time.perf_counter()
            m.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
            return steps * batch / (time.perf_counter() - t0)
        fits[name] = (m, run_fit)
    res = interleaved({"loop": run_ours, "fit": fits["fit"][1], "fit_matched": fits["fit_matched"][1]}, repeats)
    info = {"backbone": backbone, "image_size": size, "alpha": alpha, "unfreeze": spec, "batch_size": batch,
            "steps": steps, "steps_per_loop": steps_per_loop, "fit_jit_compile": bool(fits["fit"][0].jit_compile),
            "loop_traces": trainer.tracing_count()}
    return (ratio("loop", "fit", res, repeats, **info),
            ratio("loop", "fit_matched", {"loop": res["loop"], "fit_matched": res["fit_matched"]}, repeats, **info))


def _jpeg_folder(root: str, n_per_class: int = 60) -> str:
    """Digits written as 160 px JPEG files: stand-in photos when the real ones are absent."""
    from PIL import Image
    from sklearn.datasets import load_digits
    d = load_digits()
    for c in range(3):
        os.makedirs(os.path.join(root, str(c)), exist_ok=True)
        for j, i in enumerate(np.flatnonzero(d.target == c)[:n_per_class]):
            img = (d.images[i] * 255 / 16).astype("uint8")
            Image.fromarray(img).convert("RGB").resize((160, 160)).save(os.path.join(root, str(c), f"{j}.jpg"))
    return root


def pipeline_vs_ceiling(folder: str, *, size: int, batch: int, repeats: int, epochs: int = 3) -> dict:
    """Epochs through the real pipeline (JPEG decode, resize, augment) vs the same
    compiled step fed one in-memory batch repeatedly.

    Each sample is `epochs` consecutive epochs from one fresh iterator, as
    training pulls them (`Pipeline.train_stream`), so the pipeline's start-up is
    paid once per sample, as it is once per run.
    """
    cfg = DataConfig(dataset=f"folder:{folder}", image_size=size, batch_size=batch)
    source = load_source(cfg, size)
    augment = AugmentConfig(horizontal_flip=True, rotation=10, zoom=0.1)
    preprocess = backbones.get("mobilenet").preprocess
    pipes = {"cached": Pipeline(source, batch_size=batch, preprocess=preprocess, augment=augment, cache=True),
             "uncached": Pipeline(source, batch_size=batch, preprocess=preprocess, augment=augment, cache=False),
             "no_augment": Pipeline(source, batch_size=batch, preprocess=preprocess, augment=AugmentConfig(),
                                    cache=True)}
    model = _model("mobilenet", size, 0.25, source.num_classes)
    sel = _select(model, "mobilenet", "all")
    opt = build_optimizer(TrainConfig(), 1e-4)
    opt.build(sel.variables)
    trainer = Trainer(model, opt, strategy=tf.distribute.get_strategy())
    trainer.set_trainable(sel.variables)
    steps = pipes["cached"].steps_per_epoch
    one_batch = next(iter(pipes["cached"].train_dataset(0)))
    ceiling_ds = tf.data.Dataset.from_tensors(one_batch).repeat()
    first = [0]

    def stream(name, n):
        first[0] += n
        return pipes[name].train_stream(first[0], n)

    def run_pipeline(name, n=epochs):
        return lambda: _timed_steps(trainer, iter(stream(name, n)), n * steps, batch)

    def run_pipeline_only():
        # The augmented pipeline without training: its own throughput on these cores.
        t0 = time.perf_counter()
        n = sum(int(x.shape[0]) for x, _ in stream("cached", epochs))
        return n / (time.perf_counter() - t0)

    def run_ceiling():
        return _timed_steps(trainer, iter(ceiling_ds), epochs * steps, batch)

    res = interleaved({"pipeline": run_pipeline("cached"), "ceiling": run_ceiling,
                       "pipeline_first_epoch": run_pipeline("uncached", 1),
                       "pipeline_no_augment": run_pipeline("no_augment"), "pipeline_only": run_pipeline_only},
                      repeats)
    out = ratio("pipeline", "ceiling", res, repeats, data=folder, images=source.num_train, image_size=size,
                batch_size=batch, epochs_per_sample=epochs, model="mobilenet alpha 0.25, all blocks",
                augment="flip, rotation 10, zoom 0.1", loop_traces=trainer.tracing_count())
    # Where a gap comes from: the first epoch (JPEG decode, cache empty) and augmentation.
    out["first_epoch"] = ratio("pipeline_first_epoch", "ceiling", res, repeats)
    out["no_augment"] = ratio("pipeline_no_augment", "ceiling", res, repeats)
    out["pipeline_only"] = res["pipeline_only"]
    return out


def feature_cache_speedup(*, size: int, batch: int, repeats: int) -> dict:
    """Head-only epoch through the frozen base vs on cached features (digits, MobileNet-0.25)."""
    source = load_source(DataConfig(dataset="digits", image_size=size, batch_size=batch), size)
    pipe = Pipeline(source, batch_size=batch, preprocess=backbones.get("mobilenet").preprocess, augment=AugmentConfig())
    model = _model("mobilenet", size, 0.25, 10)
    sel = _select(model, "mobilenet", "none")
    opt = build_optimizer(TrainConfig(), 1e-3)
    opt.build(sel.variables)
    full = Trainer(model, opt, strategy=tf.distribute.get_strategy())
    full.set_trainable(sel.variables)
    cache = FeatureCache(model, pipe)
    head = Trainer(cache.head, opt, strategy=tf.distribute.get_strategy())
    head.set_trainable(sel.variables)
    steps = pipe.steps_per_epoch

    def run(trainer, make):
        return lambda: _timed_steps(trainer, iter(make(0)), steps, batch)

    res = interleaved({"cached": run(head, cache.train_dataset), "base_every_epoch": run(full, pipe.train_dataset)},
                      repeats)
    return ratio("cached", "base_every_epoch", res, repeats, image_size=size, batch_size=batch,
                 extraction_seconds=round(cache.seconds, 2), images=source.num_train)


def steps_per_loop_speedup(*, default: int, batch: int, repeats: int, epochs: int = 2) -> dict:
    """small_cnn at 32 px on digits through the real pipeline: steps_per_loop=default vs 1
    (each sample `epochs` epochs from one iterator, as training pulls them)."""
    source = load_source(DataConfig(dataset="digits", image_size=32, batch_size=batch), 32)
    pipe = Pipeline(source, batch_size=batch, preprocess=backbones.get("small_cnn").preprocess, augment=AugmentConfig())
    model = _model("small_cnn", 32, 1.0, 10)
    sel = _select(model, "small_cnn", "all")
    opt = build_optimizer(TrainConfig(), 1e-3)
    opt.build(sel.variables)
    trainer = Trainer(model, opt, strategy=tf.distribute.get_strategy())
    trainer.set_trainable(sel.variables)
    steps = pipe.steps_per_epoch

    def run(spl):
        return lambda: _timed_steps(trainer, iter(pipe.train_stream(0, epochs)), epochs * steps, batch, spl)

    res = interleaved({f"steps_per_loop_{default}": run(default), "steps_per_loop_1": run(1)}, repeats)
    return ratio(f"steps_per_loop_{default}", "steps_per_loop_1", res, repeats, batch_size=batch,
                 epochs_per_sample=epochs, loop_traces=trainer.tracing_count())


def memory(*, epochs: int, extra_flags: list[str]) -> dict:
    """Peak RSS of a `launch.train` run and its growth between the end of epoch 2 and the last epoch."""
    wd = tempfile.mkdtemp(prefix="bench_mem_")
    cmd = [sys.executable, "-m", "launch.train", f"--workdir={wd}", f"--finetune_epochs={epochs}", "--noexport",
           *extra_flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2"))
    ps = psutil.Process(proc.pid)
    at_epoch_end, peak = {}, 0
    for line in proc.stdout:
        try:
            rss = ps.memory_info().rss
        except psutil.NoSuchProcess:
            break
        peak = max(peak, rss)
        m = re.search(r"val_loss [\d.]+ +val_accuracy", line)
        if m:
            at_epoch_end[len(at_epoch_end) + 1] = rss
    proc.wait()
    if 2 not in at_epoch_end or epochs not in at_epoch_end:
        return {"error": f"run exited with {proc.returncode} before epoch {epochs}"}
    growth = (at_epoch_end[epochs] - at_epoch_end[2]) / at_epoch_end[2]
    return {"peak_rss_mb": round(peak / 2**20, 1), "rss_mb_by_epoch": {k: round(v / 2**20, 1) for k, v in at_epoch_end.items()},
            "growth_epoch2_to_last": growth, "epochs": epochs, "command": " ".join(cmd[1:])}
