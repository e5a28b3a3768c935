"""The learning-rate range test for a run's config: `lr_find.png` and a suggested LR.

    python -m launch.lr_find --out=/tmp/lr_ants -- --dataset=folder:../shared/data/hymenoptera \\
        --backbone=mobilenet --alpha=0.25 --weights=PATH.h5 --head_epochs=8 --unfreeze=all

Own flags before `--`, then any `launch.train` flags (the config whose first stage,
or `--stage`, is tested). Nothing is written to a run; see research/studies/lr_find.py.
"""

from __future__ import annotations

from absl import app, flags

from launch import common

F = flags.FLAGS
flags.DEFINE_string("out", "/tmp/lr_find", "Directory for lr_find.json and lr_find.png.")
flags.DEFINE_integer("stage", 0, "Which stage of the config to test (default: the first; a later one is tested "
                     "from the initial weights, without training the stages before it).")
flags.DEFINE_float("start", 1e-7, "First learning rate.")
flags.DEFINE_float("end", 1.0, "Last learning rate.")
flags.DEFINE_integer("steps", 100, "Steps of the sweep (it stops early once the loss diverges).")


def main(argv):
    common.start_tensorflow_quietly()
    from launch.train import config_from_args
    from research.studies.lr_find import lr_range_test
    r = lr_range_test(config_from_args(argv[1:]), F.out, stage=F.stage, start=F.start, end=F.end,
                      steps=F.steps)
    s = r["suggestion"]
    print(f"\nstage {r['stage']} ({r['unfreeze']}): {r['steps_run']} steps, lr {r['lrs'][0]:.2g} .. {r['lrs'][-1]:.2g}")
    print(f"suggested lr: {s['steepest']:.2g} (steepest descent of the smoothed loss, after its first "
          f"{s['skipped_steps']} steps); min/10: {s['min_lr_over_10']:.2g}")
    if r["note"]:
        print(f"note: {r['note']}")
    print(f"plot: {F.out}/lr_find.png")


if __name__ == "__main__":
    app.run(common.guarded(main), flags_parser=common.parse_own_flags_then_passthrough)
