"""Evaluates a run: `python -m launch.evaluate --workdir=DIR [--dataset=...] [--split=val] [--checkpoint=best]`.

Writes DIR/eval/<name>.json (loss, accuracy, top-5, per-class precision/recall/F1,
confusion matrix), DIR/eval/<name>_confusion.png and a TensorBoard image in DIR/eval.
"""

from __future__ import annotations

from absl import app, flags

from launch import common

F = flags.FLAGS
flags.DEFINE_string("workdir", None, "The run to evaluate.")
flags.DEFINE_string("dataset", None, "Another dataset with the same classes (default: the run's own).")
flags.DEFINE_string("data_dir", None, "TFDS data directory.")
flags.DEFINE_string("split", "val", "val | train (TFDS: also any split name, e.g. test).")
flags.DEFINE_string("checkpoint", "best", "best | latest | a checkpoint path.")
flags.DEFINE_string("name", None, "Report name (default: from dataset and split).")


def main(argv):
    if len(argv) > 1 or not F.workdir:
        common.die("usage: python -m launch.evaluate --workdir=DIR [--dataset=...] [--split=val] "
                   "[--checkpoint=best|latest|PATH]", common.EXIT_USER_ERROR)
    from research.config import UserError
    from research.evaluate import evaluate_run
    try:
        r = evaluate_run(F.workdir, dataset=F.dataset, split=F.split, checkpoint=F.checkpoint, name=F.name,
                         data_dir=F.data_dir)
    except UserError as e:
        common.die(str(e), common.EXIT_USER_ERROR)
    top5 = f"  top5 {r['top5_accuracy']:.4f}" if "top5_accuracy" in r else ""
    print(f"{r['dataset']} [{r['split']}] {r['num_examples']} images: accuracy {r['accuracy']:.4f}  "
          f"loss {r['loss']:.4f}{top5}  macro F1 {r['macro_f1']:.4f}  ({r['checkpoint']})")
    print(f"report: {F.workdir}/eval/")


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags_or_exit)
