"""Linear probes at every block of a run's backbone: which blocks' features transfer.

    python -m launch.probe --out=runs/probe_ants -- --dataset=folder:../shared/data/hymenoptera --test=val \\
        --backbone=mobilenet --alpha=0.25 --weights=PATH.h5 --image_size=224

Own flags before `--`, then `launch.train` flags (data, splits, backbone, weights).
Writes probe.csv, probe.md, probe.json, probe.png and TensorBoard scalars in --out
(research/studies/probe.py; the probes are research/model/probe.py). Nothing is trained but the probes.
"""

from __future__ import annotations

from absl import app, flags

from launch import common

F = flags.FLAGS
flags.DEFINE_string("out", "/tmp/probe", "Directory for probe.csv, probe.md, probe.png and TensorBoard scalars.")
flags.DEFINE_float("max_memory_mb", 2048, "Features larger than this are written to OUT/features and read "
                   "memory-mapped.")


def main(argv):
    common.start_tensorflow_quietly()
    from launch.train import config_from_args
    from research.studies.probe import conclusion, run_probe
    rows = run_probe(config_from_args(argv[1:]), F.out, max_memory_mb=F.max_memory_mb)
    with open(f"{F.out}/probe.md") as f:
        print("\n" + f.read())
    print(conclusion(rows))
    print(f"plot: {F.out}/probe.png\ninspect: tensorboard --logdir {F.out}")


if __name__ == "__main__":
    app.run(common.guarded(main), flags_parser=common.parse_own_flags_then_passthrough)
