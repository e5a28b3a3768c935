"""Which variables train: unfreeze specs, the BatchNorm policy, gradual unfreezing.

An unfreeze spec picks blocks of the backbone (ordered input -> output, see
`research/model/backbones.py`); the head is always trainable:

    none             head only (linear probe)
    all              every block
    top:K            the last K blocks
    auto:K           K blocks chosen at the stage's start: `auto:rgn:K` (the default
                     method) the K with the largest relative gradient norm,
                     `auto:probe:K` the K above the linear probes' peak
                     (research/model/probe.py); recorded in trainable.json
    blocks:a,b,...   exactly these blocks (surgical fine-tuning)
    from:NAME        block NAME and every block above it
    regex:PATTERN    base variables whose path matches PATTERN (re.search)
    norm             the normalisation layers' scale and offset (BatchNorm, LayerNorm
                     and GroupNorm gamma/beta) in every block (Frankle et al. 2021)
    bias             every bias of the base plus the normalisation offsets (beta):
                     BitFit (Ben Zaken et al. 2022). Where the convolutions have no
                     bias (mobilenet, mobilenet_v2, inception_v3, xception, small_cnn)
                     it is the offsets alone; resnet50 has 53 biases, efficientnet_b0
                     32 (its squeeze-excite convolutions), vgg16 13 and no norm layer
    lora:R[@SPEC]    LoRA of rank R (`--lora_alpha`) on the Conv/Dense layers of SPEC's
                     blocks (default all): only the factors train (research/model/lora.py)
    A+B              the union of what each part trains: `top:2+norm`, `bias+norm`

`norm` and `bias` train parameters by kind, not blocks: under the default BatchNorm
policy the BatchNorm layers whose gamma/beta they train stay in inference mode (their
moving statistics frozen); with `--bn=train` those layers run on batch statistics.

A spec resolves to an explicit, ordered list of variables (`Selection.variables`);
the training step differentiates and updates exactly that list and nothing else.

BatchNorm policy: by default every BatchNormalization layer is frozen *as a layer*
(`layer.trainable = False`), which in Keras means inference mode (moving
statistics used, never updated) and gamma/beta excluded. Passing
`base(x, training=False)` is not enough in Keras 3.15: an outer call with
`training=True` overrides it (keras issue 20285). With `train_bn=True` the BN
layers of unfrozen blocks train (batch statistics, moving-average updates,
gamma/beta); BN layers of frozen blocks stay frozen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from research.model import backbones
from research.config import SPEC_FORMS, UnfreezeSpec
from research.config.specs import PARAM_KINDS
from research.errors import UserError

if TYPE_CHECKING:
    import keras

SPEC_HELP = ", ".join(SPEC_FORMS)


@dataclass
class Selection:
    """The resolved result of one spec on one model.

    Attributes:
      spec: the spec text.
      blocks: unfrozen block names, input to output (whole blocks: a `norm` or `bias`
        part adds none).
      variables: every variable that trains (base selection, then head), in model order.
      bn_trainable: names of BN layers that train (empty under the default policy).
      lr_multipliers: `{variable path: multiplier}` for layer-wise LR decay (only != 1 entries).
    """

    spec: str
    blocks: list[str]
    variables: list
    bn_trainable: list[str]
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    kinds: dict[str, list[str]] = field(default_factory=dict)  # {"norm"|"bias"|"lora": paths of its variables}
    lora_skipped: list[str] = field(default_factory=list)  # layers of a lora: part's blocks Keras has no LoRA for

    @property
    def paths(self) -> list[str]:
        return [v.path for v in self.variables]


def as_spec(spec: UnfreezeSpec | str) -> UnfreezeSpec:
    """A spec given as text (a test, a tool) parsed; a config's is parsed already (`StageConfig.spec`)."""
    return spec if isinstance(spec, UnfreezeSpec) else UnfreezeSpec.parse(spec)


