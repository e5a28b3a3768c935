"""`train_and_evaluate(config, workdir)`: one experiment, all its stages, resumable.

This is the eager outer loop. Per stage it resolves the unfreeze spec, makes a
fresh traced step for that variable list, then per epoch: train (in calls of
`steps_per_loop` steps), evaluate, write summaries, update early stopping,
save `ckpt/` (and `best/` on an improvement). At the end it writes
`results.json`.

Workdir layout (a contract, see DESIGN.md):
  config.json  ckpt/  best/  train/  val/  trainable.json  results.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from research import backbones, checkpoints, data, distribute, unfreeze
from research.config import ExperimentConfig, UserError, validate
from research.early_stopping import EarlyStopping
from research.features import FeatureCache
from research.loop import COUNT, NUM_SUMS, Trainer, metrics_from_sums
from research.optim import StageSchedule, build_optimizer, current_lr, loss_scale_value
from research.summaries import Summaries

# Config fields that may change on resume: they change speed or bookkeeping, not the maths.
RESUME_SAFE_FIELDS = {"train.steps_per_loop", "train.checkpoint_keep", "train.checkpoint_every_steps",
                      "train.histogram_every_epochs", "train.strategy", "train.collective_timeout", "train.export", "train.cache_features"}


class Interrupted(Exception):
    """SIGTERM/SIGINT: a checkpoint was saved and the run can be resumed."""

    def __init__(self, signum: int, path: str):
        super().__init__(f"interrupted by {signal.Signals(signum).name}; checkpoint saved at {path}; "
                         "run the same command again to resume")
        self.signum = signum


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite."""


class Preemption:
    """Turns SIGTERM/SIGINT into a flag the loop checks between step calls, so the
    current steps finish and a checkpoint is written before exiting."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        if self.signum:  # a second signal: give up waiting
            raise KeyboardInterrupt
        self.signum = signum
        logging.warning("received %s: finishing the current steps, then saving a checkpoint",
                        signal.Signals(signum).name)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, dict) for x in v):
            v = {str(i): x for i, x in enumerate(v)}
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _diff_configs(old: dict, new: dict) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    # A key the old config lacks was added to the code since: its default applies.
    return sorted(k for k in set(a) | set(b) if k in a and a.get(k) != b.get(k) and k not in RESUME_SAFE_FIELDS)


def _atomic_write_json(path: str, obj) -> None:
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o).__name__)


def prepare_workdir(workdir: str, config: ExperimentConfig, *, allow_config_change: bool, write: bool) -> bool:
    """Creates the workdir and checks a resumed run's config.

    Returns:
      True when the workdir already holds a run (resume).

    Raises:
      UserError: not writable, or a changed config without `allow_config_change`.
    """
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--workdir={workdir!r} cannot be created: {e.strerror}") from None
    if write and not os.access(workdir, os.W_OK):
        raise UserError(f"--workdir={workdir!r} is not writable")
    path = os.path.join(workdir, "config.json")
    existing = os.path.exists(path)
    if existing:
        with open(path) as f:
            old = json.load(f)
        new = json.loads(json.dumps(config.to_dict()))
        diff = _diff_configs(old, new)
        if diff and not allow_config_change:
            shown = "; ".join(f"{k}: {_flatten(old).get(k)!r} -> {_flatten(new).get(k)!r}" for k in diff[:6])
            raise UserError(f"--workdir={workdir!r} holds a run with a different config; changed: "
                            f"{', '.join(diff)} ({shown}); "
                            "use another --workdir, or pass --allow_config_change to resume anyway")
    if write:
        _atomic_write_json(path, config.to_dict())
    return existing


def _seed_variables(model) -> list:
    """The model's random-generator states (dropout): not part of a
    tf.train.Checkpoint, so they travel in the checkpoint's meta JSON."""
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def _monitor_value(monitor: str, train: dict, val: dict) -> float | None:
    split, _, name = monitor.partition("/")
    return (val if split == "val" else train).get(name)


