"""Vision Transformers from KerasHub as backbones: `--backbone=hub:PRESET`, an optional extra.

`pip install -e '.[hub]'` installs KerasHub; nothing else in the codebase imports it.
PRESET is what `keras_hub.models.Backbone.from_preset` takes: a KerasHub preset name
(`vit_base_patch16_224_imagenet`, downloaded on a machine with network) or a preset
directory (`save_to_preset`'s: config.json, model.weights.h5, image_converter.json).

KerasHub's `ViTBackbone` runs every transformer layer inside one `ViTEncoder` layer. The
base built here calls the same layer objects one by one, so that each is a layer of the
base, a block the unfreeze specs, the probes' taps and `--features` can name:

    embed     the patch embedding, class token and position embedding (and the dropout after them)
    blockI    transformer layer I (KerasHub's `transformer_block_I`), I = 1..N
              the final LayerNorm closes blockN: `top:K` is the last K transformer layers
              and the final norm

The head reads the class token (`pool="token"`), as ViT's classifiers do. `--weights=imagenet`
means the preset's own weights; the preprocessing is the preset's image converter's
`x * scale + offset` (the preset says what range its weights saw). The input side is the
preset's: its position embeddings are learned for that many patches.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from research.errors import UserError

if TYPE_CHECKING:
    import keras

PREFIX = "hub:"
SUPPORTED = ("ViTBackbone",)


def is_hub(name: str) -> bool:
    return name.startswith(PREFIX)


def require():
    """KerasHub, or a UserError naming the extra that installs it."""
    try:
        import keras_hub
    except ImportError:
        raise UserError("--backbone=hub:PRESET needs KerasHub, the optional extra: pip install -e '.[hub]'") from None
    return keras_hub


def _read_preset(name: str) -> tuple[dict, tuple, tuple]:
    """The preset's backbone config and its image converter's (scale, offset), per channel."""
    keras_hub = require()
    from keras_hub.src.utils.preset_utils import load_json
    preset = name[len(PREFIX):]
    try:
        config = load_json(preset, "config.json")
    except Exception as e:  # an unknown name, a missing directory, no network
        raise UserError(f"--backbone={name}: could not read KerasHub preset {preset!r} "
                        f"({type(e).__name__}: {e})") from None
    if config.get("class_name") not in SUPPORTED:
        raise UserError(f"--backbone={name}: the preset's backbone is {config.get('class_name')!r}; "
                        f"hub: supports {', '.join(SUPPORTED)}")
    try:
        converter = keras_hub.layers.ImageConverter.from_preset(preset)
    except Exception as e:
        raise UserError(f"--backbone={name}: the preset has no image converter, so the input range its weights "
                        f"saw is unknown ({type(e).__name__}: {e})") from None
    per_channel = lambda v, default: tuple(float(x) for x in np.broadcast_to(  # noqa: E731
        np.asarray(default if v is None else v, np.float64), (3,)))
    return config["config"], per_channel(converter.scale, 1.0), per_channel(converter.offset, 0.0)


def _block_of(base: keras.Model) -> dict[str, str]:
    out, current = {}, "embed"
    for layer in base.layers:
        if layer.name.startswith("transformer_block_"):
            current = "block" + layer.name[len("transformer_block_"):]
        out[layer.name] = current
    return out


# Keys KerasHub 0.32's ViT layers return from `get_config` that their constructors refuse:
# a model holding these layers themselves (not inside a whole `ViTBackbone`, which rebuilds
# them from its own config) could not be loaded from `model.keras` or cloned. And keys it
# leaves out, which the rebuilt layer must keep (a preset without the patch bias).
_DERIVED = {"ViTPatchingAndEmbedding": ("num_patches", "num_positions"), "ViTEncoderBlock": ("key_dim",)}
_KEPT = {"ViTPatchingAndEmbedding": ("use_patch_bias", "data_format")}


def _config_of(layer, parent: type | None = None) -> dict:
    config = (parent or type(layer)).get_config(layer)
    kind = (parent or type(layer)).__name__
    config.update({k: getattr(layer, k) for k in _KEPT.get(kind, ()) if hasattr(layer, k)})
    return {k: v for k, v in config.items() if k not in _DERIVED.get(kind, ())}


@functools.lru_cache(maxsize=None)
def layers() -> tuple:
    """KerasHub, and {KerasHub class name: its subclass here}, registered for loading an
    export: each leaves out the keys above and computes what KerasHub's layer computes."""
    import keras
    keras_hub = require()
    from keras_hub.src.models.vit import vit_layers

    def fixed(parent):
        def get_config(self):
            return _config_of(self, parent)
        cls = type(parent.__name__, (parent,), {"get_config": get_config})
        return keras.saving.register_keras_serializable(package="research")(cls)

    return keras_hub, {name: fixed(getattr(vit_layers, name)) for name in _DERIVED}


def _rebuilt(layer, cls=None):
    """A new layer from `layer`'s config (of class `cls`, default its own)."""
    return (cls or type(layer)).from_config(_config_of(layer))


def _builder(name: str):
    preset = name[len(PREFIX):]

    def build(input_shape, weights=None, alpha=1.0):
        del alpha
        import keras
        keras_hub, fixed = layers()
        # The run's dtype policy (mixed precision), not the float32 the preset's config records.
        vit = keras_hub.models.Backbone.from_preset(preset, load_weights=weights == "imagenet",
                                                    dtype=keras.config.dtype_policy().name)
        encoder = vit.get_layer("vit_encoder")
        hub_layers = [vit.get_layer("vit_patching_and_embedding"), encoder.dropout, *encoder.encoder_layers,
                      encoder.layer_norm]
        ours = [_rebuilt(layer, fixed.get(type(layer).__name__)) for layer in hub_layers]
        inputs = keras.Input(tuple(input_shape))
        x = inputs
        for layer in ours:
            x = layer(x)
        if weights == "imagenet":  # else both are freshly initialised: nothing to carry over
            for layer, source in zip(ours, hub_layers):
                layer.set_weights(source.get_weights())
        return keras.Model(inputs, x, name=preset.rstrip("/").rsplit("/", 1)[-1])
    return build


def entry_fields(name: str) -> dict:
    """The fields of `hub:PRESET`'s registry entry (`backbones.Backbone`), read from the preset
    (KerasHub imports TensorFlow).

    Raises:
      UserError: KerasHub missing, an unreadable preset, or a backbone other than a ViT.
    """
    config, scale, offset = _read_preset(name)
    size = int(config["image_shape"][0])
    scale_a, offset_a = np.asarray(scale, np.float32), np.asarray(offset, np.float32)

    def preprocess(x):
        return x * scale_a + offset_a

    return dict(name=name, build=_builder(name), preprocess=preprocess, default_size=size, min_size=size,
                block_of=_block_of, block_names=("embed", *(f"block{i}" for i in range(1, int(config["num_layers"]) + 1))),
                input_range="affine", norm="layer", max_size=size,
                pool="token" if config.get("use_class_token", True) else "avg", scale=scale, offset=offset)
