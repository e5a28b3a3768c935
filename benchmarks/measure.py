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

from research.model import backbones, unfreeze
from research.config import AugmentConfig, DataConfig, TrainConfig
from research.data.pipeline import Pipeline, pipeline_threads
from research.data.sources import load_source
from research.run.features import FeatureCache
from research.run.loop import Trainer
from research.model.optim import build_optimizer


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


def _trainer(backbone: str, size: int, alpha: float, num_classes: int, spec: str, lr: float) -> Trainer:
    """A fresh model (seed 0) with `spec` trainable, Adam at `lr`, and its Trainer."""
    model = _model(backbone, size, alpha, num_classes)
    sel = _select(model, backbone, spec)
    opt = build_optimizer(TrainConfig(optimizer="adam"), lr)
    opt.build(sel.variables)
    trainer = Trainer(model, opt, strategy=tf.distribute.get_strategy())
    trainer.set_trainable(sel.variables)
    return trainer


def _synthetic(backbone: str, size: int, batch: int, num_classes: int = 10):
    rng = np.random.RandomState(0)
    x = backbones.get(backbone).preprocess(rng.uniform(0, 255, (batch * 4, size, size, 3)).astype("float32"))
    y = rng.randint(0, num_classes, batch * 4).astype("int32")
    return tf.data.Dataset.from_tensor_slices((np.asarray(x), y)).cache().repeat().batch(batch, drop_remainder=True)


def loop_vs_fit(backbone: str, size: int, alpha: float, spec: str, *, batch: int, steps: int,
                steps_per_loop: int, repeats: int) -> tuple[dict, dict]:
    """This loop vs `model.fit` (Keras defaults; then steps_per_execution matched), same
    model, initial weights, data, batch size, and trainable variables."""
    trainer = _trainer(backbone, size, alpha, 10, spec, 1e-4)
    ours = trainer.model
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


