"""The Keras transfer-learning guide's recipe through `model.fit`, on this codebase's data:

    python -m launch.guide_recipe --workdir=/tmp/guide --dataset=folder:../shared/data/hymenoptera \\
        --test=val --backbone=mobilenet --alpha=0.25 --weights=PATH.h5 --image_size=224 \\
        --head_epochs=4 --lr=1e-3 --finetune_epochs=4 --finetune_lr=1e-4

Takes `launch.train`'s flags and reads only the data, backbone, weights, batch
size, dropout, seed and each stage's epochs and learning rate; the rest is the
guide's (research/studies/guide.py). Writes config.json and results.json like a run.
`launch.ablate --study=recipes` runs it beside this codebase's recipes.
"""

from __future__ import annotations

from launch import common  # first: sets the TF log level before TensorFlow loads

from absl import app

from launch.train import F, config_or_exit, define_flags


def main(argv):
    config = config_or_exit(argv, "/tmp/guide")
    common.start_tensorflow_quietly()
    from research.run.run_state import count
    from research.studies import guide
    r = guide.run(config, F.workdir)
    f = r["final"]
    test = f"test/accuracy {f['test/accuracy']:.4f}  " if "test/accuracy" in f else ""
    print(f"\nguide recipe: {test}val/accuracy {f['val/accuracy']:.4f}  ({count(r['epochs_run'], 'epoch')}, "
          f"{r['wall_time_s']:.0f}s)\nresults: {F.workdir}/results.json")


if __name__ == "__main__":
    define_flags(F)
    app.run(common.guarded(main), flags_parser=common.parse_flags_or_exit)
