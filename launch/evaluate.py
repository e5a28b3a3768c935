"""Evaluates a run: `python -m launch.evaluate --workdir=DIR [--dataset=...] [--split=val] [--checkpoint=best]`.

Writes DIR/eval/<name>.json (loss, accuracy, top-5, per-class precision/recall/F1,
confusion matrix, skipped images), DIR/eval/<name>_confusion.png and a TensorBoard
image in DIR/eval. Another folder without train/val sub-folders is scored whole.
"""

from __future__ import annotations

import sys

from absl import app, flags

from launch import common

F = flags.FLAGS
flags.DEFINE_string("workdir", None, "The run to evaluate.")
flags.DEFINE_string("dataset", None, "Another dataset with the same classes (default: the run's own).")
flags.DEFINE_string("data_dir", None, "TFDS data directory.")
flags.DEFINE_string("split", None, "val | test | train | all, as the run split the data (TFDS: also any split "
                    "name). Default: all for a --dataset folder without split sub-folders, else val.")
flags.DEFINE_string("checkpoint", "best", "best | latest | ema (the EMA weights saved at the end of a "
                    "--ema_decay run) | a checkpoint path.")
flags.DEFINE_string("name", None, "Report name (default: from dataset and split).")
flags.DEFINE_enum("tta", "none", ["none", "flip", "crops"], "Test-time augmentation, scored beside the plain "
                  "numbers: flip (image and mirror) or crops (centre, 4 corners and mirrored centre of the image "
                  "enlarged by 1/0.875); class probabilities are averaged over the views.")
flags.DEFINE_list("ensemble", [], "RUN1,RUN2,...: score these runs' mean class probabilities (e.g. the fold "
                  "runs of a --folds recipe) instead of --workdir; default --split=test and --checkpoint=latest.")
flags.DEFINE_string("out", None, "With --ensemble: where eval/ is written (default: the runs' common parent "
                    "directory/ensemble).")
flags.DEFINE_bool("skip_bad_images", False, "Leave out unreadable images (listed in the report) instead of failing.")


def main(argv):
    if len(argv) > 1 or bool(F.workdir) == bool(F.ensemble):
        common.die("usage: python -m launch.evaluate --workdir=DIR [--dataset=...] [--split=val] "
                   "[--checkpoint=best|latest|PATH], or --ensemble=RUN1,RUN2,... [--split=test] (not both)",
                   common.EXIT_USER_ERROR)
    if F.out and not F.ensemble:
        common.die("--out is for --ensemble; a run's reports go to its own eval/", common.EXIT_USER_ERROR)
    common.start_tensorflow_quietly()
    if F.ensemble:
        from research.serve.ensemble import evaluate_ensemble
        checkpoint = "latest" if F["checkpoint"].using_default_value else F.checkpoint
        r = evaluate_ensemble(F.ensemble, F.out or common.ensemble_dir(F.ensemble), dataset=F.dataset,
                              split=F.split, checkpoint=checkpoint, name=F.name, data_dir=F.data_dir,
                              skip_bad_images=F.skip_bad_images, tta=F.tta)
        r["checkpoint"] = f"the mean of {len(F.ensemble)} runs' probabilities"
    else:
        from research.serve.evaluate import evaluate_run
        r = evaluate_run(F.workdir, dataset=F.dataset, split=F.split, checkpoint=F.checkpoint, name=F.name,
                         data_dir=F.data_dir, skip_bad_images=F.skip_bad_images, tta=F.tta)
    top5 = f"  top5 {r['top5_accuracy']:.4f}" if "top5_accuracy" in r else ""
    print(f"{r['dataset']} [{r['split']}] {r['num_examples']} images: accuracy {r['accuracy']:.4f}  "
          f"loss {r['loss']:.4f}{top5}  macro F1 {r['macro_f1']:.4f}  ({r['checkpoint']})")
    if "tta" in r:
        t = r["tta"]
        print(f"  with test-time augmentation ({t['mode']}, {t['views']} views): accuracy {t['accuracy']:.4f}  "
              f"loss {t['loss']:.4f}")
    if r["skipped_images"]:
        print(f"skipped {len(r['skipped_images'])} unreadable image(s), e.g. {r['skipped_images'][0]}",
              file=sys.stderr)
    print(f"report: {r['report']}")


if __name__ == "__main__":
    app.run(common.guarded(main), flags_parser=common.parse_flags_or_exit)