def build_model_and_optimizer(config: ExperimentConfig, num_classes: int, strategy: tf.distribute.Strategy):
    """Builds the classifier, loads its initial weights, and the run's one optimizer.

    The optimizer is built on the union of every stage's variables, inside the
    strategy scope (keras issue 23085), so its slot layout is the same for
    every stage and every checkpoint.

    Returns:
      (model, base, optimizer, schedule).

    Raises:
      UserError: bad weights or an invalid unfreeze spec in any stage (checked
        before anything trains).
    """
    cfg_m, cfg_t = config.model, config.train
    size = config.data.image_size or backbones.get(cfg_m.backbone).default_size
    with strategy.scope():
        base = backbones.build_base(cfg_m.backbone, image_size=size, weights=cfg_m.weights, alpha=cfg_m.alpha)
        model = backbones.build_classifier(base, num_classes, dropout=cfg_m.dropout)
        if cfg_m.weights.startswith("ckpt:"):
            first = None
            block_of = backbones.get(cfg_m.backbone).block_of(base)
            if cfg_m.init_blocks:
                names = backbones.blocks(base, cfg_m.backbone)
                if cfg_m.init_blocks > len(names):
                    raise UserError(f"--init_blocks={cfg_m.init_blocks} exceeds the {len(names)} blocks of "
                                    f"{cfg_m.backbone}: {', '.join(names)}")
                first = names[:cfg_m.init_blocks]
            path = checkpoints.init_from_run(base, cfg_m.weights[len("ckpt:"):], first_blocks=first, block_of=block_of)
            logging.info("initialised the backbone from %s%s", path, f" (blocks {first})" if first else "")
        for s in config.stages:
            unfreeze.select(model, cfg_m.backbone, s.unfreeze, train_bn=cfg_m.train_bn)
        schedule = StageSchedule()
        optimizer = build_optimizer(cfg_t, schedule, loss_scale=cfg_t.precision == "mixed_float16")
        union = unfreeze.trainable_union(model, cfg_m.backbone, [s.unfreeze for s in config.stages],
                                         train_bn=cfg_m.train_bn)
        optimizer.build(union)
    return model, base, optimizer, schedule


