"""The learning-rate range test (Smith, 2017; fastai's `lr_find`).

From a run's own config (data, backbone, weights, the trainable set of one of its
stages, optimizer, augmentation), the learning rate grows exponentially from
`start` to `end` over at most `steps` optimizer steps while the training loss is
recorded. The loss is smoothed as fastai does (an exponential moving average with
bias correction) and the test stops once the smoothed loss exceeds `diverge`
times its minimum. The suggestion (`suggest`) is the learning rate where the
smoothed loss falls fastest (the steepest slope against log LR) before its
minimum, read after the first steps, whose smoothed loss is still warming up;
`min_lr / 10` (the minimum's learning rate divided by ten) is given beside it.

Nothing is written to any run: the model is built and initialised here, trained
for the test only, and dropped.
"""

from __future__ import annotations

import json
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

from absl import logging

from research.run import distribute, preflight
from research.model import unfreeze
from research.config import ExperimentConfig, UserError
from research.run import build as build_lib
from research.run.loop import Trainer
from research.model.optim import build_optimizer, current_lr


class ExponentialLR(keras.optimizers.schedules.LearningRateSchedule):
    """lr(step) = start * (end / start) ** (step / (steps - 1))."""

    def __init__(self, start: float, end: float, steps: int):
        self.start, self.end, self.steps = float(start), float(end), int(steps)

    def __call__(self, step):
        frac = tf.cast(step, tf.float32) / float(max(self.steps - 1, 1))
        return self.start * tf.pow(self.end / self.start, frac)

    def get_config(self):
        return {"start": self.start, "end": self.end, "steps": self.steps}


WARMUP = 10  # steps whose smoothed loss is not read (suggest)
SLOPE_WINDOW = 5
FLAT = 0.05  # a smoothed loss that falls less than this (relative) over the range names no rate


