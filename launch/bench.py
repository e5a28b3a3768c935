"""Benchmark: `python -m launch.bench --out=bench.json [--quick]`.

Ratios (medians of interleaved repeats, with both medians and every sample):
loop_vs_fit, loop_vs_fit_matched, pipeline_vs_ceiling, feature_cache_speedup,
steps_per_loop_speedup, startup (each tool's time to its first result over `import
tensorflow`'s), and memory. See docs/BENCHMARKS.md for results.
With --profile_dir: tf.profiler traces and op tables instead (see `benchmarks.measure.profile`).
With --scale: start-up, memory and throughput as the dataset grows (see `benchmarks/scale.py`).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time

from absl import app, flags

from launch import common

F = flags.FLAGS
flags.DEFINE_string("out", "bench.json", "Where to write the JSON.")
flags.DEFINE_bool("quick", False, "Fewer repeats and steps (under 5 minutes on 2 cores).")
flags.DEFINE_integer("repeats", 0, "Interleaved repeats per ratio (0: 3 quick, 7 full).")
flags.DEFINE_string("images", "", "A folder of JPEGs per class for pipeline_vs_ceiling "
                    "(default: ../shared/data/hymenoptera/train if present, else generated JPEGs).")
flags.DEFINE_integer("steps_per_loop", 20, "The loop's steps per call (the train default).")
flags.DEFINE_bool("tiny", False, "Tiny settings for tests: checks every key is written, measures nothing useful.")
flags.DEFINE_bool("scale", False, "Instead: start-up, peak RSS and throughput of the memory, disk, none and "
                  "tfrecord inputs on generated JPEG folders of --scale_sizes images (benchmarks/scale.py).")
flags.DEFINE_list("scale_sizes", ["10000", "100000"], "--scale: dataset sizes (the first is the small one).")
flags.DEFINE_string("scale_dir", os.path.join(tempfile.gettempdir(), "research-scale"),
                    "--scale: where the generated folders and shards are written once and kept.")
flags.DEFINE_list("scale_phases", ["throughput", "runs"], "--scale: the interleaved in-process throughput, the "
                  "launch.train runs (start-up, resume, peak RSS), or both.")
flags.DEFINE_string("scale_baseline", "", "--scale: a checkout of an earlier version of this code, whose memory "
                    "run at each size is measured too (e.g. git worktree add /tmp/before 4edb029).")
flags.DEFINE_string("profile_dir", "", "Instead of measuring: write tf.profiler traces of the small_cnn step "
                    "(steps_per_loop N and 1) and of the augmented pipeline feeding MobileNet to this logdir, "
                    "with their op tables in profile.json (view: tensorboard --logdir DIR, Profile tab).")


def main(argv):
    del argv
    import tensorflow as tf
    from benchmarks import measure as B

    if F.scale:
        from benchmarks import scale as S
        sizes = [int(n) for n in F.scale_sizes]
        t0 = time.time()
        res = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "tensorflow": tf.__version__},
               "sizes": sizes, "runs": S.scale(sizes, F.scale_dir, baseline=F.scale_baseline, phases=F.scale_phases)}
        if len(sizes) > 1:
            res["goals"] = S.goals(res["runs"], str(sizes[0]), str(sizes[-1]))
            for k, v in res["goals"].items():
                print(f"{k:45s} {v}")
        res["seconds"] = round(time.time() - t0, 1)
        with open(F.out, "w") as f:
            json.dump(res, f, indent=2)
        print(f"wrote {F.out} in {res['seconds']}s")
        return
    folder = F.images
    shared = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                          "hymenoptera", "train")
    if not folder:
        folder = shared if (os.path.isdir(shared) and not F.tiny) else B._jpeg_folder(tempfile.mkdtemp())
    if F.profile_dir:
        prof = B.profile(F.profile_dir, folder, size=64 if F.tiny else 96, batch=16, steps=10 if F.tiny else 40,
                         steps_per_loop=F.steps_per_loop)
        with open(os.path.join(F.profile_dir, "profile.json"), "w") as f:
            json.dump(prof, f, indent=2)
        for run, p in prof.items():
            print(f"\n== {run}: {p['images_per_second']} img/s, {p.get('total_self_ms', '?')} ms of op self time")
            for t in p.get("by_type", []):
                print(f"  {t['type']:40s} {t['self_ms']:9.1f} ms  {100 * t['share']:5.1f}%")
            if "error" in p:
                print("  " + p["error"])
        print(f"wrote {F.profile_dir}/profile.json; view the traces: tensorboard --logdir {F.profile_dir}")
        return

    repeats = F.repeats or (1 if F.tiny else 3 if F.quick else 7)
    small = F.quick or F.tiny
    steps = 10 if F.tiny else 40 if small else 100
    t0 = time.time()
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "tensorflow": tf.__version__,
                       "gpus": [d.name for d in tf.config.list_physical_devices("GPU")]},
           "mode": "tiny" if F.tiny else "quick" if F.quick else "full", "repeats": repeats}
    models = [("small_cnn_32", "small_cnn", 32, 1.0, "all")]
    if not F.tiny:
        models += [("mobilenet_0.25_96_head", "mobilenet", 96, 0.25, "none"),
                   ("mobilenet_0.25_96_all", "mobilenet", 96, 0.25, "all")]
    out["loop_vs_fit"], out["loop_vs_fit_matched"] = {}, {}
    for key, backbone, size, alpha, spec in models:
        print(f"[bench] loop vs fit: {key}", flush=True)
        a, b = B.loop_vs_fit(backbone, size, alpha, spec, batch=32, steps=steps, steps_per_loop=F.steps_per_loop,
                             repeats=repeats)
        out["loop_vs_fit"][key], out["loop_vs_fit_matched"][key] = a, b

    print("[bench] pipeline vs ceiling", flush=True)
    out["pipeline_vs_ceiling"] = B.pipeline_vs_ceiling(folder, size=64 if F.tiny else 96, batch=16, repeats=repeats)
    print("[bench] feature cache", flush=True)
    out["feature_cache_speedup"] = B.feature_cache_speedup(size=32 if F.tiny else 96, batch=32, repeats=repeats)
    print("[bench] steps_per_loop", flush=True)
    out["steps_per_loop_speedup"] = B.steps_per_loop_speedup(default=F.steps_per_loop, batch=32, repeats=repeats)
    print("[bench] start-up", flush=True)
    out["startup"] = B.startup(repeats=repeats)
    print("[bench] memory", flush=True)
    mem_flags = ["--image_size=16", "--classes=0-2"] if F.tiny else []
    out["memory"] = B.memory(epochs=3 if F.tiny else 10, extra_flags=mem_flags)
    out["seconds"] = round(time.time() - t0, 1)
    with open(F.out, "w") as f:
        json.dump(out, f, indent=2)
    for k in ("loop_vs_fit", "loop_vs_fit_matched"):
        for m, r in out[k].items():
            print(f"{k:22s} {m:24s} {r['ratio']:.3f}")
    for k in ("pipeline_vs_ceiling", "feature_cache_speedup", "steps_per_loop_speedup"):
        print(f"{k:22s} {'':24s} {out[k]['ratio']:.3f}")
    for k in ("first_epoch", "no_augment", "without_stream", "without_thread_cap", "without_fused_warp"):
        print(f"{'  pipeline ' + k:47s} {out['pipeline_vs_ceiling'][k]['ratio']:.3f}")
    base = out["startup"]["import_tensorflow"]["median"]
    print(f"start-up: import tensorflow {base:.1f}s; " + ", ".join(
        f"{k} {v['seconds']['median']:.1f}s ({v['ratio']:.2f}x)" for k, v in out["startup"].items()
        if isinstance(v, dict) and "ratio" in v))
    print(f"memory growth epoch 2 -> last: {out['memory'].get('growth_epoch2_to_last')}")
    print(f"wrote {F.out} in {out['seconds']}s")


if __name__ == "__main__":
    app.run(common.guarded(main), flags_parser=common.parse_flags_or_exit)