def resolve_blocks(spec: UnfreezeSpec | str, block_names: list[str], *, backbone: str = "") -> list[str]:
    """Resolves a block-based spec to the unfrozen blocks, input to output.

    `regex:` specs select variables, not blocks: they return [] here and are
    handled by `select`.

    Raises:
      UserError: unknown spec kind, unknown block, K out of range; the message
        lists the backbone's valid blocks.
    """
    valid = f"valid blocks of {backbone or 'this backbone'} (input to output): {', '.join(block_names)}"
    try:
        spec = as_spec(spec)
    except UserError as e:
        raise UserError(f"{e}; {valid}") from None
    kind, arg, text = spec.kind, spec.arg, spec.text
    n = len(block_names)
    if kind == "+":
        chosen = {b for part in spec.parts for b in resolve_blocks(part, block_names, backbone=backbone)}
        return [b for b in block_names if b in chosen]
    if kind in PARAM_KINDS:  # parameters by kind, in every block: `select`
        return []
    if kind == "lora":  # the factors of its blocks' layers, not whole blocks: `select`
        resolve_blocks(spec.inner, block_names, backbone=backbone)
        return []
    if kind == "auto":  # chosen at the stage's start (research/run/actions/auto_unfreeze.py); here only K is checked
        if not 1 <= spec.k <= n:
            raise UserError(f"unfreeze spec {text!r}: K={spec.k} is not in 1..{n}; {valid}")
        return list(block_names)
    if kind == "none":
        return []
    if kind == "all":
        return list(block_names)
    if kind == "top":
        if not 0 <= spec.k <= n:
            raise UserError(f"unfreeze spec {text!r}: K must be an integer in 0..{n}; {valid}")
        return list(block_names[n - spec.k:]) if spec.k else []
    if kind == "blocks":
        wanted = [b.strip() for b in arg.split(",") if b.strip()]
        unknown = [b for b in wanted if b not in block_names]
        if not wanted or unknown:
            raise UserError(f"unfreeze spec {text!r}: unknown block {', '.join(unknown) or '(none given)'}; {valid}")
        return [b for b in block_names if b in wanted]
    if kind == "from":
        if arg not in block_names:
            raise UserError(f"unfreeze spec {text!r}: unknown block {arg!r}; {valid}")
        return list(block_names[block_names.index(arg):])
    if kind == "regex":  # UnfreezeSpec.parse compiled it already
        return []
    raise UserError(f"unfreeze spec {text!r} is not valid; allowed forms: {SPEC_HELP}; {valid}")


def _is_bn(layer) -> bool:
    import keras  # here, not at the top: specs are resolved before TensorFlow starts
    return isinstance(layer, keras.layers.BatchNormalization)


KIND_MEANING = {"norm": "the gamma/beta of BatchNorm, LayerNorm and GroupNorm layers",
                "bias": "every bias, plus the normalisation layers' beta",
                "lora": "LoRA factors, on the Conv and Dense layers of its blocks (Keras has no LoRA for depthwise "
                        "and separable convolutions)"}


def _is_norm(layer) -> bool:
    import keras
    return isinstance(layer, (keras.layers.BatchNormalization, keras.layers.LayerNormalization,
                              keras.layers.GroupNormalization))


def param_kinds(layer, variable) -> set[str]:
    """What `norm` and `bias` call this variable: {"norm"}, {"bias"}, both (a norm's beta) or none."""
    name = variable.path.rsplit("/", 1)[-1]
    kinds = set()
    if _is_norm(layer) and name in ("gamma", "beta"):
        kinds.add("norm")
    if name == "bias" or (_is_norm(layer) and name == "beta"):
        kinds.add("bias")
    return kinds


LORA_FACTORS = ("lora_kernel_a", "lora_kernel_b")  # what Keras's enable_lora adds (research/model/lora.py)


def is_lora_factor(variable) -> bool:
    return variable.path.rsplit("/", 1)[-1] in LORA_FACTORS


def has_kernel(layer) -> bool:
    """A layer with a kernel (Conv, Dense, depthwise or separable convolutions), which LoRA could adapt."""
    return any("kernel" in v.path.rsplit("/", 1)[-1] and not is_lora_factor(v) for v in candidates(layer))


def candidates(layer) -> list:
    """The layer's own variables created trainable (not its nested layers'), whatever
    `layer.trainable` says now.

    `layer.trainable_weights` is empty once a layer is frozen, but a later stage
    may unfreeze it again; Keras keeps the created-trainable list privately.
    """
    return list(layer._trainable_variables)


def head_variables(model: keras.Model) -> list:
    """Every variable of the classifier outside its base: the head, whatever `--features` made it."""
    base = backbones.base_of(model)
    return [v for layer in model.layers if layer is not base for v in candidates(layer)]


def layer_blocks(model: keras.Model, backbone: str) -> tuple[keras.Model, dict[str, str], list[str]]:
    base = backbones.base_of(model)
    block_of = backbones.get(backbone).block_of(base)
    return base, block_of, backbones.blocks(base, backbone)


