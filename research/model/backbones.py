"""Backbone registry: builder, preprocessing, input sizes, and ordered named blocks.

Every entry can say, for each layer of the built base model, which named block
it belongs to. Blocks are ordered input to output; `research/model/unfreeze.py` picks
variables by block. Block membership follows the Keras layer names, which for
`keras.applications` models are stable (`block3_conv1`, `conv_dw_5_bn`, ...).

The classifier built on top is always

    inputs -> base(x, training=False) -> pooling -> Dropout -> Dense (float32 logits)

(pooling: the average over positions, or a transformer's class token: `pooled`)

with the head layers named `head_pool`, `head_dropout`, `head` so that weights
can be loaded "everything but the head". With `--features`, the base is cut at
chosen blocks (`cut`) and the head reads their outputs (`build_classifier`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from research.errors import UserError
from research.model import hub  # imports KerasHub only when a hub: entry is read

if TYPE_CHECKING:
    import keras


@dataclass(frozen=True)
class Backbone:
    """One registry entry.

    Attributes:
      name: registry key.
      build: `build(input_shape, weights, alpha) -> keras.Model` (no top).
      preprocess: maps float32 RGB pixels in [0, 255] to the model's input range.
      default_size / min_size: square input side.
      block_of: maps the base model to `{layer_name: block_name}`.
      has_imagenet: whether `weights="imagenet"` exists for it.
      has_alpha: whether it has a width multiplier (`--alpha`).
      block_names: its blocks, input to output, as `block_of` names them on the built
        model (tests/test_backbones.py checks both agree): unfreeze specs are checked
        against them before TensorFlow starts.
      input_range: what `preprocess` makes of [0, 255] pixels, which the export rebuilds
        from standard layers (`research.serve.export.preprocessing_layers`): `unit` x/255,
        `tf` x/127.5 - 1, `caffe` BGR minus the ImageNet mean, `inside` nothing (the model
        normalises its [0, 255] input itself, as ConvNeXt, EfficientNet and MobileNetV3 do),
        `affine` x * scale + offset per channel (`scale`, `offset`: a KerasHub preset's).
      norm: the base's normalisation layers: `batch` (BatchNorm: `--bn` applies), `layer`
        (LayerNorm only: no statistics, so `--bn=adapt` is refused), `none` (vgg16).
      pool: how the head pools the base's output: `avg` over a feature map, `token` the
        class token of a transformer's sequence (`pooled`).
      max_size: the largest input side (0: none).
    """

    name: str
    build: Callable[..., keras.Model]
    preprocess: Callable
    default_size: int
    min_size: int
    block_of: Callable[[keras.Model], dict[str, str]]
    has_imagenet: bool = True
    has_alpha: bool = False
    block_names: tuple[str, ...] = field(kw_only=True)  # required: no spec can be checked without it
    input_range: str = field(kw_only=True)
    norm: str = field(default="batch", kw_only=True)
    pool: str = field(default="avg", kw_only=True)
    max_size: int = field(default=0, kw_only=True)  # 0: none; a ViT's position embeddings fix its side
    scale: tuple[float, ...] = field(default=(), kw_only=True)
    offset: tuple[float, ...] = field(default=(), kw_only=True)


def _by_prefix(rules: list[tuple[str, str]], first: str) -> Callable[[keras.Model], dict[str, str]]:
    """Assigns layers to blocks by name regex.

    `rules` are `(regex, block template)` pairs; the template may use the regex's
    groups (`r"block\\1"`). A layer matching no rule (auto-named shortcut convs,
    `add` layers, padding) joins the block of the previous layer in order, or
    `first` when it comes before any matched layer.
    """
    compiled = [(re.compile(p), t) for p, t in rules]

    def block_of(base: keras.Model) -> dict[str, str]:
        out, current = {}, first
        for layer in base.layers:
            for pat, tmpl in compiled:
                mt = pat.match(layer.name)
                if mt:
                    current = mt.expand(tmpl)
                    break
            out[layer.name] = current
        return out

    return block_of


def _inception_blocks(base: keras.Model) -> dict[str, str]:
    """InceptionV3: `stem`, then `mixed0` ... `mixed10`.

    Inside the stem the layers are auto-named, so the stem is defined by
    structure: it is the sequential part before the first layer whose output
    feeds several branches (the input of `mixed0`). Keras orders functional
    layers by depth, so each `mixedN` block is every layer after the previous
    block's end up to the concatenation `mixedN` itself.
    """
    out, current, in_stem = {}, "stem", True
    for layer in base.layers:
        out[layer.name] = current
        if in_stem and len(layer._outbound_nodes) > 1:
            in_stem, current = False, "mixed0"
        elif not in_stem and re.fullmatch(r"mixed\d+", layer.name):
            current = f"mixed{int(layer.name[5:]) + 1}"
    return out


def _small_cnn(input_shape, weights=None, alpha=1.0) -> keras.Model:
    """Three conv-BN-ReLU-pool blocks: a fast backbone for CPU tests and digits."""
    del weights, alpha
    import keras
    from keras import layers
    inputs = keras.Input(input_shape)
    x = inputs
    for i, filters in enumerate((32, 64, 128), start=1):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{i}_conv")(x)
        x = layers.BatchNormalization(name=f"block{i}_bn")(x)
        x = layers.ReLU(name=f"block{i}_relu")(x)
        if i < 3:
            x = layers.MaxPooling2D(name=f"block{i}_pool")(x)
    return keras.Model(inputs, x, name="small_cnn")


# The registry names keras.applications symbols instead of holding them, so that
# importing it (to validate a config) does not import TensorFlow: a bad flag is
# reported in well under a second.

def _app(fn_name: str, *, width: bool = False):
    def build(input_shape, weights=None, alpha=1.0):
        import keras
        kw = {"alpha": alpha} if width else {}
        fn = getattr(keras.applications, fn_name)
        return fn(input_shape=input_shape, include_top=False, weights=weights, **kw)
    return build


def _preprocess(module: str):
    def preprocess(x):
        # An attribute, not importlib: AutoGraph, converting a tf.data map function that
        # calls this, cannot read importlib's frozen source and warns on every run.
        import keras
        return getattr(keras.applications, module).preprocess_input(x)
    return preprocess


def _scale_01(x):
    return x / 255.0


def _numbered(prefix: str, first: int, last: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(first, last + 1))


def _convnext_blocks(base: keras.Model) -> dict[str, str]:
    """ConvNeXt: `stem`, then one block per residual block, `stage{S}_block{B}`. Each
    downsampling layer (LayerNorm + strided convolution) opens the stage it feeds, as
    timm's layer groups have it; the final LayerNorm closes the last block."""
    out, current = {}, "stem"
    for layer in base.layers:
        mt = re.search(r"_stage_(\d+)_block_(\d+)_", layer.name)
        down = re.search(r"_downsampling_block_(\d+)$", layer.name)
        if mt:
            current = f"stage{mt[1]}_block{mt[2]}"
        elif down:
            current = f"stage{int(down[1]) + 1}_block0"
        out[layer.name] = current
    return out


def _stages(depths: tuple[int, ...]) -> tuple[str, ...]:
    return ("stem", *(f"stage{s}_block{b}" for s, n in enumerate(depths) for b in range(n)))


_EFFICIENTNET = _by_prefix([(r"stem_", "stem"), (r"block(\d)[a-z]_", r"block\1"), (r"top_", "top")], "stem")
# MobileNetV3: `conv` is the stem, `expanded_conv_N_*` the inverted residual blocks (the
# first has no number), `conv_1` the last 1x1 convolution. The activations Keras leaves
# unnamed (`re_lu_N`, `activation_N`: hard-swish and hard-sigmoid) join the block they follow.
_MOBILENET_V3 = _by_prefix([(r"expanded_conv_(\d+)_", r"block\1"), (r"expanded_conv_", "block0"),
                            (r"conv_1", "top"), (r"conv", "stem")], "stem")

_RESNET50 = _by_prefix([(r"(?:conv1|pool1)_", "stem"), (r"(conv\d_block\d+)_", r"\1")], "stem")
_RESNET50_BLOCKS = ("stem", *(f"conv{s}_block{b}" for s, n in ((2, 3), (3, 4), (4, 6), (5, 3)) for b in range(1, n + 1)))

BACKBONES: dict[str, Backbone] = {
    "small_cnn": Backbone(
        "small_cnn", _small_cnn, _scale_01, 32, 8,
        _by_prefix([(r"block(\d+)_", r"block\1")], "block1"), has_imagenet=False,
        block_names=_numbered("block", 1, 3), input_range="unit"),
    "vgg16": Backbone(
        "vgg16", _app("VGG16"), _preprocess("vgg16"), 224, 32,
        _by_prefix([(r"block(\d+)_", r"block\1")], "block1"), block_names=_numbered("block", 1, 5),
        input_range="caffe", norm="none"),
    "inception_v3": Backbone(
        "inception_v3", _app("InceptionV3"), _preprocess("inception_v3"), 299, 75,
        _inception_blocks, block_names=("stem", *_numbered("mixed", 0, 10)), input_range="tf"),
    "mobilenet": Backbone(
        "mobilenet", _app("MobileNet", width=True), _preprocess("mobilenet"), 224, 32,
        _by_prefix([(r"conv1", "stem"), (r"conv_(?:dw|pw|pad)_(\d+)", r"conv_dw_\1")], "stem"), has_alpha=True,
        block_names=("stem", *_numbered("conv_dw_", 1, 13)), input_range="tf"),
    "mobilenet_v2": Backbone(
        "mobilenet_v2", _app("MobileNetV2", width=True), _preprocess("mobilenet_v2"), 224, 32,
        _by_prefix([(r"(?:bn_)?Conv1", "stem"), (r"expanded_conv_", "block_0"),
                    (r"block_(\d+)_", r"block_\1"), (r"Conv_1|out_relu", "top")], "stem"), has_alpha=True,
        block_names=("stem", *_numbered("block_", 0, 16), "top"), input_range="tf"),
    "mobilenet_v3_small": Backbone(
        "mobilenet_v3_small", _app("MobileNetV3Small", width=True), _preprocess("mobilenet_v3"), 224, 32,
        _MOBILENET_V3, has_alpha=True, block_names=("stem", *_numbered("block", 0, 10), "top"),
        input_range="inside"),
    "mobilenet_v3_large": Backbone(
        "mobilenet_v3_large", _app("MobileNetV3Large", width=True), _preprocess("mobilenet_v3"), 224, 32,
        _MOBILENET_V3, has_alpha=True, block_names=("stem", *_numbered("block", 0, 14), "top"),
        input_range="inside"),
    "resnet50": Backbone(
        "resnet50", _app("ResNet50"), _preprocess("resnet50"), 224, 32,
        _RESNET50, block_names=_RESNET50_BLOCKS, input_range="caffe"),
    # Pre-activation: the final BatchNorm and ReLU (`post_bn`, `post_relu`) close the last block.
    "resnet50_v2": Backbone(
        "resnet50_v2", _app("ResNet50V2"), _preprocess("resnet_v2"), 224, 32,
        _RESNET50, block_names=_RESNET50_BLOCKS, input_range="tf"),
    "efficientnet_b0": Backbone(
        "efficientnet_b0", _app("EfficientNetB0"), _preprocess("efficientnet"), 224, 32,
        _EFFICIENTNET, block_names=("stem", *_numbered("block", 1, 7), "top"), input_range="inside"),
    "efficientnet_v2_b0": Backbone(
        "efficientnet_v2_b0", _app("EfficientNetV2B0"), _preprocess("efficientnet_v2"), 224, 32,
        _EFFICIENTNET, block_names=("stem", *_numbered("block", 1, 6), "top"), input_range="inside"),
    "efficientnet_v2_s": Backbone(
        "efficientnet_v2_s", _app("EfficientNetV2S"), _preprocess("efficientnet_v2"), 384, 32,
        _EFFICIENTNET, block_names=("stem", *_numbered("block", 1, 6), "top"), input_range="inside"),
    "convnext_tiny": Backbone(
        "convnext_tiny", _app("ConvNeXtTiny"), _preprocess("convnext"), 224, 32,
        _convnext_blocks, block_names=_stages((3, 3, 9, 3)), input_range="inside", norm="layer"),
    "convnext_small": Backbone(
        "convnext_small", _app("ConvNeXtSmall"), _preprocess("convnext"), 224, 32,
        _convnext_blocks, block_names=_stages((3, 3, 27, 3)), input_range="inside", norm="layer"),
    "xception": Backbone(
        "xception", _app("Xception"), _preprocess("xception"), 299, 71,
        _by_prefix([(r"block(\d+)_", r"block\1")], "block1"), block_names=_numbered("block", 1, 14),
        input_range="tf"),
}


NORM_MEANING = {"batch": "BatchNorm", "layer": "LayerNorm only: no statistics to freeze or re-estimate",
                "none": "no normalisation layer"}


@functools.lru_cache(maxsize=None)
def _hub_entry(name: str) -> Backbone:
    return Backbone(**hub.entry_fields(name))  # reads the preset: KerasHub, the optional extra


def input_size(name: str, image_size: int) -> int:
    """`--image_size`, or the backbone's default side when it is 0."""
    return image_size or get(name).default_size


def get(name: str) -> Backbone:
    """The entry of a registry name, or of `hub:PRESET` (research/model/hub.py, read from the preset).

    Raises:
      UserError: an unknown name, or a `hub:` preset that cannot be used.
    """
    if hub.is_hub(name):
        return _hub_entry(name)
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; allowed values: {', '.join(BACKBONES)}, hub:PRESET")
    return BACKBONES[name]


def build_base(name: str, *, image_size: int, alpha: float = 1.0) -> keras.Model:
    """Builds the base (no top), freshly initialised; `load_pretrained` fills it.

    Raises:
      UserError: unknown backbone.
    """
    return get(name).build((image_size, image_size, 3), weights=None, alpha=alpha)


def load_pretrained(base: keras.Model, name: str, weights: str, *, image_size: int, alpha: float = 1.0) -> None:
    """Loads `imagenet` or a `.h5` weights file into a built base.

    Separate from building so that a resumed run, whose weights come from its own
    checkpoint, never downloads or reads its initialisation source.

    Raises:
      UserError: weights unavailable for the backbone, a missing or unreadable
        file, a failed download, or weights that do not fit.
    """
    import os
    entry = get(name)
    if weights == "imagenet":
        if not entry.has_imagenet:
            raise UserError(f"--weights=imagenet is not available for backbone {name!r}")
        try:
            # keras.applications downloads and loads by position inside its constructor.
            source = entry.build((image_size, image_size, 3), weights="imagenet", alpha=alpha)
        except ValueError as e:
            raise UserError(f"--weights=imagenet for {name!r}: {e}") from None
        except Exception as e:  # download failures (no network) land here
            raise UserError(f"could not fetch ImageNet weights for {name!r} ({type(e).__name__}: {e}); "
                            "on an offline machine pass --weights=PATH.h5 or --weights=none") from None
        base.set_weights(source.get_weights())
        return
    if not os.path.isfile(weights):
        raise UserError(f"--weights={weights!r}: no such file")
    try:
        # What keras.applications does with a path: load by position (by_name=False).
        base.load_weights(weights)
    except Exception as e:
        raise UserError(f"--weights={weights!r} could not be loaded into {name!r} "
                        f"(alpha={alpha}, image_size={image_size}): {type(e).__name__}: {e}") from None


def feature_blocks(name: str, features: str) -> list[str]:
    """The blocks whose outputs the head reads, input to output (`--features`); [] for `top`,
    the base's own output. Needs no TensorFlow.

    Raises:
      UserError: an unknown block, one named twice, or `top`/`auto` combined with blocks.
    """
    names = list(get(name).block_names)
    if features == "top":
        return []
    if features == "auto":
        raise UserError("--features=auto is measured when a training run starts; here, name the block (the "
                        "linear probes' curve shows where they peak)")
    parts = features.split("+")
    if "auto" in parts or ("top" in parts and "top" not in names):  # some backbones have a block named top
        raise UserError(f"--features={features!r}: top and auto stand alone (not joined by +)")
    unknown = [p for p in parts if p not in names]
    if unknown:
        raise UserError(f"--features={features!r}: {', '.join(map(repr, unknown))} is not a block of {name}; "
                        f"its blocks (input to output): {', '.join(names)}")
    if len(set(parts)) != len(parts):
        raise UserError(f"--features={features!r} names a block twice")
    return [b for b in names if b in parts]


def kept_blocks(name: str, features: str) -> list[str]:
    """The blocks a model with these `--features` keeps: all of them up to the highest it reads."""
    names = list(get(name).block_names)
    read = feature_blocks(name, features)
    return names[:names.index(read[-1]) + 1] if read else names


def block_ends(base: keras.Model, name: str) -> dict[str, str]:
    """{block: the name of its last layer}, in the base's (topologically sorted) layer order."""
    block_of = get(name).block_of(base)
    return {block_of[layer.name]: layer.name for layer in base.layers}


def block_outputs(base: keras.Model, name: str) -> dict[str, keras.KerasTensor]:
    """{block: its output}: the tensor the next block's first layer reads (the last block's:
    the base's output). Probe taps and `cut` both read it. It is the block's last layer's
    output, except where an operation between layers makes the block's output: ConvNeXt's
    residual `+` comes after its last layer, which holds the residual branch alone."""
    block_of, order = get(name).block_of(base), blocks(base, name)
    first: dict[str, keras.layers.Layer] = {}
    for layer in base.layers:
        first.setdefault(block_of[layer.name], layer)
    last = block_ends(base, name)
    out = {order[-1]: base.outputs[0]}
    for block, following in zip(order, order[1:]):
        read = first[following]._inbound_nodes[0].input_tensors  # its call in this base
        out[block] = read[0] if len(read) == 1 else base.get_layer(last[block]).output
    return out


def cut(base: keras.Model, name: str, blocks: list[str]) -> keras.Model:
    """The base cut at its blocks' outputs: one output per block (`block_outputs`, where
    `research.model.probe` taps it); the layers above the
    highest block are not in it. Shares its layers, and so its variables, with `base`."""
    import keras
    at = block_outputs(base, name)
    outputs = [at[b] for b in blocks]
    return keras.Model(base.inputs, outputs if len(outputs) > 1 else outputs[0], name=base.name)


def build_classifier(base: keras.Model, num_classes: int, *, dropout: float = 0.2,
                     blocks: list[str] | None = None, norm: bool = True, pool: str = "avg") -> keras.Model:
    """Wraps a base model into the classifier the loop trains.

    The base is called with `training=False`; note that Keras 3.15 lets the outer
    call's `training=True` override it (keras issue 20285), which is why
    `research/model/unfreeze.py` freezes BatchNormalization layers themselves.

    A base cut at `blocks` (`--features=BLOCK` or `A+B`) has each output pooled and, with
    `norm` (`--features_norm=layer`), normalised on its own (LayerNormalization without
    parameters: mean 0 and variance 1 per image and block), then, for several blocks,
    concatenated. Pooled ReLU outputs below the top are mostly a positive offset shared
    by every image; on them the head, trained by Adam at a head's learning rate, barely
    learned (MobileNet's `conv_dw_9` on ants/bees: training loss 0.9, above chance's
    0.69, where a logistic regression on standardised features reaches 0.78), and
    normalised they train (docs/RESULTS.md, the features study). `top`, the default,
    stays as it always was: no normalisation. `pool` is the entry's (`pooled`).
    """
    import keras
    from keras import layers
    inputs = keras.Input(base.input_shape[1:], name="image")
    x = base(inputs, training=False)
    if blocks:
        outputs = x if isinstance(x, (list, tuple)) else [x]
        x = [_normalised(pooled(t, f"head_pool_{b}", pool), f"head_norm_{b}", norm)
             for b, t in zip(blocks, outputs, strict=True)]
        x = layers.Concatenate(name="head_concat")(x) if len(x) > 1 else x[0]
    else:
        x = pooled(x, "head_pool", pool)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    # The logits stay float32 under mixed precision: softmax/loss need the range.
    outputs = layers.Dense(num_classes, dtype="float32", name="head")(x)
    return keras.Model(inputs, outputs, name=f"{base.name}_classifier")


def pooled(x, name: str, pool: str = "avg"):
    """One vector per image from a block's output: the average over a feature map's
    positions (or a sequence's tokens), or, with `token`, a transformer's class token
    (its first), which is what ViTs are pretrained to classify from. Standard layers only,
    so that `model.keras` loads without custom objects."""
    from keras import layers
    if pool == "token":
        tokens = x.shape[1]
        return layers.Flatten(name=name)(layers.Cropping1D((0, tokens - 1), name=f"{name}_token")(x))
    return (layers.GlobalAveragePooling2D if len(x.shape) == 4 else layers.GlobalAveragePooling1D)(name=name)(x)


def leaf_layers(base: keras.Model) -> list[tuple[str, keras.layers.Layer]]:
    """Every layer holding variables of its own, with the name of the base's layer it is in
    (what `block_of` maps): the base's layers themselves, and the layers nested inside them
    (ConvNeXt's stem and downsampling layers are small Sequential models; a KerasHub block
    holds its attention and MLP layers), in the base's layer order, each followed by the
    layers inside it (in Keras's flattening order)."""
    out = []
    for layer in base.layers:
        for leaf in layer._flatten_layers(include_self=True, recursive=True):
            if leaf._trainable_variables or leaf._non_trainable_variables:
                out.append((layer.name, leaf))
    return out


def classifier_for(model_config, *, image_size: int, num_classes: int, features: str) -> tuple[keras.Model, keras.Model]:
    """`build_model` with a run's `ModelConfig` (backbone, alpha, dropout, `--features_norm`) and
    its resolved `features`: how runs, `load_run` and the export build the same model."""
    c = model_config
    return build_model(c.backbone, image_size=image_size, num_classes=num_classes, alpha=c.alpha,
                       dropout=c.dropout, features=features, norm=c.features_norm == "layer")


def _normalised(x, name: str, norm: bool):
    from keras import layers
    return layers.LayerNormalization(center=False, scale=False, name=name)(x) if norm else x


def build_model(name: str, *, image_size: int, num_classes: int, alpha: float = 1.0, dropout: float = 0.2,
                features: str = "top", norm: bool = True) -> tuple[keras.Model, keras.Model]:
    """The classifier of a run, freshly initialised, with the head on `features` (`top`, or
    resolved blocks: not `auto`); and the whole base, whose layers it shares, for the
    pretrained weights, which are the whole base's (`load_pretrained`).

    Returns:
      (classifier, whole base); with `top`, the classifier's base is the whole base.
    """
    whole = build_base(name, image_size=image_size, alpha=alpha)
    blocks = feature_blocks(name, features)
    base = cut(whole, name, blocks) if blocks else whole
    return build_classifier(base, num_classes, dropout=dropout, blocks=blocks, norm=norm, pool=get(name).pool), whole


def base_of(model: keras.Model) -> keras.Model:
    """The nested base model of a classifier built by `build_classifier`."""
    import keras
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            return layer
    raise ValueError("model has no nested base model")


def blocks(base: keras.Model, backbone: str) -> list[str]:
    """The ordered block names of a built base."""
    seen: list[str] = []
    for b in get(backbone).block_of(base).values():
        if b not in seen:
            seen.append(b)
    return seen