def train_and_evaluate(config: ExperimentConfig, workdir: str, *, allow_config_change: bool = False,
                       preemption: Preemption | None = None, verbose: bool = True) -> dict:
    """Runs (or resumes) one experiment.

    Args:
      config: the experiment.
      workdir: run directory; running again with the same one resumes.
      allow_config_change: resume even though `config` differs from `config.json`.
      preemption: a `Preemption` whose flag stops the run with a checkpoint.
      verbose: show a progress bar per epoch.

    Returns:
      The `results.json` dict.

    Raises:
      UserError: bad config or data (exit status 2 in `launch/train.py`).
      Interrupted: a signal arrived; a checkpoint was written.
      NonFiniteLoss: the loss diverged; the last good checkpoint is kept.
      checkpoints.StorageError: the workdir could not be written.
    """
    config = validate(config)
    t_start = time.time()
    cfg_d, cfg_m, cfg_t = config.data, config.model, config.train
    entry = backbones.get(cfg_m.backbone)
    size = cfg_d.image_size or entry.default_size

    # First: MultiWorkerMirroredStrategy must exist before any other TF op runs.
    strategy = distribute.make_strategy(cfg_t.strategy, collective_timeout=cfg_t.collective_timeout)
    if cfg_t.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(cfg_t.seed)
    distribute.set_precision(cfg_t.precision)
    chief = distribute.is_chief(strategy)
    resumed_dir = prepare_workdir(workdir, config, allow_config_change=allow_config_change, write=chief)

    source = data.load_source(cfg_d, size)
    if source.skipped:
        logging.warning("skipped %d unreadable image(s), e.g. %s", len(source.skipped), source.skipped[0])
    pipeline = data.Pipeline(source, batch_size=cfg_d.batch_size, preprocess=entry.preprocess,
                             augment=config.augment, seed=cfg_t.seed,
                             cache=cfg_d.cache, shuffle_buffer=cfg_d.shuffle_buffer,
                             threads=data.pipeline_threads(cfg_d.threads, cached=cfg_d.cache))
    if pipeline.threads and cfg_d.cache:
        # Decode on every core now; the training stream then runs on its capped pool.
        logging.info("decoded %d training images into the cache in %.1fs", source.num_train, pipeline.fill_cache())
    accum = cfg_t.grad_accum_steps
    steps_per_epoch = pipeline.steps_per_epoch // accum
    if steps_per_epoch < 1:
        raise UserError(f"one optimizer step needs batch_size*grad_accum_steps = {cfg_d.batch_size * accum} "
                        f"images but the training set has {source.num_train}")

    model, base, optimizer, schedule = build_model_and_optimizer(config, source.num_classes, strategy)
    trainer = Trainer(model, optimizer, strategy=strategy, grad_accum_steps=accum, jit_compile=cfg_t.jit_compile)

    scratch = None if chief else tempfile.mkdtemp(prefix="worker_ckpt_")
    ckpts = checkpoints.Checkpoints(workdir, model=model, base=base, optimizer=optimizer,
                                    keep=cfg_t.checkpoint_keep, scratch_dir=scratch)
    meta = ckpts.restore_latest()
    seed_vars = _seed_variables(model)
    if meta:
        for v, value in zip(seed_vars, meta.get("seed_states", [])):
            v.assign(np.asarray(value, dtype=v.dtype))
        logging.info("resuming from %s: stage %d (%s), epoch %d, step %d of the epoch",
                     meta["path"], meta["stage"], config.stages[min(meta["stage"], len(config.stages) - 1)].name,
                     meta["epoch"], meta["step_in_epoch"])
        if verbose:
            print(f"Resuming from {meta['path']} (stage {meta['stage']}, epoch {meta['epoch']}, "
                  f"step {meta['step_in_epoch']} of the epoch)", flush=True)
        state = meta
    else:
        if resumed_dir:
            logging.info("workdir has a config but no checkpoint: starting from scratch")
        state = {"stage": 0, "epoch": 0, "step_in_epoch": 0, "global_epoch": 0, "saves": 0,
                 "epoch_sums": [0.0] * NUM_SUMS, "es": None, "stage_start_step": None,
                 "stage_stopped": False, "history": [], "stages": [], "train_images": 0.0,
                 "train_seconds": 0.0, "wall_seconds": 0.0}
    summaries = Summaries(workdir, enabled=chief)
    trainable_path = os.path.join(workdir, "trainable.json")
    records = {}
    if chief and os.path.exists(trainable_path):
        with open(trainable_path) as f:
            records = {r["key"]: r for r in json.load(f)}
    wall_before = state["wall_seconds"]

    def save(kind: str) -> str:
        state["seed_states"] = [np.asarray(v.numpy()).tolist() for v in seed_vars]
        state["wall_seconds"] = wall_before + time.time() - t_start
        if kind == "best":
            return ckpts.save_best({k: v for k, v in state.items() if k != "path"}, state["global_epoch"])
        state["saves"] += 1
        return ckpts.save_latest({k: v for k, v in state.items() if k != "path"}, state["saves"])

    feature_cache = head_trainer = None
    stream = None  # [images or features, global epoch it delivers next, iterator]
    es_cfg = cfg_t.early_stopping
    while state["stage"] < len(config.stages):
        si = state["stage"]
        stage = config.stages[si]
        es = EarlyStopping(es_cfg.monitor, es_cfg.mode, es_cfg.min_delta,
                           stage.patience if stage.patience is not None else es_cfg.patience,
                           es_cfg.baseline, es_cfg.start_from_epoch, es_cfg.restore_best_weights)
        if state["es"]:
            es.load_state(state["es"])
        if state["stage_start_step"] is None:
            state["stage_start_step"] = int(optimizer.iterations.numpy())
        schedule.set_stage(stage, start_step=state["stage_start_step"], steps_per_epoch=steps_per_epoch)
        current_key, use_cache, active = None, False, trainer
        selection, current_limit = None, None

        while state["epoch"] < stage.epochs and not state["stage_stopped"]:
            epoch = state["epoch"]
            limit = 1 + epoch // stage.gradual_every if stage.gradual_every else None
            if selection is None or limit != current_limit:  # resolve once per trainable set
                current_limit = limit
                selection = unfreeze.select(model, cfg_m.backbone, stage.unfreeze, train_bn=cfg_m.train_bn,
                                            lr_decay_per_block=stage.lr_decay_per_block, limit_top=limit)
            key = stage.name if limit is None else f"{stage.name}/top{len(selection.blocks)}"
            if key != current_key:
                current_key = key
                unfreeze.apply_policy(model, cfg_m.backbone, selection)
                head_only = len(selection.variables) == len(unfreeze.head_variables(model))
                use_cache = cfg_t.cache_features and head_only and not config.augment.enabled
                if cfg_t.cache_features and not use_cache:
                    logging.warning("stage %s: --cache_features applies to head-only stages without "
                                    "augmentation; training through the base", stage.name)
                if use_cache:
                    if feature_cache is None:
                        feature_cache = FeatureCache(model, pipeline)
                        head_trainer = Trainer(feature_cache.head, optimizer, strategy=strategy,
                                               grad_accum_steps=accum, jit_compile=cfg_t.jit_compile)
                        if verbose:
                            print(f"cached base features of {len(feature_cache.train_y)} training and "
                                  f"{len(feature_cache.val_y)} validation images in {feature_cache.seconds:.1f}s",
                                  flush=True)
                    active = head_trainer
                else:
                    active = trainer
                active.set_trainable(selection.variables, selection.lr_multipliers)
                record = dict(unfreeze.describe(selection, model, stage=stage.name), key=key, from_epoch=epoch)
                logging.info("stage %s: %s", key, unfreeze.summary_text(record).replace("\n", " | "))
                if verbose:
                    print(f"\n== {unfreeze.summary_text(record)}", flush=True)
                if chief:
                    records[key] = record
                    _atomic_write_json(trainable_path, list(records.values()))
                    step = int(optimizer.iterations.numpy())
                    summaries.text("train", "trainable", unfreeze.summary_text(record), step)
                    summaries.images("train", "augmented_inputs", pipeline.raw_train_batch(state["global_epoch"]), step)

            # One iterator across epochs and stages, so the next epoch's batches are
            # prepared while this one trains; rebuilt only when it would not deliver
            # this global epoch next (start, resume, switching to or from cached features).
            source_kind = "features" if use_cache else "images"
            if stream is None or stream[:2] != [source_kind, state["global_epoch"]]:
                remaining = sum(st.epochs for st in config.stages[si:]) - epoch
                ds = (feature_cache if use_cache else pipeline).train_stream(
                    state["global_epoch"], remaining, batches_per_epoch=steps_per_epoch * accum,
                    skip=state["step_in_epoch"] * accum)
                stream = [source_kind, state["global_epoch"], iter(strategy.experimental_distribute_dataset(ds))]
            iterator = stream[2]
            sums = np.asarray(state["epoch_sums"], dtype=np.float64)
            bar = keras.utils.Progbar(steps_per_epoch, stateful_metrics=["loss", "accuracy", "img/s"],
                                      verbose=1 if verbose else 0)
            if verbose:
                print(f"stage {stage.name} epoch {epoch + 1}/{stage.epochs}", flush=True)
            while state["step_in_epoch"] < steps_per_epoch:
                n = min(cfg_t.steps_per_loop, steps_per_epoch - state["step_in_epoch"])
                every = cfg_t.checkpoint_every_steps
                if every:
                    n = min(n, every - int(optimizer.iterations.numpy()) % every)
                t0 = time.perf_counter()
                loop_sums, bad = active.train(iterator, n)
                dt = time.perf_counter() - t0
                if bad >= 0:
                    global_step = int(optimizer.iterations.numpy()) - n + bad + 1
                    raise NonFiniteLoss(
                        f"non-finite training loss at step {global_step} (stage {stage.name}, epoch {epoch + 1}); "
                        f"the last good checkpoint is kept in {os.path.join(workdir, 'ckpt')}; "
                        "lower the learning rate or enable --clipnorm")
                sums += loop_sums
                state["step_in_epoch"] += n
                state["train_images"] += float(loop_sums[COUNT])
                state["train_seconds"] += dt
                state["epoch_sums"] = sums.tolist()
                m = metrics_from_sums(sums)
                bar.update(state["step_in_epoch"], [("loss", m["loss"]), ("accuracy", m["accuracy"]),
                                                     ("img/s", loop_sums[COUNT] / max(dt, 1e-9))])
                if preemption is not None and preemption.signum:
                    path = save("latest")
                    raise Interrupted(preemption.signum, path)
                if every and int(optimizer.iterations.numpy()) % every == 0 and state["step_in_epoch"] < steps_per_epoch:
                    save("latest")

            train_m = metrics_from_sums(sums)
            val_ds = feature_cache.val_dataset() if use_cache else pipeline.val_dataset()
            val_m = active.evaluate(strategy.experimental_distribute_dataset(val_ds))
            step = int(optimizer.iterations.numpy())
            ips = state["train_images"] / max(state["train_seconds"], 1e-9)
            train_scalars = {"loss": train_m["loss"], "accuracy": train_m["accuracy"],
                             "learning_rate": current_lr(optimizer), "images_per_second": ips,
                             "loss_scale": loss_scale_value(optimizer), "grad_norm": train_m.get("grad_norm")}
            if source.num_classes > 5:
                train_scalars["top5_accuracy"] = train_m["top5_accuracy"]
            summaries.scalars("train", train_scalars, step)
            val_scalars = {"loss": val_m["loss"], "accuracy": val_m["accuracy"]}
            if source.num_classes > 5:
                val_scalars["top5_accuracy"] = val_m["top5_accuracy"]
            summaries.scalars("val", val_scalars, step)
            if cfg_t.histogram_every_epochs and (state["global_epoch"] + 1) % cfg_t.histogram_every_epochs == 0:
                summaries.histograms("train", selection.variables, step)
            summaries.flush()
            stop = es.update(epoch, _monitor_value(es_cfg.monitor, train_m, val_m))
            state["history"].append({"stage": stage.name, "epoch": epoch, "global_epoch": state["global_epoch"],
                                     "step": step, "train": train_m, "val": val_m})
            if verbose:
                print(f"  val_loss {val_m['loss']:.4f}  val_accuracy {val_m['accuracy']:.4f}", flush=True)
            state.update(epoch=epoch + 1, step_in_epoch=0, epoch_sums=[0.0] * NUM_SUMS,
                         global_epoch=state["global_epoch"] + 1, es=es.state())
            stream[1] += 1
            if es.improved:
                save("best")
            if stop and es_cfg.enabled:
                state["stage_stopped"] = True
                logging.info("early stopping in stage %s at epoch %d (best epoch %d, %s=%.5f)",
                             stage.name, epoch + 1, es.best_epoch + 1, es.monitor, es.best)
                if verbose:
                    print(f"  early stopping: best epoch {es.best_epoch + 1} ({es.monitor}={es.best:.4f})", flush=True)
            save("latest")
            if preemption is not None and preemption.signum:
                raise Interrupted(preemption.signum, ckpts.latest.latest_checkpoint)

        # End of the stage.
        weights_from = "last epoch"
        if es_cfg.restore_best_weights and es.best is not None:
            best = ckpts.restore_best_weights()
            if best is not None:
                weights_from = f"{best['path']} (stage {stage.name}, epoch {es.best_epoch + 1})"
        stage_hist = [h for h in state["history"] if h["stage"] == stage.name]
        best_h = stage_hist[es.best_epoch] if (es.best is not None and es.best_epoch < len(stage_hist)) else None
        final_val = trainer.evaluate(strategy.experimental_distribute_dataset(pipeline.val_dataset()))
        state["stages"].append({
            "name": stage.name, "unfreeze": stage.unfreeze, "epochs_run": len(stage_hist),
            "epochs_max": stage.epochs, "lr": stage.lr,
            "early_stopped": bool(state["stage_stopped"]),
            "stopped_epoch": es.stopped_epoch if state["stage_stopped"] else None,
            "best_epoch": es.best_epoch if es.best is not None else None,
            "best_monitor_value": es.best, "best_val": best_h["val"] if best_h else None,
            "final_val": final_val, "final_train": stage_hist[-1]["train"] if stage_hist else None,
            "weights_from": weights_from,
            "trainable_params": (records.get(stage.name) or {}).get("trainable_params"),
        })
        state.update(stage=si + 1, epoch=0, step_in_epoch=0, es=None, stage_start_step=None,
                     stage_stopped=False, epoch_sums=[0.0] * NUM_SUMS)
        save("latest")

    # A resumed, already-finished run evaluates again so results are always fresh.
    final_val = trainer.evaluate(strategy.experimental_distribute_dataset(pipeline.val_dataset()))
    history = state["history"]
    best_overall = max(history, key=lambda h: h["val"]["accuracy"]) if history else None
    results = {
        "final": {"val_" + k: v for k, v in final_val.items() if k != "count"},
        "best": ({"val_" + k: v for k, v in best_overall["val"].items() if k != "count"}
                 | {"stage": best_overall["stage"], "epoch": best_overall["epoch"]}) if best_overall else None,
        "best_epoch": state["stages"][-1]["best_epoch"] if state["stages"] else None,
        "early_stopping_fired": any(s["early_stopped"] for s in state["stages"]),
        "final_weights_from": state["stages"][-1]["weights_from"] if state["stages"] else "last epoch",
        "stages": state["stages"],
        "epochs_run": len(history),
        "wall_time_s": wall_before + time.time() - t_start,
        "train_images_per_sec": state["train_images"] / max(state["train_seconds"], 1e-9),
        "num_train": source.num_train, "num_val": source.num_val, "class_names": source.class_names,
        "skipped_images": source.skipped,
        "history": history,
        "config": dataclasses.asdict(config),
    }
    if chief:
        if cfg_t.export:
            from research.export import export_run
            # The final weights: the latest checkpoint (the best epoch's, with restore_best_weights).
            export_run(workdir, checkpoint="latest", class_names=source.class_names)
        _atomic_write_json(os.path.join(workdir, "results.json"), results)
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    summaries.flush()
    return results