def select(model: keras.Model, backbone: str, spec: UnfreezeSpec | str, *, train_bn: bool = False,
           lr_decay_per_block: float = 1.0, base_lr_ratio: float = 1.0, limit_top: int | None = None) -> Selection:
    """Resolves `spec` on a classifier built by `backbones.build_classifier`.

    Args:
      model: the classifier.
      backbone: its registry name (gives the block map).
      spec: the unfreeze spec.
      train_bn: the BatchNorm policy (see module docstring).
      lr_decay_per_block: LR multiplier per block below the top block of the
        whole backbone (timm's layer decay; 1.0 disables it).
      base_lr_ratio: LR multiplier of every base variable (the head's is 1), times the decay.
      limit_top: gradual unfreezing: keep only the top `limit_top` of the spec's blocks.

    Returns:
      The selection; it does not change the model (see `apply_policy`).

    Raises:
      UserError: invalid spec, or a regex that matches no base variable.
    """
    spec = as_spec(spec)
    base, block_of, names = layer_blocks(model, backbone)
    chosen = resolve_blocks(spec, names, backbone=backbone)
    regexes = [re.compile(p.arg) for p in spec.each if p.kind == "regex"]
    by_kind = {p.kind for p in spec.each if p.kind in PARAM_KINDS}
    lora_blocks = set(resolve_blocks(spec.lora.inner, names, backbone=backbone)) if spec.lora else set()
    if spec.lora:
        by_kind.add("lora")
    if limit_top is not None:
        chosen = chosen[max(0, len(chosen) - limit_top):]
    chosen_set = set(chosen)
    variables, bn_trainable, regex_blocks = [], [], []
    kinds: dict[str, list[str]] = {k: [] for k in sorted(by_kind)}
    leaves = backbones.leaf_layers(base)
    for top, layer in leaves:
        bn, block = _is_bn(layer), block_of[top]
        for v in candidates(layer):
            # Whole blocks and regexes take BatchNorm's gamma/beta only with --bn=train.
            in_block = block in chosen_set and (train_bn or not bn)
            matched = any(r.search(v.path) for r in regexes) and (train_bn or not bn)
            of_kind = param_kinds(layer, v) & by_kind
            if block in lora_blocks and getattr(layer, "lora_enabled", False) and is_lora_factor(v):
                of_kind = of_kind | {"lora"}
            if not (in_block or matched or of_kind):
                continue
            variables.append(v)
            for k in sorted(of_kind):
                kinds[k].append(v.path)
            if bn and train_bn and layer.name not in bn_trainable:
                bn_trainable.append(layer.name)
            if matched and block not in regex_blocks:
                regex_blocks.append(block)
    empty = [k for k, paths in kinds.items() if not paths]
    if empty:
        raise UserError(f"unfreeze spec {spec.text!r}: {backbone} has no {' or '.join(empty)} parameters "
                        f"({'; '.join(KIND_MEANING[k] for k in empty)})")
    if regexes:
        if not regex_blocks:
            paths = [v.path for _, layer in leaves for v in candidates(layer)][:8]
            raise UserError(f"unfreeze spec {spec.text!r} matches no trainable base variable "
                            f"(BN gamma/beta count only with --train_bn); example paths: {', '.join(paths)}; "
                            f"blocks: {', '.join(names)}")
        chosen = [b for b in names if b in chosen_set or b in regex_blocks]
    mult = {}
    if lr_decay_per_block != 1.0 or base_lr_ratio != 1.0:
        depth = {b: len(names) - 1 - i for i, b in enumerate(names)}
        layer_of = {id(v): layer.name for layer in base.layers for v in layer.weights}
        for v in variables:
            m = lr_decay_per_block ** depth[block_of[layer_of[id(v)]]] if lr_decay_per_block != 1.0 else 1.0
            m = m * base_lr_ratio if base_lr_ratio != 1.0 else m
            if m != 1.0:
                mult[v.path] = float(m)
    # LoRA is enabled, at build, on every layer of these blocks Keras has it for: the others are skipped.
    skipped = [layer.path for top, layer in leaves if block_of[top] in lora_blocks and has_kernel(layer)
               and not getattr(layer, "lora_enabled", False)]
    return Selection(spec.text, chosen, variables + head_variables(model), bn_trainable, mult, kinds, skipped)


def apply_policy(model: keras.Model, backbone: str, selection: Selection) -> None:
    """Sets `layer.trainable` to match a selection.

    The step's variable list is what decides what trains; the flags matter for
    BatchNormalization (inference mode) and keep `model.trainable_variables`
    and summaries honest. Call before the step function is traced.
    """
    base = backbones.base_of(model)
    selected = {id(v) for v in selection.variables}
    for _, layer in backbones.leaf_layers(base):
        if _is_bn(layer):
            layer.trainable = layer.name in selection.bn_trainable
        else:
            layer.trainable = any(id(v) in selected for v in layer.weights)


