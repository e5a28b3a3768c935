"""LoRA on the backbone (`lora:R` and `lora:R@SPEC` unfreeze specs), through Keras's own
`enable_lora`: the effective kernel is `kernel + (A @ B) * alpha / R`, B starting at zero,
so a LoRA model computes exactly what the model without it computes until it trains.

Keras 3.15 has LoRA for `Dense`, `EinsumDense`, `Embedding` and the `Conv` layers, not
for depthwise or separable convolutions: those are named as skipped (`plan`).

One rank per run, and LoRA is enabled once, when the model is built, on every layer
any stage's `lora:` part names: its factors exist before the run's one optimizer is
built, so a `none` -> `lora:8` -> `all` schedule keeps one slot layout and resumes
exactly. A stage trains the factors of its own part's blocks only; the kernels they
update stay as loaded (bit-identical) in a `lora:` stage. Export merges the factors into
the kernels (`merged_weights`): the exported model has no LoRA layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from research.config import ExperimentConfig
from research.model import backbones, unfreeze

if TYPE_CHECKING:
    import keras

FACTORS = unfreeze.LORA_FACTORS
is_factor = unfreeze.is_lora_factor


def rank_of(config: ExperimentConfig) -> int:
    """The run's LoRA rank (0: no stage uses LoRA; `validate` allows one rank per run)."""
    return next((s.spec.lora.k for s in config.stages if s.spec.lora is not None), 0)


def _supports(layer) -> bool:
    return hasattr(layer, "enable_lora") and getattr(layer, "kernel_constraint", None) is None


@dataclass
class Plan:
    """Where LoRA goes: `layers` get it; `skipped` are layers with kernels in those blocks
    that Keras has no LoRA for (depthwise and separable convolutions)."""

    layers: list[str]
    skipped: list[str]


def plan(base: keras.Model, block_of: dict[str, str], blocks: list[str]) -> Plan:
    """The layers of `blocks` that get LoRA, in model order."""
    wanted = set(blocks)
    layers, skipped = [], []
    for top, layer in backbones.leaf_layers(base):
        if block_of.get(top) in wanted and unfreeze.has_kernel(layer):
            (layers if _supports(layer) else skipped).append(layer.path)  # nested names repeat; paths do not
    return Plan(layers, skipped)


def enable(model: keras.Model, backbone: str, config: ExperimentConfig) -> Plan:
    """Enables LoRA (the run's rank, `--lora_alpha`) on every layer any stage's `lora:` part
    names. Call once, right after building the model and before the optimizer."""
    rank = rank_of(config)
    if not rank:
        return Plan([], [])
    base, block_of, names = unfreeze.layer_blocks(model, backbone)
    # An `auto:K` inside a part resolves to every block here: the stage chooses later.
    blocks = {b for s in config.stages if s.spec.lora is not None
              for b in unfreeze.resolve_blocks(s.spec.lora.inner, names, backbone=backbone)}
    where = plan(base, block_of, [b for b in names if b in blocks])
    alpha = config.model.lora_alpha or None  # 0: Keras's default, the rank (a scale of 1)
    chosen = set(where.layers)
    for _, layer in backbones.leaf_layers(base):
        if layer.path in chosen:
            layer.enable_lora(rank, lora_alpha=alpha)
    return where


def enabled_layers(model: keras.Model) -> list:
    return [layer for _, layer in backbones.leaf_layers(backbones.base_of(model)) if getattr(layer, "lora_enabled", False)]


def merged_weights(model: keras.Model) -> list:
    """The weights of the same model (or base) without LoRA, in its order: each LoRA layer's
    kernel with its factors merged in (`layer.kernel`, in the kernel's dtype), the factors left out."""
    lora_kernels = {id(layer._kernel): layer for layer in model._flatten_layers(include_self=False)
                    if getattr(layer, "lora_enabled", False)}
    return [(lora_kernels[id(v)].kernel if id(v) in lora_kernels else v).numpy()
            for v in model.weights if not is_factor(v)]


def copy_loaded(source: keras.Model, target: keras.Model) -> None:
    """Copies one base's weights into another of the same backbone, with or without LoRA on
    either side: every weight but the factors, the source's factors merged into its kernels."""
    targets = [v for v in target.weights if not is_factor(v)]
    for v, value in zip(targets, merged_weights(source), strict=True):
        v.assign(value)
