"""Classifies images with an exported model: `python -m launch.predict --model=DIR/export IMAGE... | FOLDER`.

--model is an export directory, its saved_model/ or its model.keras. Prints the
top-k classes per image (or JSON with --json). Unreadable images are reported by
name and skipped; the exit status is 1 if any image failed.
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

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def _images(args: list[str]) -> list[str]:
    out = []
    for a in args:
        if os.path.isdir(a):
            for root, _, files in sorted(os.walk(a)):
                out += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        else:
            out.append(a)
    return out


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


def main(argv):
    if not F.model or len(argv) < 2:
        common.die("usage: python -m launch.predict --model=RUN/export IMAGE... | FOLDER", common.EXIT_USER_ERROR)
    import numpy as np
    import tensorflow as tf
    from research.export import decode_and_resize

    predict, meta = _load(F.model)
    names, size = meta["class_names"], meta["image_size"]
    paths = _images(argv[1:])
    good, pixels, failed = [], [], []
    for p in paths:
        try:
            with open(p, "rb") as f:
                pixels.append(decode_and_resize(tf.constant(f.read()), size).numpy())
            good.append(p)
        except (OSError, tf.errors.OpError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            failed.append({"image": p, "error": msg})
            print(f"error: cannot read {p}: {msg}", file=sys.stderr)
    results = []
    for i in range(0, len(good), F.batch_size):
        probs = predict(np.stack(pixels[i:i + F.batch_size]).astype("float32"))
        for p, row in zip(good[i:i + F.batch_size], probs):
            top = np.argsort(-row)[:F.top_k]
            results.append({"image": p, "top": [{"class": names[j], "probability": float(row[j])} for j in top]})
    if F.json:
        print(json.dumps({"predictions": results, "failed": failed}, indent=2))
    else:
        for r in results:
            print(r["image"] + "\t" + "  ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"]))
    if failed:
        print(f"{len(failed)} of {len(paths)} images could not be read", file=sys.stderr)
    sys.exit(1 if failed or not paths else 0)


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags_or_exit)
