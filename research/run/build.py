"""Building a run: its inputs, its model, the one optimizer, the initial weights and
the class weights. Runs, the probes and the LR finder all build here, so each is
built one way (the Keras guide's recipe, research/studies/guide.py, builds its own
model on purpose: it is the reference this codebase is measured against).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass

import keras
import tensorflow as tf
from absl import logging

from research.config import ExperimentConfig
from research.data import pipeline as data_lib
from research.data import sources
from research.errors import UserError
from research.model import backbones, unfreeze
from research.model import lora as lora_lib
from research.model.optim import StageSchedule, build_optimizer
from research.run import checkpoints, distribute


def build_inputs(config: ExperimentConfig, strategy, *, cache_dir: str | None = None,
                 verbose: bool = True, scores_test: bool = True) -> tuple[sources.Source, data_lib.Pipeline]:
    """Loads the data (every image not checked before is checked) and builds the input
    pipeline; says what it found. Writes nothing: `Pipeline.prepare` does, later.

    Args:
      cache_dir: the disk cache and the folder check's results, unless `--cache_dir`
        names one (None: neither is kept; `disk` then falls back to `none`).
      scores_test: whether the caller scores the test split (a run does; the LR
        range test does not), for what it says about test.

    Raises:
      UserError: missing or unreadable data, unknown classes or splits.
    """
    cfg_d = config.data
    entry = backbones.get(config.model.backbone)
    size = backbones.input_size(config.model.backbone, cfg_d.image_size)
    cache_dir = cfg_d.cache_dir or cache_dir
    source = sources.load_source(cfg_d, size, cache_dir=cache_dir, worker=distribute.worker_of(strategy))
    if source.skipped:
        logging.warning("skipped %d unreadable image(s), e.g. %s", len(source.skipped), source.skipped[0])
    mode, why = data_lib.choose_cache(cfg_d.cache, source.num_train + source.num_val, size)
    if mode == "disk" and not cache_dir:
        mode, why = "none", why + "; no cache directory here, so none"
    if verbose:
        names = ", ".join(source.class_names[:10]) + (", ..." if source.num_classes > 10 else "")
        shard = (f" (worker {source.shard[0]} of {source.shard[1]} reads its own {source.num_train})"
                 if source.shard[1] > 1 else "")
        print(f"data: {cfg_d.dataset}: {source.num_classes} classes ({names}); {source.num_train} training{shard}, "
              f"{source.num_val} validation and {source.num_test} test images at {size}x{size} px"
              + (f"; skipped {len(source.skipped)} unreadable" if source.skipped else ""), flush=True)
        print(f"cache: {mode}" + (f" in {cache_dir}" if mode == "disk" else "")
              + (f" ({why})" if cfg_d.cache != mode or cfg_d.cache == "auto" else ""), flush=True)
        print(f"test: {source.test_from}" + ("; not used here" if not scores_test else
                                             "; evaluated once, at the end of the run" if source.test else
                                             "; the run reports validation numbers only"), flush=True)
        print(f"model: {config.model.backbone} (weights {config.model.weights}); "
              f"{distribute.describe(strategy)}, {config.train.precision}", flush=True)
    pipeline = data_lib.Pipeline(source, batch_size=cfg_d.batch_size, preprocess=entry.preprocess,
                                 augment=config.augment, seed=config.train.seed, cache=mode, cache_dir=cache_dir,
                                 shuffle_buffer=cfg_d.shuffle_buffer,
                                 threads=data_lib.pipeline_threads(cfg_d.threads,
                                                                   cached=mode != "none" or source.decoded),
                                 deterministic=config.train.deterministic, sampler=cfg_d.sampler,
                                 eval_crop=cfg_d.eval_crop, replicas=strategy.num_replicas_in_sync)
    return source, pipeline


def cache_dir(workdir: str, strategy, chief: bool) -> str:
    """`WORKDIR/cache`; a non-chief worker, which writes nothing into the workdir, keeps
    its own under the system's temporary directory (the same one on every resume)."""
    if chief:
        return os.path.join(workdir, "cache")
    index, _ = distribute.worker_of(strategy)
    return os.path.join(tempfile.gettempdir(), f"research-cache-{sources.fingerprint(workdir)}-worker{index}")


def prepare_inputs(pipeline: data_lib.Pipeline) -> None:
    """`Pipeline.prepare`, logged: the check's results and the disk cache written,
    the memory cache filled."""
    seconds = pipeline.prepare()
    if seconds > 1:
        logging.info("prepared the %s cache of %d training images in %.1fs", pipeline.cache,
                     pipeline.source.num_train, seconds)


def class_weights(config: ExperimentConfig, source: sources.Source) -> list[float] | None:
    """The per-class loss weights of `--class_weight` on this source's training split (None: unweighted)."""
    cw = config.train.class_weight
    return sources.class_weights(cw, source.class_names, source.class_counts() if cw == "balanced" else [])


@dataclass
class Model:
    """The run's classifier, its backbone, its optimizer (and the stages' own) and the
    per-stage LR schedule."""

    model: keras.Model
    base: keras.Model
    optimizer: keras.optimizers.Optimizer
    schedule: StageSchedule
    image_size: int
    lora: lora_lib.Plan = dataclasses.field(default_factory=lambda: lora_lib.Plan([], []))
    whole: keras.Model | None = None  # the uncut base (`--features`): pretrained weights load into it
    features: str = "top"  # what the head reads, resolved
    # `StageConfig.optimizer`s other than the run's, by name; each counts its own steps.
    stage_optimizers: dict[str, keras.optimizers.Optimizer] = dataclasses.field(default_factory=dict)
    optimizer_name: str = "adam"  # the run's (`--optimizer`)

    def optimizer_for(self, stage) -> keras.optimizers.Optimizer:
        return self.stage_optimizers.get(stage.optimizer_of(self.optimizer_name), self.optimizer)

    def step(self) -> int:
        """The run's optimizer steps: every optimizer's, as each step is one optimizer's."""
        return sum(int(o.iterations.numpy()) for o in (self.optimizer, *self.stage_optimizers.values()))