class _KerasLayersPipeline(Pipeline):
    """The pipeline as it was before the fused warp: Keras's RandomFlip, RandomRotation
    and RandomZoom chained (one resampling each), for the before/after in the bench."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg, layers = self.augment_cfg, keras.layers
        chain = keras.Sequential([layers.RandomFlip("horizontal", seed=1),
                                  layers.RandomRotation(cfg.rotation / 360.0, fill_mode="nearest", seed=2),
                                  layers.RandomZoom(cfg.zoom, fill_mode="nearest", seed=3)])
        self._augment = lambda x, seed: chain(x, training=True)


def pipeline_vs_ceiling(folder: str, *, size: int, batch: int, repeats: int, epochs: int = 3) -> dict:
    """Epochs through the real pipeline (JPEG decode, resize, augment) vs the same
    compiled step fed one in-memory batch repeatedly.

    Each sample is `epochs` consecutive epochs from one fresh iterator, as
    training pulls them (`Pipeline.train_stream`), so the pipeline's start-up is
    paid once per sample, as it is once per run. The variants after the ratio
    undo one optimisation each, measured in the same interleaved rounds.
    """
    cfg = DataConfig(dataset=f"folder:{folder}", image_size=size, batch_size=batch)
    source = load_source(cfg, size)
    augment = AugmentConfig(horizontal_flip=True, rotation=10, zoom=0.1)
    threads = pipeline_threads(0, cached=True)

    def pipeline(cls=Pipeline, **kw):
        kw = {"augment": augment, "cache": "memory", "threads": threads, **kw}
        return cls(source, batch_size=batch, preprocess=backbones.get("mobilenet").preprocess, **kw)

    pipes = {"pipeline": pipeline(), "pipeline_first_epoch": pipeline(cache="none", threads=None),
             "pipeline_no_augment": pipeline(augment=AugmentConfig()),
             "pipeline_all_threads": pipeline(threads=None),
             "pipeline_keras_layers": pipeline(_KerasLayersPipeline)}
    trainer = _trainer("mobilenet", size, 0.25, source.num_classes, "all", 1e-4)
    for p in pipes.values():
        p.prepare()  # as training does before its first epoch (no-op without a cache)
    steps = pipes["pipeline"].steps_per_epoch
    one_batch = next(iter(pipes["pipeline"].train_dataset(0)))
    ceiling_ds = tf.data.Dataset.from_tensors(one_batch).repeat()
    first = [0]

    def next_epochs(n):
        first[0] += n
        return range(first[0] - n, first[0])

    def run_stream(name, n=epochs):
        return lambda: _timed_steps(trainer, iter(pipes[name].train_stream(next_epochs(n)[0], n)), n * steps, batch)

    def run_iterator_per_epoch():
        # Before the stream: a new dataset and iterator every epoch.
        t0 = time.perf_counter()
        for e in next_epochs(epochs):
            trainer.train(iter(pipes["pipeline"].train_dataset(e)), steps)
        return epochs * steps * batch / (time.perf_counter() - t0)

    def run_pipeline_only(name):
        # A pipeline without training: its own throughput on these cores.
        def fn():
            t0 = time.perf_counter()
            n = sum(int(x.shape[0]) for x, _ in pipes[name].train_stream(next_epochs(epochs)[0], epochs))
            return n / (time.perf_counter() - t0)
        return fn

    def run_ceiling():
        return _timed_steps(trainer, iter(ceiling_ds), epochs * steps, batch)

    fns = {"pipeline": run_stream("pipeline"), "ceiling": run_ceiling,
           "pipeline_first_epoch": run_stream("pipeline_first_epoch", 1),
           "pipeline_no_augment": run_stream("pipeline_no_augment"),
           "pipeline_iterator_per_epoch": run_iterator_per_epoch,
           "pipeline_all_threads": run_stream("pipeline_all_threads"),
           "pipeline_keras_layers": run_stream("pipeline_keras_layers"),
           "pipeline_only": run_pipeline_only("pipeline"),
           "pipeline_only_keras_layers": run_pipeline_only("pipeline_keras_layers")}
    res = interleaved(fns, repeats)
    out = ratio("pipeline", "ceiling", res, repeats, data=folder, images=source.num_train, image_size=size,
                batch_size=batch, epochs_per_sample=epochs, data_threads=threads,
                model="mobilenet alpha 0.25, all blocks", augment="flip, rotation 10, zoom 0.1",
                loop_traces=trainer.tracing_count())
    # Where a gap comes from: the first epoch (JPEG decode, cache empty) and augmentation;
    # and what each optimisation contributed, each undone alone.
    out["first_epoch"] = ratio("pipeline_first_epoch", "ceiling", res, repeats)
    out["no_augment"] = ratio("pipeline_no_augment", "ceiling", res, repeats)
    out["without_stream"] = ratio("pipeline_iterator_per_epoch", "ceiling", res, repeats)
    out["without_thread_cap"] = ratio("pipeline_all_threads", "ceiling", res, repeats)
    out["without_fused_warp"] = ratio("pipeline_keras_layers", "ceiling", res, repeats)
    out["pipeline_only"] = res["pipeline_only"]
    out["pipeline_only_keras_layers"] = res["pipeline_only_keras_layers"]
    return out


def feature_cache_speedup(*, size: int, batch: int, repeats: int) -> dict:
    """Head-only epoch through the frozen base vs on cached features (digits, MobileNet-0.25)."""
    source = load_source(DataConfig(dataset="digits", image_size=size, batch_size=batch), size)
    pipe = Pipeline(source, batch_size=batch, preprocess=backbones.get("mobilenet").preprocess, augment=AugmentConfig())
    full = _trainer("mobilenet", size, 0.25, 10, "none", 1e-3)
    cache = FeatureCache(full.model, pipe)
    head = Trainer(cache.head, full.optimizer, strategy=tf.distribute.get_strategy())
    head.set_trainable(full.variables)
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
    trainer = _trainer("small_cnn", 32, 1.0, 10, "all", 1e-3)
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
        m = re.search(r"val/loss [\d.]+ +val/accuracy", line)
        if m:
            at_epoch_end[len(at_epoch_end) + 1] = rss
    proc.wait()
    if 2 not in at_epoch_end or epochs not in at_epoch_end:
        return {"error": f"run exited with {proc.returncode} before epoch {epochs}"}
    growth = (at_epoch_end[epochs] - at_epoch_end[2]) / at_epoch_end[2]
    return {"peak_rss_mb": round(peak / 2**20, 1), "rss_mb_by_epoch": {k: round(v / 2**20, 1) for k, v in at_epoch_end.items()},
            "growth_epoch2_to_last": growth, "epochs": epochs, "command": " ".join(cmd[1:])}


def _op_table(trace_dir: str, top: int) -> dict:
    """Self time per op type and the top ops of one trace (needs xprof, installed with
    tensorboard-plugin-profile: `pip install -e '.[profile]'`)."""
    import glob
    import json
    try:
        from xprof.convert import raw_to_tool_data
    except ImportError:
        return {"error": "install tensorboard-plugin-profile (pip install -e '.[profile]') for the op table"}
    paths = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.xplane.pb"))
    data, _ = raw_to_tool_data.xspace_to_tool_data(paths, "framework_op_stats", {})
    table = json.loads(data)[0]
    cols = {c["label"]: i for i, c in enumerate(table["cols"])}
    rows = [[c.get("v") if isinstance(c, dict) else c for c in r["c"]] for r in table["rows"]]
    rows = [r for r in rows if r[cols["Operation Type"]] != "IDLE"]
    self_ms = lambda r: float(r[cols["Total self-time (us)"]]) / 1e3  # noqa: E731
    total = sum(self_ms(r) for r in rows)
    by_type: dict[str, float] = {}
    for r in rows:
        by_type[r[cols["Operation Type"]]] = by_type.get(r[cols["Operation Type"]], 0.0) + self_ms(r)
    rows.sort(key=self_ms, reverse=True)
    return {"total_self_ms": round(total, 1),
            "by_type": [{"type": t, "self_ms": round(ms, 1), "share": round(ms / total, 3)}
                        for t, ms in sorted(by_type.items(), key=lambda kv: -kv[1])[:top]],
            "top_ops": [{"type": r[cols["Operation Type"]], "name": r[cols["Operation Name"]],
                         "occurrences": int(r[cols["#Occurrences"]]), "self_ms": round(self_ms(r), 1)}
                        for r in rows[:top]]}


def profile(logdir: str, folder: str, *, size: int, batch: int, steps: int, steps_per_loop: int,
            top: int = 15) -> dict:
    """tf.profiler traces of the two setups whose goals are missed, for TensorBoard's
    Profile tab (`tensorboard --logdir LOGDIR`), with their op tables.

    Runs: `steps_per_loop_N` and `steps_per_loop_1` (small_cnn, 32 px, in-memory
    batches, `steps` steps each) and `pipeline` (one epoch of the augmented JPEG
    pipeline feeding MobileNet-0.25, as in `pipeline_vs_ceiling`).
    """
    out = {}
    trainer = _trainer("small_cnn", 32, 1.0, 10, "all", 1e-3)
    it = iter(_synthetic("small_cnn", 32, 32))
    for spl in (steps_per_loop, 1):
        _timed_steps(trainer, it, steps, 32, spl)  # warm up outside the trace
        run = os.path.join(logdir, f"steps_per_loop_{spl}")
        tf.profiler.experimental.start(run)
        ips = _timed_steps(trainer, it, steps, 32, spl)
        tf.profiler.experimental.stop()
        out[f"steps_per_loop_{spl}"] = {"images_per_second": round(ips, 1), **_op_table(run, top)}

    source = load_source(DataConfig(dataset=f"folder:{folder}", image_size=size, batch_size=batch), size)
    pipe = Pipeline(source, batch_size=batch, preprocess=backbones.get("mobilenet").preprocess,
                    augment=AugmentConfig(horizontal_flip=True, rotation=10, zoom=0.1),
                    threads=pipeline_threads(0, cached=True))
    pipe.prepare()
    trainer = _trainer("mobilenet", size, 0.25, source.num_classes, "all", 1e-4)
    _timed_steps(trainer, iter(pipe.train_stream(0, 1)), pipe.steps_per_epoch, batch)
    run = os.path.join(logdir, "pipeline")
    tf.profiler.experimental.start(run)
    ips = _timed_steps(trainer, iter(pipe.train_stream(1, 1)), pipe.steps_per_epoch, batch)
    tf.profiler.experimental.stop()
    out["pipeline"] = {"images_per_second": round(ips, 1), **_op_table(run, top)}
    return out


def startup(*, repeats: int, workdir: str | None = None) -> dict:
    """Seconds from the command to its first result, for `launch.train` (a one-epoch run of
    the digits at 16 px: start-up, then a few steps), `launch.evaluate`, `launch.export` and
    `launch.predict` (one photo), each as a ratio to `import tensorflow` alone: what a tool
    adds to TensorFlow's own start-up. Interleaved repeats, medians.
    """
    from PIL import Image

    wd = workdir or tempfile.mkdtemp(prefix="bench_startup_")
    run, photo = os.path.join(wd, "run"), os.path.join(wd, "photo.png")
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (32, 32, 3), np.uint8)).save(photo)
    train = ["-m", "launch.train", "--image_size=16", "--classes=0-4", "--epochs=1"]
    subprocess.run([sys.executable, *train, f"--workdir={run}"], check=True, capture_output=True)
    count = iter(range(10**6))
    commands = {
        "import_tensorflow": lambda: ["-c", "import tensorflow"],
        "train_first_epoch": lambda: [*train, "--noexport", f"--workdir={os.path.join(wd, f'train{next(count)}')}"],
        "evaluate": lambda: ["-m", "launch.evaluate", f"--workdir={run}", "--split=val", "--name=bench"],
        "export": lambda: ["-m", "launch.export", f"--workdir={run}", f"--out={os.path.join(wd, f'x{next(count)}')}"],
        "predict": lambda: ["-m", "launch.predict", f"--model={os.path.join(run, 'export')}", photo],
    }
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")

    def timed(make):
        def run_once():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, *make()], check=True, capture_output=True, env=env)
            return time.perf_counter() - t0
        return run_once

    res = interleaved({k: timed(v) for k, v in commands.items()}, repeats)
    base = res["import_tensorflow"]["median"]
    out = {"repeats": repeats, "import_tensorflow": res.pop("import_tensorflow")}
    for k, m in res.items():
        out[k] = {"ratio": m["median"] / base, "seconds": m}
    return out
