"""Classifying images with an exported model (the library half of `launch/predict.py`).

`find_images` turns paths and folders into the images to classify, `load_exported`
opens an export directory, its `saved_model/` or its `model.keras`, and `classify`
decodes the images as training does (`research.data.images`: EXIF orientation applied,
giant JPEGs decoded at reduced scale) one batch at a time and returns the top-k
classes of each.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from research.errors import UserError
from research.model import hub


def find_images(args: list[str]) -> tuple[list[str], list[str]]:
    """(images to classify, other files skipped in folders). A file named directly is always tried."""
    from research.data.layout import walk_images
    out, other = [], []
    for a in args:
        if os.path.isdir(a):
            images, others = walk_images(a)  # the rule training reads a class folder by
            out += images
            other += others
        else:
            out.append(a)
    return out, other


def load_exported(model_arg: str) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """Returns (float pixels [n, size, size, 3] -> probabilities, the labels.json dict).

    Raises:
      UserError: not an export directory, or no SavedModel in it.
    """
    import tensorflow as tf
    path = model_arg.rstrip("/")
    export_dir = path if os.path.exists(os.path.join(path, "labels.json")) else os.path.dirname(path)
    labels_path = os.path.join(export_dir, "labels.json")
    if not os.path.exists(labels_path):
        raise UserError(f"--model={model_arg!r}: no labels.json next to it (expected an export directory)")
    with open(labels_path) as f:
        meta = json.load(f)
    if path.endswith(".keras"):
        import keras
        if hub.is_hub(meta.get("backbone", "")):
            hub.layers()  # KerasHub's layers, and this codebase's subclasses, registered for loading
        model = keras.models.load_model(path)
        return (lambda x: model(x, training=False).numpy()), meta
    sm = os.path.join(path, "saved_model") if os.path.isdir(os.path.join(path, "saved_model")) else path
    if not os.path.exists(os.path.join(sm, "saved_model.pb")):
        raise UserError(f"--model={model_arg!r}: no saved_model.pb in {sm}")
    fn = tf.saved_model.load(sm).signatures["predict_float"]
    return (lambda x: fn(tf.constant(x))["probabilities"].numpy()), meta


def decoded_batches(paths: list[str], size: int, batch_size: int,
                    on_failure: Callable[[dict], None]) -> Iterator[tuple[list[str], np.ndarray]]:
    """Yields (paths, float32 pixels [n, size, size, 3]) batch by batch; an unreadable
    file is passed to `on_failure` as `{"image", "error"}`.

    Only one batch of pixels is alive at a time, and each image is resized as soon
    as it is decoded: memory stays bounded by the batch, not the number of images.
    """
    import tensorflow as tf
    from research.data import images

    decode = tf.function(lambda raw: images.decode_and_resize(raw, size),
                         input_signature=[tf.TensorSpec([], tf.string)])
    for i in range(0, len(paths), batch_size):
        good, pixels = [], []
        for p in paths[i:i + batch_size]:
            error = None
            try:
                with open(p, "rb") as f:
                    data = tf.constant(f.read())
                with _native_stderr_kept_unless_failed():
                    pixels.append(decode(data).numpy())
                good.append(p)
            except OSError as e:
                error = e.strerror or str(e)
            except tf.errors.OpError as e:
                error = images.decode_error(e)
            if error:
                on_failure({"image": p, "error": error})
        if good:
            yield good, np.stack(pixels)


@contextlib.contextmanager
def _native_stderr_kept_unless_failed():
    """libjpeg writes its own lines to stderr for a damaged file ("Improper call to JPEG
    library in state 201", "Premature end of JPEG data"): the error line `classify`
    reports says it once, plainly. The whole process's stderr is held for the one decode:
    kept and passed on when it succeeds, dropped when it fails (with anything another
    thread wrote meanwhile)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as buf:
        os.dup2(buf.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if not failed:
                buf.seek(0)
                os.write(2, buf.read())


@dataclass
class Predictions:
    """What `classify` found: one `{"image", "top": [{"class", "probability"}]}` per image read."""

    results: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)


def classify(paths: list[str], predict: Callable[[np.ndarray], np.ndarray], meta: dict, *, top_k: int = 3,
             batch_size: int = 32, on_result: Callable[[dict], None] | None = None,
             on_failure: Callable[[dict], None] | None = None) -> Predictions:
    """The top-k classes of every readable image in `paths`.

    Args:
      paths: image files.
      predict, meta: from `load_exported`.
      top_k: classes per image.
      batch_size: images per forward pass.
      on_result / on_failure: called as each image is classified or fails (for
        printing as results come).
    """
    names, size = meta["class_names"], meta["image_size"]
    out = Predictions()

    def failure(f: dict) -> None:
        out.failed.append(f)
        if on_failure:
            on_failure(f)

    for batch_paths, pixels in decoded_batches(paths, size, batch_size, failure):
        for p, row in zip(batch_paths, predict(pixels)):
            top = np.argsort(-row)[:top_k]
            out.results.append({"image": p, "top": [{"class": names[j], "probability": float(row[j])} for j in top]})
            if on_result:
                on_result(out.results[-1])
    return out