def build(config: ExperimentConfig, num_classes: int, strategy: tf.distribute.Strategy, *,
          features: str | None = None) -> Model:
    """Builds the classifier (freshly initialised) and the run's one optimizer.

    `features`: what the head reads, resolved (`--features=auto` is measured first,
    `research.run.head_features`); None: `--features` as given.

    Each optimizer (the run's, and each other one a stage names) is built on the union
    of the variables of the stages it steps, inside the strategy scope (keras issue
    23085), so its slot layout is the same for every stage and every checkpoint.

    Raises:
      UserError: an unfreeze spec that does not fit the backbone, in any stage
        (checked before anything is written or trained).
    """
    cfg_m = config.model
    size = backbones.input_size(cfg_m.backbone, config.data.image_size)
    with strategy.scope():
        features = features or cfg_m.features
        model, whole = backbones.classifier_for(cfg_m, image_size=size, num_classes=num_classes, features=features)
        base = backbones.base_of(model)
        lora = lora_lib.enable(model, cfg_m.backbone, config)  # before the optimizer: its factors are in it
        selections = [unfreeze.select(model, cfg_m.backbone, s.spec, train_bn=cfg_m.train_bn)
                      for s in config.stages]
        schedule = StageSchedule()
        scaled, run_name = config.train.precision == "mixed_float16", config.train.optimizer
        names = [s.optimizer_of(run_name) for s in config.stages]
        optimizers = {}
        for name in dict.fromkeys([run_name, *names]):  # the run's first: its checkpoint key is `optimizer`
            optimizers[name] = build_optimizer(config.train, schedule, name=name, loss_scale=scaled)
            optimizers[name].build(unfreeze.trainable_union(
                model, [sel for sel, n in zip(selections, names) if n == name]))
        optimizer = optimizers.pop(run_name)
    return Model(model, base, optimizer, schedule, size, lora, whole, features, optimizers, run_name)


def init_weights(config: ExperimentConfig, m: Model) -> None:
    """The initialisation of a new run: pretrained weights into the backbone, head skipped.

    Raises:
      UserError: weights that cannot be fetched, read or fitted.
    """
    cfg_m = config.model
    w = cfg_m.weights
    if w in ("none", ""):
        return
    # A weights file knows no LoRA factors, and another run's checkpoint has its own (or none)
    # and its own cut (`--features`): the weights load into a twin shaped like their source,
    # whose whole base starts as a copy of this one (so what is not loaded keeps this run's
    # own initialisation), then come over, whole base to whole base by position (layers
    # keras.applications leaves unnamed are numbered differently in every build), with any
    # factors merged into their kernels.
    source = None  # the other run's config (a missing run is init_from_run's to report)
    if cfg_m.init_run and os.path.exists(os.path.join(cfg_m.init_run, "config.json")):
        source = checkpoints.load_config(cfg_m.init_run)
    source_rank = lora_lib.rank_of(source) if source else 0
    source_features = checkpoints.run_features(source, checkpoints.find_run_checkpoint(cfg_m.init_run)) \
        if source else "top"
    kept = backbones.kept_blocks(cfg_m.backbone, m.features)
    if len(kept) > len(backbones.kept_blocks(cfg_m.backbone, source_features)):
        raise UserError(f"--weights=ckpt:{cfg_m.init_run}: that run's model stops at its --features "
                        f"({source_features}), below {kept[-1]}, which this run keeps: those blocks would start "
                        "untrained; read at most what it kept (--features), or start from a run with the whole base")
    whole = m.whole or m.base
    target_whole = target = whole  # where the weights load
    if m.lora.layers or source_rank or source_features != "top":
        twin, target_whole = backbones.build_model(cfg_m.backbone, image_size=m.image_size, num_classes=1,
                                                   alpha=cfg_m.alpha, features=source_features)
        if source_rank:
            lora_lib.enable(twin, cfg_m.backbone, source)
        lora_lib.copy_loaded(whole, target_whole)
        target = backbones.base_of(twin) if source else target_whole  # a run's checkpoint holds its model's base
    if cfg_m.init_run is None:
        backbones.load_pretrained(target, cfg_m.backbone, w, image_size=m.image_size, alpha=cfg_m.alpha)
    else:
        first = None
        if cfg_m.init_blocks:
            names = backbones.blocks(target, cfg_m.backbone)
            if cfg_m.init_blocks > len(names):
                raise UserError(f"--init_blocks={cfg_m.init_blocks} exceeds the {len(names)} blocks of "
                                f"{cfg_m.backbone}: {', '.join(names)}")
            first = names[:cfg_m.init_blocks]
        path = checkpoints.init_from_run(target, cfg_m.init_run, first_blocks=first,
                                         block_of=backbones.get(cfg_m.backbone).block_of(target))
        logging.info("initialised the backbone from %s%s", path, f" (blocks {first})" if first else "")
    if target_whole is not whole:
        lora_lib.copy_loaded(target_whole, whole)


def seed_variables(model: keras.Model) -> list:
    """The model's random-generator states (dropout): not part of a
    tf.train.Checkpoint, so they travel in the run state."""
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights]
