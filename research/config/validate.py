"""`validate(config)`: every check that needs neither TensorFlow nor the data's contents,
and every path made absolute. Each section checks its own fields (its `validate`
method); the checks here are those that read two sections at once."""

from __future__ import annotations

import dataclasses
import os

from research.config.sections import ExperimentConfig, check
from research.model import hub


def resolve_paths(config: ExperimentConfig) -> ExperimentConfig:
    """Makes every path in the config absolute (`folder:`, `ckpt:`, weights files, data_dir, a
    `hub:` preset directory).

    `config.json` then names the same data from any working directory, and the
    same data given by a relative or an absolute path is the same config.
    """
    d, m = config.data, config.model
    ds = d.dataset
    if d.source.kind in ("folder", "tfrecord") and d.source.arg:
        ds = f"{d.source.kind}:{os.path.abspath(os.path.expanduser(d.source.arg))}"
    data_dir = os.path.abspath(os.path.expanduser(d.data_dir)) if d.data_dir else d.data_dir
    cache_dir = os.path.abspath(os.path.expanduser(d.cache_dir)) if d.cache_dir else d.cache_dir
    w = m.weights
    if m.init_run:
        w = "ckpt:" + os.path.abspath(os.path.expanduser(m.init_run))
    elif w not in ("imagenet", "none"):
        w = os.path.abspath(os.path.expanduser(w))
    backbone = m.backbone
    preset = backbone[len(hub.PREFIX):]
    if hub.is_hub(backbone) and os.path.exists(os.path.expanduser(preset)):  # a preset directory
        backbone = hub.PREFIX + os.path.abspath(os.path.expanduser(preset))
    cw = config.train.class_weight
    if cw not in ("none", "balanced"):
        cw = os.path.abspath(os.path.expanduser(cw))
    return dataclasses.replace(config, data=dataclasses.replace(d, dataset=ds, data_dir=data_dir, cache_dir=cache_dir),
                               model=dataclasses.replace(m, weights=w, backbone=backbone),
                               train=dataclasses.replace(config.train, class_weight=cw))


def validate(config: ExperimentConfig) -> ExperimentConfig:
    """Checks everything that needs neither TensorFlow nor the data's contents, except
    what the run's options (research/run/actions) check themselves:
    `research.run.preflight.validate` runs both.

    Runs in well under a second, before TensorFlow is imported. Unfreeze specs
    against the backbone's blocks are `research.run.preflight.validate`'s; what needs
    the data (class names, image files) is checked when it is loaded, before anything
    is written.

    Args:
      config: the experiment to check.

    Returns:
      The config with every path made absolute (`resolve_paths`).

    Raises:
      UserError: naming the bad value and the allowed values.
    """
    from research.model import backbones  # imports no TensorFlow: the registry is lazy

    config = resolve_paths(config)
    d, m, t = config.data, config.model, config.train
    d.validate()
    check(not (d.sampler == "balanced" and t.class_weight != "none"),
          f"--sampler=balanced and --class_weight={t.class_weight} both correct for class imbalance; use one of them")
    config.augment.validate()
    m.validate()
    entry = backbones.get(m.backbone)
    size = backbones.input_size(m.backbone, d.image_size)
    check(size >= entry.min_size,
          f"--image_size={size} is below the minimum input size {entry.min_size} of backbone {m.backbone!r}")
    check(not entry.max_size or size <= entry.max_size,
          f"--image_size={size} is above the input size {entry.max_size} of backbone {m.backbone!r} (its position "
          "embeddings are learned for that many patches)")
    t.validate()
    check(len(config.stages) >= 1, "at least one stage with epochs > 0 is needed (see --epochs, --stages, "
          "--head_epochs, --finetune_epochs)")
    names = [s.name for s in config.stages]
    check(len(set(names)) == len(names), f"stage names must be unique, got {names}")
    for s in config.stages:
        s.validate()
        check(not (s.zero_lr_steps and s.optimizer_of(t.optimizer) == "sgd"),
              f"stage {s.name!r}: zero_lr_steps estimates Adam's moments at learning rate 0; SGD's momentum stays "
              "0 at that rate, so the steps would be lost")
    for prev, s in zip((None, *config.stages), config.stages):
        if s.continue_schedule:
            check(prev is not None, f"stage {s.name!r}: continue_schedule needs a stage before it to continue")
            check(prev.optimizer_of(t.optimizer) == s.optimizer_of(t.optimizer),
                  f"stage {s.name!r}: continue_schedule goes on with the learning rate of stage {prev.name!r}, "
                  f"which is another optimizer's ({prev.optimizer_of(t.optimizer)}, not {s.optimizer_of(t.optimizer)})")
    ranks = sorted({s.spec.lora.k for s in config.stages if s.spec.lora is not None})
    check(len(ranks) <= 1, f"the stages ask for LoRA ranks {ranks}; a run has one LoRA rank (its factors are "
          "created once, before the first stage)")
    check(m.lora_alpha >= 0, f"--lora_alpha={m.lora_alpha} must be >= 0 (0: the rank)")
    check(not (m.lora_alpha and not ranks), f"--lora_alpha={m.lora_alpha} needs a lora:R unfreeze spec")
    # Each worker would measure on its own images (a tfrecord: source is read in shares) and
    # could choose another block, and so build another model.
    check(not (m.features == "auto" and t.strategy == "multi_worker"),
          "--features=auto is measured by each process on its own data; with --strategy=multi_worker, probe the "
          "blocks first and name the one they peak at (--features=BLOCK)")
    if d.refit:  # nothing to measure on: every decision that reads validation is refused
        es = t.early_stopping
        check(not (es.enabled and es.monitor.startswith("val")),
              f"--refit trains without validation: --early_stopping_monitor={es.monitor} has nothing to read "
              "(monitor train/loss, or give each stage its epochs)")
        check(not es.restore_best_weights, "--refit trains without validation: --restore_best_weights would "
              "restore the epoch of the lowest training loss, not a chosen one (its epochs are fixed)")
        check(m.features != "auto", "--refit trains without validation, which --features=auto's probes read")
        check(not t.cache_features, "--refit trains without validation, and --cache_features caches it too")
        check(not any(s.spec.auto is not None and s.spec.auto.method == "probe" for s in config.stages),
              "--refit trains without validation, which an auto:probe spec's probes read")
    return config
