"""Exports a run: `python -m launch.export --workdir=DIR [--checkpoint=latest]`.

Writes DIR/export/model.keras, DIR/export/saved_model/ and DIR/export/labels.json.
"""

from __future__ import annotations

import os

from absl import app, flags

from launch import common

F = flags.FLAGS
flags.DEFINE_string("workdir", None, "The run to export.")
flags.DEFINE_string("checkpoint", "latest", "latest (the final weights) | best | ema (the EMA weights saved at "
                    "the end of a --ema_decay run) | a checkpoint path.")
flags.DEFINE_string("out", None, "Output directory (default: DIR/export; with --ensemble, the runs' common parent "
                    "directory/ensemble/export).")
flags.DEFINE_list("ensemble", [], "RUN1,RUN2,...: export these runs as one model, their class probabilities "
                  "averaged (e.g. the fold runs of a --folds recipe), instead of --workdir; default "
                  "--checkpoint=latest.")


def main(argv):
    if len(argv) > 1 or bool(F.workdir) == bool(F.ensemble):
        common.die("usage: python -m launch.export --workdir=DIR [--checkpoint=latest|best|ema|PATH], or "
                   "--ensemble=RUN1,RUN2,... (not both)", common.EXIT_USER_ERROR)
    common.start_tensorflow_quietly()
    if F.ensemble:
        from research.serve.ensemble import export_ensemble
        out = F.out or os.path.join(common.ensemble_dir(F.ensemble), "export")
        export_ensemble(F.ensemble, out, checkpoint=F.checkpoint)
        print(f"exported the mean of {len(F.ensemble)} runs to {out}/model.keras and {out}/saved_model")
        return
    from research.serve.export import export_run
    meta = export_run(F.workdir, checkpoint=F.checkpoint, out_dir=F.out)
    out = F.out or f"{F.workdir}/export"
    print(f"exported {meta['checkpoint']} ({len(meta['class_names'])} classes) to {out}/model.keras and {out}/saved_model")


if __name__ == "__main__":
    app.run(common.guarded(main), flags_parser=common.parse_flags_or_exit)