def smooth(losses: list[float], beta: float = 0.98) -> np.ndarray:
    """fastai's smoothing: an exponential moving average with bias correction."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return np.array(out)


def suggest(lrs: np.ndarray, smoothed: np.ndarray) -> dict[str, float]:
    """Where to train, read off the smoothed loss: its steepest descent before its minimum
    (the slope fitted over `SLOPE_WINDOW` points against log LR), and the minimum's
    learning rate / 10.

    The first tenth of the steps (at least `WARMUP`, at most a fifth of a short test) is
    not read: the smoothed loss there averages a handful of batches, and its first drops
    are noise at rates far too small to train anything. `fall`: how much of the smoothed
    loss at the first read step is gone at the minimum; under `FLAT` the curve names no rate.
    """
    lrs, smoothed = np.asarray(lrs, np.float64), np.asarray(smoothed, np.float64)
    n = len(smoothed)
    skip = min(max(WARMUP, n // 10), n // 5)
    lowest = skip + int(np.argmin(smoothed[skip:]))
    steepest = float(lrs[lowest])
    window = min(SLOPE_WINDOW, lowest + 1 - skip)
    if window >= 3:
        x = np.log(lrs)
        slopes = [np.polyfit(x[i:i + window], smoothed[i:i + window], 1)[0]
                  for i in range(skip, lowest + 2 - window)]
        steepest = float(lrs[skip + int(np.argmin(slopes)) + window // 2])
    return {"steepest": steepest, "min_lr_over_10": float(lrs[lowest]) / 10.0, "min_loss_lr": float(lrs[lowest]),
            "skipped_steps": skip, "fall": float(1.0 - smoothed[lowest] / smoothed[skip])}


def lr_range_test(config: ExperimentConfig, out_dir: str, *, stage: int = 0, start: float = 1e-7,
                  end: float = 1.0, steps: int = 100, diverge: float = 4.0, verbose: bool = True) -> dict:
    """Runs the range test for `config`'s stage `stage` (default: the first) and writes
    `lr_find.json` and `lr_find.png` in `out_dir`.

    A later stage is tested from the initial weights with a fresh head: the stages
    before it are not trained first, so its curve is only indicative (the result
    says so under `note`).

    Returns:
      `{"lrs", "losses", "smoothed", "suggestion", "stage", ...}`.

    Raises:
      UserError: bad config, data or weights; a bad stage index or LR range.
    """
    config = preflight.validate(config)
    if not (0 < start < end) or steps < 10:
        raise UserError(f"--start={start}, --end={end}, --steps={steps}: need 0 < start < end and steps >= 10")
    if not -len(config.stages) <= stage < len(config.stages):
        raise UserError(f"--stage={stage}: the config has {len(config.stages)} stage(s), counted from 0 "
                        f"(0 .. {len(config.stages) - 1}; negative counts from the last)")
    st = config.stages[stage]
    if st.spec.auto is not None:
        raise UserError(f"stage {st.name} unfreezes {st.unfreeze!r}, chosen only when a run reaches it; test the "
                        "blocks it chose instead (trainable.json of a run: --unfreeze=blocks:...)")
    index = stage % len(config.stages)
    note = (f"stage {st.name} was tested from the initial weights with a fresh head; the {index} stage(s) before "
            "it were not trained first, so the curve is only indicative for it") if index else ""
    if st.continue_schedule and index:
        note += (f"; stage {st.name} continues the schedule of the stage before it and trains at that stage's "
                 "lr, not its own: a rate found here is set there")
    if note:
        logging.warning(note)
    strategy = distribute.setup(config.train)
    source, pipeline = build_lib.build_inputs(config, strategy, verbose=verbose, scores_test=False)
    build_lib.prepare_inputs(pipeline)
    m = build_lib.build(config, source.num_classes, strategy)
    build_lib.init_weights(config, m)
    with strategy.scope():
        optimizer = build_optimizer(config.train, ExponentialLR(start, end, steps), name=st.optimizer,
                                    loss_scale=config.train.precision == "mixed_float16")
        selection = unfreeze.select(m.model, config.model.backbone, st.spec, train_bn=config.model.train_bn)
        unfreeze.apply_policy(m.model, config.model.backbone, selection)
        optimizer.build(selection.variables)
    accum = config.train.grad_accum_steps
    trainer = Trainer(m.model, optimizer, strategy=strategy, grad_accum_steps=accum,
                      label_smoothing=config.train.label_smoothing,
                      class_weights=build_lib.class_weights(config, source))
    trainer.set_trainable(selection.variables)
    epochs = math.ceil(steps * accum / pipeline.steps_per_epoch)
    iterator = iter(pipeline.distribute(strategy, lambda: pipeline.train_stream(0, epochs)))
    lrs, losses = [], []
    t0 = time.perf_counter()
    for i in range(steps):
        lr = current_lr(optimizer)  # the rate this step uses
        sums, bad = trainer.train(iterator, 1)
        loss = sums["loss_sum"] / max(sums["count"], 1.0)
        if bad >= 0 or not math.isfinite(loss):
            break
        lrs.append(lr)
        losses.append(float(loss))
        sm = smooth(losses)
        if len(sm) > 5 and sm[-1] > diverge * sm.min():
            break
    if len(losses) < 5:
        raise UserError(f"the loss diverged after {len(losses)} steps from lr {start:g}; lower --start")
    lrs_a, smoothed = np.array(lrs), smooth(losses)
    suggestion = suggest(lrs_a, smoothed)
    if suggestion["fall"] < FLAT:
        flat = (f"the smoothed loss fell by {suggestion['fall']:.1%} only over the range: the suggestion is not a "
                "rate to trust (more --steps, another range, or a stage that can learn)")
        logging.warning(flat)
        note = f"{note}; {flat}" if note else flat
    result = {"stage": st.name, "unfreeze": st.unfreeze, "optimizer": st.optimizer_of(config.train.optimizer),
              "note": note, "steps_run": len(losses), "start": start, "end": end,
              "lrs": lrs, "losses": losses, "smoothed": smoothed.tolist(), "suggestion": suggestion,
              "seconds": time.perf_counter() - t0, "traces": trainer.tracing_count()}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "lr_find.json"), "w") as f:
        json.dump(result, f, indent=2)
    _plot(os.path.join(out_dir, "lr_find.png"), result)
    return result


def _plot(path: str, r: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(r["lrs"], r["losses"], alpha=0.3, label="loss")
    ax.plot(r["lrs"], r["smoothed"], label="smoothed")
    s = r["suggestion"]
    ax.axvline(s["steepest"], color="k", ls="--", lw=1, label=f"steepest {s['steepest']:.2g}")
    ax.axvspan(r["lrs"][0], r["lrs"][s["skipped_steps"]], color="gray", alpha=0.1, label="not read (warm-up)")
    ax.axvline(s["min_lr_over_10"], color="gray", ls=":", lw=1, label=f"min/10 {s['min_lr_over_10']:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(f"LR range test, stage {r['stage']} ({r['unfreeze']})", fontsize=9)
    low, high = min(r["smoothed"]), max(r["smoothed"][: max(3, len(r["smoothed"]) // 2)])
    ax.set_ylim(low - 0.1 * abs(low), high + 0.5 * (high - low) + 1e-3)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
