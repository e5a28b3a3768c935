"""Classifies images with an exported model: `python -m launch.predict --model=DIR/export IMAGE... | FOLDER`.

--model is an export directory, its saved_model/ or its model.keras. Prints the
top-k classes per image (or JSON with --json). Images are decoded as in training
(`research.images`: EXIF orientation applied), one batch at a time. Folders are
scanned for JPEG, PNG, BMP, GIF and WebP files; other files are counted and
named. Unreadable images are reported by name and skipped. Exit status: 0 all
classified, 1 some image could not be read, 2 nothing to classify (or a bad flag).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from launch import common

F = flags.FLAGS
flags.DEFINE_string("model", None, "Export directory, saved_model directory, or model.keras file.")
flags.DEFINE_integer("top_k", 3, "Classes shown per image.")
flags.DEFINE_bool("json", False, "Print one JSON document instead of text.")
flags.DEFINE_integer("batch_size", 32, "Images per forward pass.")


def _images(args: list[str]) -> tuple[list[str], list[str]]:
    """(images to classify, other files skipped in folders). A file named directly is always tried."""
    from research.images import has_image_extension
    out, other = [], []
    for a in args:
        if os.path.isdir(a):
            for root, dirs, files in os.walk(a):
                dirs.sort()
                for f in sorted(files):
                    # Hidden files (.DS_Store, macOS ._x.jpg resource forks) are not photos.
                    if not f.startswith("."):
                        (out if has_image_extension(f) else other).append(os.path.join(root, f))
        else:
            out.append(a)
    return out, other


def _load(model_arg: str):
    """Returns (predict_float(batch) -> probabilities, labels.json dict)."""
    import tensorflow as tf
    path = model_arg.rstrip("/")
    export_dir = path if os.path.exists(os.path.join(path, "labels.json")) else os.path.dirname(path)
    labels_path = os.path.join(export_dir, "labels.json")
    if not os.path.exists(labels_path):
        common.die(f"--model={model_arg!r}: no labels.json next to it (expected an export directory)",
                   common.EXIT_USER_ERROR)
    with open(labels_path) as f:
        meta = json.load(f)
    if path.endswith(".keras"):
        import keras
        model = keras.models.load_model(path)
        return (lambda x: model(x, training=False).numpy()), meta
    sm = os.path.join(path, "saved_model") if os.path.isdir(os.path.join(path, "saved_model")) else path
    if not os.path.exists(os.path.join(sm, "saved_model.pb")):
        common.die(f"--model={model_arg!r}: no saved_model.pb in {sm}", common.EXIT_USER_ERROR)
    loaded = tf.saved_model.load(sm)
    fn = loaded.signatures["predict_float"]
    return (lambda x: fn(tf.constant(x))["probabilities"].numpy()), meta


def _decoded_batches(paths: list[str], size: int, batch_size: int, failed: list[dict]):
    """Yields (paths, float32 pixels [n, size, size, 3]) batch by batch; unreadable files go to `failed`.

    Only one batch of pixels is alive at a time, and each image is resized as soon
    as it is decoded (a giant JPEG is decoded at reduced scale): memory stays
    bounded by the batch, not the number of images.
    """
    import numpy as np
    import tensorflow as tf
    from research import images

    decode = tf.function(lambda raw: images.decode_and_resize(raw, size),
                         input_signature=[tf.TensorSpec([], tf.string)])
    for i in range(0, len(paths), batch_size):
        good, pixels = [], []
        for p in paths[i:i + batch_size]:
            error = None
            try:
                with open(p, "rb") as f:
                    pixels.append(decode(tf.constant(f.read())).numpy())
                good.append(p)
            except OSError as e:
                error = e.strerror or str(e)
            except tf.errors.OpError as e:
                error = images.decode_error(e)
            if error:
                failed.append({"image": p, "error": error})
                print(f"error: cannot read {p}: {error}", file=sys.stderr)
        if good:
            yield good, np.stack(pixels)


def main(argv):
    if not F.model or len(argv) < 2:
        common.die("usage: python -m launch.predict --model=RUN/export IMAGE... | FOLDER", common.EXIT_USER_ERROR)
    if F.batch_size < 1 or F.top_k < 1:
        common.die(f"--batch_size={F.batch_size} and --top_k={F.top_k} must both be at least 1",
                   common.EXIT_USER_ERROR)
    paths, other = _images(argv[1:])
    if not paths:
        from research.images import IMAGE_EXTENSIONS
        found = f"only {len(other)} other file(s), e.g. {other[0]}" if other else "no files"
        common.die(f"no images to classify in {', '.join(argv[1:])}: found {found}; images are "
                   f"{', '.join(IMAGE_EXTENSIONS)} files (or name a file directly)", common.EXIT_USER_ERROR)
    import numpy as np

    predict, meta = _load(F.model)
    names, size = meta["class_names"], meta["image_size"]
    results, failed = [], []
    for batch_paths, pixels in _decoded_batches(paths, size, F.batch_size, failed):
        for p, row in zip(batch_paths, predict(pixels)):
            top = np.argsort(-row)[:F.top_k]
            results.append({"image": p, "top": [{"class": names[j], "probability": float(row[j])} for j in top]})
            if not F.json:
                print(p + "\t" + "  ".join(f"{t['class']} {t['probability']:.3f}" for t in results[-1]["top"]))
    if F.json:
        print(json.dumps({"predictions": results, "failed": failed, "skipped": other}, indent=2))
    if other:
        print(f"skipped {len(other)} file(s) that are not images by their extension, e.g. {other[0]}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(paths)} images could not be read", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags_or_exit)
