"""Classifies images with an exported model: `python -m launch.predict --model=DIR/export IMAGE... | FOLDER`.

--model is an export directory, its saved_model/ or its model.keras. Prints the
top-k classes per image (or JSON with --json). Images are decoded as in training
(`research.data.images`: EXIF orientation applied), one batch at a time. Folders are
scanned for JPEG, PNG, BMP, GIF and WebP files; other files are counted and
named. Unreadable images are reported by name and skipped. Exit status: 0 all
classified, 1 some image could not be read, 2 nothing to classify (or a bad flag).
The work is `research/serve/predict.py`'s.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from launch import common

F = flags.FLAGS
flags.DEFINE_string("model", None, "Export directory, saved_model directory, or model.keras file.")
flags.DEFINE_integer("top_k", 3, "Classes shown per image.")
flags.DEFINE_bool("json", False, "Print one JSON document instead of text.")
flags.DEFINE_integer("batch_size", 32, "Images per forward pass.")


def main(argv):
    if not F.model or len(argv) < 2:
        common.die("usage: python -m launch.predict --model=RUN/export IMAGE... | FOLDER", common.EXIT_USER_ERROR)
    if F.batch_size < 1 or F.top_k < 1:
        common.die(f"--batch_size={F.batch_size} and --top_k={F.top_k} must both be at least 1",
                   common.EXIT_USER_ERROR)
    with common.quiet_tensorflow_startup():
        from research.serve import predict as P
        from research.data.layout import IMAGE_EXTENSIONS

    paths, other = P.find_images(argv[1:])
    if not paths:
        found = f"only {len(other)} other file(s), e.g. {other[0]}" if other else "no files"
        common.die(f"no images to classify in {', '.join(argv[1:])}: found {found}; images are "
                   f"{', '.join(IMAGE_EXTENSIONS)} files (or name a file directly)", common.EXIT_USER_ERROR)
    predict, meta = P.load_exported(F.model)

    def show(r):
        if not F.json:
            print(r["image"] + "\t" + "  ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"]), flush=True)

    out = P.classify(paths, predict, meta, top_k=F.top_k, batch_size=F.batch_size, on_result=show,
                     on_failure=lambda f: print(f"error: cannot read {f['image']}: {f['error']}", file=sys.stderr))
    if F.json:
        print(json.dumps({"predictions": out.results, "failed": out.failed, "skipped": other}, indent=2))
    if other:
        print(f"skipped {len(other)} file(s) that are not images by their extension, e.g. {other[0]}", file=sys.stderr)
    if out.failed:
        print(f"{len(out.failed)} of {len(paths)} images could not be read", file=sys.stderr)
    sys.exit(1 if out.failed else 0)


if __name__ == "__main__":
    app.run(common.guarded(main), flags_parser=common.parse_flags_or_exit)
