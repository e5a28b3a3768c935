"""`launch/bench.py --scale`: start-up, memory and throughput as a dataset grows.

For each size N, a generated folder of N small JPEGs (`benchmarks/jpeg_folder.py`)
and its TFRecord shards (`launch.convert`); for each input mode, one `launch.train`
run in a fresh workdir, killed (SIGKILL) once its second epoch is checkpointed and
then resumed to its third:

  * seconds to the first training step, of the first launch and of the resume
    (`first training steps done` in the log: imports, the image check, the cache,
    the model, the restore and the shuffle buffer's first fill);
  * peak RSS of each launch (polled every 0.1 s);
  * steady-state images/s of each launch's second epoch (informative: one sample);
    the goal's ratios come from `throughput`, which feeds one model from every mode's
    running pipeline in interleaved samples, in one process.

Modes: `memory`, `disk`, `none` on the folder, `tfrecord` (shards of the JPEG files,
decoded every epoch: `--cache=none`) and `tfrecord_raw` (shards of 64 px pixels,
`launch.convert --encoding=raw`, streamed with `--cache=none`). With `baseline` (a checkout of an earlier version of
this code), its `memory` run is measured too: there, every launch checked and
decoded the whole folder. The runs of one N go one after the other, never two at
once.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["--backbone=mobilenet", "--alpha=0.25", "--weights=none", "--image_size=64", "--batch_size=64",
         "--finetune_epochs=3", "--noexport", "--verbosity=0"]
_STEP = re.compile(r"^(\d+)/\1 - \d+s - (\d+)ms/step")
_FIRST = re.compile(r"first training steps done ([\d.]+)s")
MODES = ("memory", "disk", "none", "tfrecord", "tfrecord_raw")
_EPOCH = re.compile(r"^stage \S+ epoch \d+/")


def data(root: str, n: int) -> tuple[str, dict[str, str], dict[str, float]]:
    """The folder of `n` JPEGs and its shards under `root` (`tfrecord`: the JPEG files'
    bytes; `tfrecord_raw`: 64 px pixels), written once and kept; conversion seconds."""
    folder = os.path.join(root, f"jpegs-{n}")
    if not os.path.exists(os.path.join(folder, ".complete")):
        shutil.rmtree(folder, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "benchmarks.jpeg_folder", f"--out={folder}", f"--n={n}"], cwd=ROOT,
                       check=True)
        open(os.path.join(folder, ".complete"), "w").close()
    shards, seconds = {}, {}
    for kind, extra in (("tfrecord", []), ("tfrecord_raw", ["--image_size=64", "--encoding=raw"])):
        shards[kind] = os.path.join(root, f"shards-{n}" + ("-raw" if extra else ""))
        if not os.path.exists(os.path.join(shards[kind], "manifest.json")):
            shutil.rmtree(shards[kind], ignore_errors=True)
            t0 = time.time()
            subprocess.run([sys.executable, "-m", "launch.convert", f"--dataset=folder:{folder}",
                            f"--out={shards[kind]}", *extra], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            seconds[kind] = round(time.time() - t0, 1)
    return folder, shards, seconds


def _launch(cmd: list[str], cwd: str, *, kill_after_checkpoint: str | None = None) -> dict:
    """Runs one launch; returns its first-step time, epoch-line time, peak RSS and step times."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2"))
    ps, peak, done = psutil.Process(proc.pid), [0], threading.Event()

    def poll():
        while not done.is_set():
            try:
                peak[0] = max(peak[0], ps.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            if kill_after_checkpoint and os.path.exists(kill_after_checkpoint) and \
                    'ckpt-2"' in open(kill_after_checkpoint).read():
                proc.send_signal(signal.SIGKILL)
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    out = {"first_step_s": None, "epoch_line_s": None, "ms_per_step": []}
    tail = []
    for line in proc.stdout:
        tail = (tail + [line])[-30:]
        if out["epoch_line_s"] is None and _EPOCH.search(line):
            out["epoch_line_s"] = round(time.time() - t0, 2)
        m = _FIRST.search(line)
        if m and out["first_step_s"] is None:
            out["first_step_s"] = float(m.group(1))
        m = _STEP.search(line)
        if m:
            out["ms_per_step"].append(int(m.group(2)))
    proc.wait()
    done.set()
    watcher.join()
    out.update(returncode=proc.returncode, peak_rss_mb=round(peak[0] / 2**20, 1), seconds=round(time.time() - t0, 1))
    if proc.returncode not in (0, -signal.SIGKILL):
        out["log_tail"] = "".join(tail)
    return out


def run_mode(mode: str, folder: str, shards: dict[str, str], *, code: str = ROOT) -> dict:
    """One run in `mode`, killed after its second epoch's checkpoint, then resumed."""
    wd = tempfile.mkdtemp(prefix=f"scale_{mode}_")
    try:
        if mode in shards:
            args = [f"--dataset=tfrecord:{shards[mode]}", "--cache=none"]
        elif mode == "baseline":
            args = [f"--dataset=folder:{folder}"]  # the earlier code's default: check all, cache in memory
        else:
            args = [f"--dataset=folder:{folder}", f"--cache={mode}"]
        cmd = [sys.executable, "-m", "launch.train", f"--workdir={wd}", *MODEL, *args]
        first = _launch(cmd, code, kill_after_checkpoint=os.path.join(wd, "ckpt", "checkpoint"))
        resume = _launch(cmd, code)
        steps = first["ms_per_step"]
        batch = 64
        return {"first_run": first, "resume": resume,
                "steady_images_per_second": round(batch * 1000 / steps[1], 1) if len(steps) > 1 else None,
                "command": " ".join(["python", *cmd[1:]]).replace(wd, "WORKDIR")}
    finally:
        shutil.rmtree(wd, ignore_errors=True)


def throughput(folder: str, shards: dict[str, str], *, size: int = 64, batch: int = 64, steps: int = 100,
               repeats: int = 5) -> dict:
    """Steady-state training images/s of each input mode, in one process: the same
    model and step, fed by the memory, disk, none and tfrecord pipelines in
    interleaved samples of `steps` steps from iterators already running."""
    import tensorflow as tf

    from benchmarks.measure import _trainer, interleaved
    from research.model import backbones
    from research.data import pipeline as data_lib, sources
    from research.config import AugmentConfig, DataConfig

    cache_dir = tempfile.mkdtemp(prefix="scale_cache_")
    try:
        pipes = {}
        for mode in MODES:
            dataset = f"tfrecord:{shards[mode]}" if mode in shards else f"folder:{folder}"
            source = sources.load_source(DataConfig(dataset=dataset, batch_size=batch), size, cache_dir=cache_dir)
            cache = "none" if mode in shards else mode
            pipes[mode] = data_lib.Pipeline(source, batch_size=batch, preprocess=backbones.get("mobilenet").preprocess,
                                            augment=AugmentConfig(), cache=cache, cache_dir=cache_dir,
                                            threads=data_lib.pipeline_threads(
                                                0, cached=cache != "none" or source.decoded))
            pipes[mode].prepare()
        # Decoding every epoch on one thread instead of every core: does the step gain more than
        # the decode loses? (`--data_threads=1`)
        pipes["tfrecord_1_thread"] = data_lib.Pipeline(
            pipes["tfrecord"].source, batch_size=batch, preprocess=backbones.get("mobilenet").preprocess,
            augment=AugmentConfig(), cache="none", threads=1)
        trainer = _trainer("mobilenet", size, 0.25, pipes["memory"].source.num_classes, "all", 1e-4)
        epochs = 2 + (repeats + 1) * steps // pipes["memory"].steps_per_epoch
        iters = {m: iter(p.train_stream(0, epochs)) for m, p in pipes.items()}

        def run(mode):
            def fn():
                t0 = time.perf_counter()
                trainer.train(iters[mode], steps)
                return steps * batch / (time.perf_counter() - t0)
            return fn

        res = interleaved({m: run(m) for m in pipes}, repeats)
        res["ratios_vs_memory"] = {m: round(res[m]["median"] / res["memory"]["median"], 3)
                                   for m in pipes if m != "memory"}
        res["setting"] = (f"mobilenet alpha 0.25, all blocks, {size} px, batch {batch}, no augmentation; samples of "
                          f"{steps} steps, {repeats} interleaved repeats after one warm-up, tf {tf.__version__}")
        return res
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def scale(sizes: list[int], root: str, *, modes=MODES, baseline: str = "", repeats: int = 5,
          phases=("throughput", "runs")) -> dict:
    out = {}
    for n in sizes:
        folder, shards, seconds = data(root, n)
        out[str(n)] = {"convert_seconds": seconds}
        if "throughput" in phases:
            print(f"[bench --scale] N={n} throughput, interleaved", flush=True)
            out[str(n)]["throughput"] = throughput(folder, shards, repeats=repeats)
            print("  " + ", ".join(f"{m} {r['median']:.0f} img/s" for m, r in out[str(n)]["throughput"].items()
                                   if isinstance(r, dict) and "median" in r), flush=True)
        for mode in (modes + (("baseline",) if baseline else ())) if "runs" in phases else ():
            print(f"[bench --scale] N={n} {mode}", flush=True)
            out[str(n)][mode] = run_mode(mode, folder, shards, code=baseline if mode == "baseline" else ROOT)
            r = out[str(n)][mode]
            print(f"  first step {r['first_run']['first_step_s']}s (epoch line {r['first_run']['epoch_line_s']}s), "
                  f"resume {r['resume']['first_step_s']}s (epoch line {r['resume']['epoch_line_s']}s), peak RSS "
                  f"{r['first_run']['peak_rss_mb']}/{r['resume']['peak_rss_mb']} MB, "
                  f"{r['steady_images_per_second']} img/s", flush=True)
    return out


def goals(res: dict, small: str, large: str) -> dict:
    """The ratios the goals in docs/BENCHMARKS.md are stated in, from a `scale` result
    with a small and a large N."""
    g = {}
    if "throughput" in res[large]:
        for n in (small, large):
            for mode, r in res[n]["throughput"]["ratios_vs_memory"].items():
                g[f"throughput_{mode}_vs_memory_{n}"] = r
    if "memory" not in res[large]:
        return g
    def peak(r):
        return max(r["first_run"]["peak_rss_mb"], r["resume"]["peak_rss_mb"])

    for mode in MODES[1:]:
        g[f"rss_{mode}_{large}_vs_{small}"] = round(peak(res[large][mode]) / peak(res[small][mode]), 3)
    baseline = res[large].get("baseline")
    for mode in MODES:
        if baseline and res[large][mode]["resume"]["first_step_s"]:
            # Like for like: the time to the resumed epoch's first line. The earlier code logs no
            # first step, which comes later than that line: the first-step ratio is an upper bound.
            g[f"resume_epoch_line_{mode}_vs_today"] = round(
                res[large][mode]["resume"]["epoch_line_s"] / baseline["resume"]["epoch_line_s"], 3)
            g[f"resume_first_step_{mode}_vs_today_epoch_line"] = round(
                res[large][mode]["resume"]["first_step_s"] / baseline["resume"]["epoch_line_s"], 3)
    return g
