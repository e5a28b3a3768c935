"""The run state: everything the controller knows about a run, in one typed record.

`RunState` is what a checkpoint's `meta` holds (serialised by `to_json` and
read back by `from_json`, the only two places that know its format), and
`results.json` and `trainable.json` are views of it (`results`, and the
`trainable` list as it is). Nothing derived (the best record, a stage's trainable
parameter count, the history) is stored twice.

Metric names are the run's one vocabulary: `train/loss`, `train/accuracy`,
`val/loss`, `val/accuracy`, `val/top5_accuracy`, `images_per_second`, ... in
the history, `results.json`, the sweep tables, TensorBoard and the
`--early_stopping_monitor` flag.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from research.errors import UserError
from research.run.loop import zero_sums

# The run-state layout; checkpoints of another layout are refused, not half-read.
# 3: metric sums by name, options' state under `actions`.
FORMAT = 3


def prefixed(split: str, metrics: dict[str, float]) -> dict[str, float]:
    """`{"loss": 0.1}` -> `{"val/loss": 0.1}` (the count is not a metric)."""
    return {f"{split}/{k}": v for k, v in metrics.items() if k != "count"}


@dataclass
class RunState:
    """Where a run is and what it has seen.

    Attributes:
      format: the layout version (`FORMAT`).
      stage / epoch / step_in_epoch: the position to resume at (0-based; epoch
        counts within the stage).
      global_epoch: epochs trained so far over all stages (seeds data order).
      saves: latest-checkpoint counter (`ckpt/ckpt-<saves>`).
      stage_start_step: the run's step (every optimizer's steps) at which the current stage began.
      stage_stopped: early stopping fired in the current stage.
      early_stopping: the current stage's `EarlyStopping.state()`.
      epoch_sums: running metric sums of the current epoch, by name
        (research/run/loop.py:SUM_KEYS).
      best: the best epoch of the whole run by the monitor, the one `best/`
        holds: `{"stage", "stage_index", "epoch", "global_epoch", "monitor",
        "value", "checkpoint", <metrics>}`.
      history: one record per epoch: `{"stage", "epoch", "global_epoch",
        "step", <metrics>}`.
      stages: one record per finished stage.
      trainable: one record per trainable set (a stage, or each step of a
        gradual stage): the `trainable.json` entries.
      final: metrics of the final weights, once the run is finished.
      finished: every stage ran.
      data: what the data looked like (`num_train`, `num_val`, `class_names`,
        `skipped_images`).
      actions: each option's own state, by action name (research/run/actions/),
        e.g. `auto_unfreeze` (the blocks an `auto:` spec chose) or `adabn`.
      config_changes: configs changed on resume with `--allow_config_change`:
        `{"global_epoch", "changed"}`.
      train_images / train_seconds / wall_seconds: throughput and time counters.
      seed_states: dropout random-generator states (not checkpointable objects).
      sessions: one record per process that worked on the run, in order: its command
        line, code version, library versions, devices, host, start and (once it
        finished the run) end time (`research.provenance`).
      features: what the head reads (`--features`): `{"spec", "resolved", "blocks",
        "backbone_params", "whole_backbone_params"}`, and for `auto` the probes'
        `scores` and `seconds`; the model is built from `resolved` on resume.
      saved_at: when the checkpoint holding this state was written (`time.time()`):
        on resume, TensorBoard events written after it are dropped, since the
        resumed run writes them again (`research.run.summaries.drop_events_after`).
    """

    format: int = FORMAT
    stage: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    global_epoch: int = 0
    saves: int = 0
    stage_start_step: int | None = None
    stage_stopped: bool = False
    early_stopping: dict | None = None
    epoch_sums: dict[str, float] = field(default_factory=zero_sums)
    best: dict | None = None
    history: list[dict] = field(default_factory=list)
    stages: list[dict] = field(default_factory=list)
    trainable: list[dict] = field(default_factory=list)
    final: dict | None = None
    finished: bool = False
    data: dict = field(default_factory=dict)
    config_changes: list[dict] = field(default_factory=list)
    actions: dict[str, Any] = field(default_factory=dict)
    train_images: float = 0.0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    seed_states: list = field(default_factory=list)
    sessions: list[dict] = field(default_factory=list)
    features: dict = field(default_factory=dict)
    saved_at: float | None = None

    # -- serialisation: the only two functions that know the format --------------

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), default=_json_default)

    @classmethod
    def from_json(cls, text: str) -> "RunState":
        d = json.loads(text)
        if d.get("format") != FORMAT:
            raise UserError("this workdir's checkpoints were written by an older version of this code "
                            f"(run-state format {d.get('format', 1)}, now {FORMAT}); finish the run with that "
                            "version, or start a new --workdir (--weights=ckpt:OLD_WORKDIR reuses its backbone)")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    # -- transitions ------------------------------------------------------------

    def next_epoch(self, early_stopping: dict) -> None:
        self.epoch += 1
        self.global_epoch += 1
        self.step_in_epoch = 0
        self.epoch_sums = zero_sums()
        self.early_stopping = early_stopping

    def next_stage(self) -> None:
        self.stage += 1
        self.epoch = self.step_in_epoch = 0
        self.early_stopping = self.stage_start_step = None
        self.stage_stopped = False
        self.epoch_sums = zero_sums()

    # -- views ------------------------------------------------------------------

    def stage_history(self, name: str) -> list[dict]:
        return [h for h in self.history if h["stage"] == name]

    def trainable_params(self, stage: str) -> dict:
        """The stage's trained parameters (a gradual stage: its last, largest set): all of them,
        the backbone's among them, and their share of the backbone."""
        records = [r for r in self.trainable if r["stage"] == stage]
        if not records:
            return {"trainable_params": None}
        r = records[-1]
        if "backbone_params" not in r:  # a record written before these were counted
            return {"trainable_params": r["trainable_params"]}
        return {"trainable_params": r["trainable_params"], "backbone_trained_params": r["backbone_trained_params"],
                "backbone_share": r["backbone_trained_params"] / max(r["backbone_params"], 1)}

    def images_per_second(self) -> float:
        return self.train_images / max(self.train_seconds, 1e-9)

    def results(self, config: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The `results.json` view; `extra`: the actions' entries (`Action.results`)."""
        best = numbered(self.best)
        return {
            "final": self.final,
            "best": best,
            "best_epoch": best["global_epoch"] if best else None,
            "best_stage": best["stage"] if best else None,
            "early_stopping_fired": any(s["early_stopped"] for s in self.stages),
            "final_weights_from": self.stages[-1]["weights_from"] if self.stages else "last epoch",
            "stages": [dict(s, early_stopping=numbered(s["early_stopping"]), **self.trainable_params(s["name"]))
                       for s in self.stages],
            "epochs_run": len(self.history),
            "wall_time_s": self.wall_seconds,
            "images_per_second": self.images_per_second(),
            "features": self.features,
            **self.data,
            "config_changes": [numbered(c) for c in self.config_changes],
            "provenance": self.sessions,
            **(extra or {}),
            "history": [numbered(h) for h in self.history],
            "config": config,
        }


EPOCH_KEYS = ("epoch", "global_epoch", "stopped_epoch", "stage_best_epoch", "from_epoch")


def numbered(record: dict | None) -> dict | None:
    """`record` with its epochs counted from 1, as the logs, `trainable.json`, the
    checkpoint names (`best/ckpt-N`) and the tables count them. The run state counts
    from 0: there an epoch number is an index, and its global one seeds the data."""
    if record is None:
        return None
    return {k: v + 1 if k in EPOCH_KEYS and type(v) is int else v for k, v in record.items()}


def count(n: int, noun: str) -> str:
    """`1 epoch`, `16 epochs`."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def headline(metrics: dict | None) -> str:
    """`test/accuracy 0.91, val/accuracy 0.93`: the accuracies a record has."""
    items = [(k, v) for k, v in (metrics or {}).items() if k.endswith("/accuracy") and k.count("/") == 1]
    items.sort(key=lambda kv: not kv[0].startswith("test/"))
    return ", ".join(f"{k} {v:.4f}" for k, v in items) or "no metrics"


def _json_default(o):
    import numpy as np
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)
