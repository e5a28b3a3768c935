"""Loading a finished run, and exporting it for use without this codebase.

`export/` in a workdir holds:
  model.keras     the classifier with its preprocessing, float pixels [0, 255] in,
                  class probabilities out; standard Keras layers only, so
                  `keras.models.load_model` needs no custom code (a `hub:` ViT's
                  needs KerasHub and `research.model.hub.layers()` first)
  saved_model/    a TF SavedModel with two signatures: `serving_default` takes a
                  batch of encoded images (JPEG/PNG/BMP/GIF/WebP bytes) and
                  `predict_float` a float batch in [0, 255]; both return
                  `probabilities` (and `serving_default` also `classes`)
  labels.json     class names, input size, backbone, the checkpoint exported

`serving_default` decodes in-graph with `research.data.images.decode_and_resize`, the
decode training used: a JPEG's EXIF orientation is applied (read by TF ops, so the
SavedModel needs no Python) and giant JPEGs are decoded at a reduced scale.
`predict_float` and `model.keras` take pixels: their caller decodes, and should
turn photos upright first (e.g. `PIL.ImageOps.exif_transpose`), as
`launch.predict` does by decoding with the same function.
"""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import tensorflow as tf

from research import provenance
from research.data import augment
from research.data import images as images_lib
from research.model import backbones, lora
from research.run.checkpoints import load_run, run_features
from research.errors import UserError

# What an exported model takes (labels.json's `input`).
INPUT = "RGB pixels in [0, 255], upright (EXIF orientation applied), resized to image_size (antialiased bilinear)"

# BGR mean of keras.applications' "caffe" preprocessing (vgg16, resnet50).
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def preprocessing_layers(backbone: str) -> list[keras.layers.Layer]:
    """Standard Keras layers that compute the backbone's preprocessing exactly, by its
    entry's `input_range`.

    `tf` (x/127.5 - 1), `unit` (x/255) and `affine` (a KerasHub preset's per-channel
    scale and offset) are a Rescaling; `caffe` (RGB->BGR, minus the ImageNet mean) is
    a fixed 1x1 convolution whose kernel is the channel permutation and whose bias is
    minus the mean; `inside` is nothing: the model preprocesses its [0, 255] input itself.
    """
    entry = backbones.get(backbone)
    kind = entry.input_range
    if kind == "unit":
        return [keras.layers.Rescaling(1.0 / 255, name="preprocess")]
    if kind == "tf":
        return [keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess")]
    if kind == "affine":
        return [keras.layers.Rescaling(list(entry.scale), offset=list(entry.offset), name="preprocess")]
    if kind == "caffe":
        conv = keras.layers.Conv2D(3, 1, name="preprocess", trainable=False)
        conv.build((None, None, None, 3))
        kernel = np.zeros((1, 1, 3, 3), np.float32)
        for out_c, in_c in enumerate((2, 1, 0)):
            kernel[0, 0, in_c, out_c] = 1.0
        conv.set_weights([kernel, -np.array(_CAFFE_MEAN_BGR, np.float32)])
        return [conv]
    if kind == "inside":
        return []
    raise UserError(f"no export preprocessing for backbone {backbone!r} (input_range {kind!r})")


def inference_model(model: keras.Model, backbone: str, *, eval_crop: float = 1.0,
                    name: str = "classifier_with_preprocessing") -> keras.Model:
    """Pixels in [0, 255] -> the evaluation crop (`--eval_crop`) -> preprocessing ->
    classifier -> softmax probabilities."""
    inputs = keras.Input(model.input_shape[1:], name="pixels")
    x = inputs
    for layer in augment.eval_view_layers(model.input_shape[1], eval_crop) + preprocessing_layers(backbone):
        x = layer(x)
    logits = model(x, training=False)
    probs = keras.layers.Softmax(dtype="float32", name="probabilities")(logits)
    return keras.Model(inputs, probs, name=name)


def decode_and_resize(data: tf.Tensor, size: int) -> tf.Tensor:
    """Encoded image bytes -> float32 [size, size, 3] in [0, 255], as in training.

    Upright by the JPEG's EXIF orientation; see `research.data.images.decode`.
    """
    return images_lib.decode_and_resize(data, size)


def export_run(workdir: str, *, checkpoint: str = "latest", out_dir: str | None = None,
               class_names: list[str] | None = None) -> dict:
    """Writes `export/model.keras`, `export/saved_model/` and `export/labels.json`.

    Returns:
      The labels.json content.
    """
    # Exported models compute in float32 whatever the training precision: portable to any device.
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        return _export(workdir, checkpoint, out_dir, class_names)
    finally:
        keras.mixed_precision.set_global_policy(policy)


def exportable(config, model: keras.Model, path: str, class_names: list[str]) -> keras.Model:
    """The run's classifier without LoRA layers: their factors merged into the kernels."""
    if not lora.enabled_layers(model):
        return model
    plain, _ = backbones.classifier_for(config.model, image_size=model.input_shape[1],
                                        num_classes=len(class_names), features=run_features(config, path))
    plain.set_weights(lora.merged_weights(model))
    return plain


def _export(workdir, checkpoint, out_dir, class_names):
    config, model, class_names, path = load_run(workdir, checkpoint=checkpoint, class_names=class_names)
    model = exportable(config, model, path, class_names)
    full = inference_model(model, config.model.backbone, eval_crop=config.data.eval_crop)
    meta = {"class_names": class_names, "image_size": model.input_shape[1], "backbone": config.model.backbone,
            "features": run_features(config, path),
            "checkpoint": path, "input": INPUT, "eval_crop": config.data.eval_crop}
    return write_export(full, meta, out_dir or os.path.join(workdir, "export"))


def write_export(full: keras.Model, meta: dict, out_dir: str) -> dict:
    """`model.keras`, `saved_model/` (both signatures) and `labels.json` (`meta` and the
    provenance) of an inference model (pixels in, probabilities out)."""
    os.makedirs(out_dir, exist_ok=True)
    class_names, size = meta["class_names"], meta["image_size"]
    full.save(os.path.join(out_dir, "model.keras"))

    labels = tf.constant(class_names)

    def predict_float(pixels):
        return {"probabilities": full(pixels, training=False)}

    def serve_bytes(images):
        pixels = tf.map_fn(lambda b: decode_and_resize(b, size), images, fn_output_signature=tf.float32)
        probs = full(pixels, training=False)
        return {"probabilities": probs, "classes": tf.gather(labels, tf.argmax(probs, axis=-1))}

    archive = keras.export.ExportArchive()
    archive.track(full)
    archive.add_endpoint("serving_default", serve_bytes, input_signature=[tf.TensorSpec([None], tf.string)])
    archive.add_endpoint("predict_float", predict_float,
                         input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
    archive.write_out(os.path.join(out_dir, "saved_model"), verbose=False)
    meta = {**meta, "provenance": provenance.provenance()}
    with open(os.path.join(out_dir, "labels.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return meta