def trainable_union(model: keras.Model, selections: list[Selection]) -> list:
    """Every variable any of `selections` trains, in model order: what an optimizer is
    built on (the selections of the stages it steps), so its checkpoint layout never
    changes between stages."""
    ids = {id(v) for sel in selections for v in sel.variables}
    ordered = list(backbones.base_of(model).weights) + head_variables(model)
    return [v for v in {id(v): v for v in ordered}.values() if id(v) in ids]


def count_params(variables) -> int:
    return int(sum(np.prod(v.shape) for v in variables))


BN_POLICY_MEANING = {
    "frozen": "BatchNorm layers in inference mode: moving statistics and gamma/beta fixed",
    "train": "BatchNorm layers of unfrozen blocks train: batch statistics, moving-average updates, gamma/beta",
    "adapt": "BatchNorm frozen, moving statistics re-estimated on the training images at each stage start",
}
_LAYER_NORMS = ("LayerNorm and GroupNorm keep no statistics: their gamma/beta train with their block under "
                "every policy")


def normalisation(model: keras.Model, bn: str) -> dict:
    """What `--bn` means on this model: its normalisation layers by kind, and the policy in words."""
    counts: dict[str, int] = {}
    for _, layer in backbones.leaf_layers(backbones.base_of(model)):
        if _is_norm(layer):
            counts[type(layer).__name__] = counts.get(type(layer).__name__, 0) + 1
    meaning = (BN_POLICY_MEANING[bn] if counts.get("BatchNormalization")
               else "no BatchNorm layer: the policy changes nothing")
    if set(counts) - {"BatchNormalization"}:
        meaning += "; " + _LAYER_NORMS
    return {"bn": bn, "layers": counts, "meaning": meaning}


def describe(selection: Selection, model: keras.Model, *, stage: str, bn: str = "frozen") -> dict:
    """The `trainable.json` record of one stage (`bn`: the run's BatchNorm policy)."""
    trainable = count_params(selection.variables)
    total = count_params(model.weights)
    base_weights = backbones.base_of(model).weights
    base_ids = {id(v) for v in base_weights}
    by_path = {v.path: v for v in base_weights}
    loaded = [v for v in base_weights if not is_lora_factor(v)]
    return {
        "stage": stage,
        "spec": selection.spec,
        "blocks": selection.blocks,
        "bn_trainable": selection.bn_trainable,
        "trainable_params": trainable,
        "frozen_params": total - trainable,
        # The backbone's size as Keras counts it (every weight, BatchNorm statistics included),
        # without LoRA factors: what was loaded, what a trained share is a share of.
        "backbone_params": count_params(loaded),
        "backbone_trained_params": count_params([v for v in selection.variables if id(v) in base_ids]),
        "parameter_kinds": {k: {"variables": len(paths), "params": count_params([by_path[p] for p in paths]),
                                **({"skipped_layers": selection.lora_skipped} if k == "lora" else {})}
                            for k, paths in selection.kinds.items()},
        "num_variables": len(selection.variables),
        "variables": selection.paths,
        "lr_multipliers": selection.lr_multipliers,
        "normalisation": normalisation(model, bn),
    }


def summary_text(record: dict, *, markdown: bool = True) -> str:
    """A short summary: Markdown for TensorBoard, plain text for the terminal.

    TensorBoard's text plugin joins lines without a blank line between them into
    one paragraph, so the Markdown list is a proper list (blank line before it).
    """
    kinds = record.get("parameter_kinds") or {}
    blocks = ", ".join(record["blocks"]) or ("(none)" if kinds else "(none: head only)")
    if kinds:  # what `norm` and `bias` found on this backbone
        blocks += "; " + ", ".join(f"{k}: {c['variables']} variables, {c['params']:,} params"
                                   for k, c in kinds.items())
    if not markdown:
        return (f"stage {record['key'] if 'key' in record else record['stage']}: spec {record['spec']}; "
                f"unfrozen blocks: {blocks}; trainable params {record['trainable_params']:,}, "
                f"frozen {record['frozen_params']:,}; BN layers training: {len(record['bn_trainable'])}")
    lines = [
        f"**stage {record['stage']}** spec `{record['spec']}`",
        "",
        f"- unfrozen blocks: {blocks}",
        f"- trainable params: {record['trainable_params']:,}; frozen params: {record['frozen_params']:,}",
        f"- trainable variables: {record['num_variables']}; BN layers training: {len(record['bn_trainable'])}",
    ]
    return "\n".join(lines)
