"""What an action is, and the small context it works with.

An action is one training option (EMA, AdaBN, `auto:` unfreezing, ...) kept out
of the controller, as Orbit keeps export and conditional checkpoints out of its
`Controller` (`orbit/actions/`). The controller calls every hook of every
enabled action at fixed points, in registration order; an action overrides only
the hooks it needs. It sees the run through a `Context` (the built objects,
writers, checkpoints, printing), never through the controller.

Its checkpointed state is its own typed part of the run state: a dataclass
named `State`, kept in `RunState.actions[name]`, saved in every checkpoint's
run state and restored on resume (`state(run)`).

Its validation is its own too (`check`, `resume_conflict`): those run on the
config alone, before TensorFlow is imported, so that a bad flag is refused at
once. That is why action modules import TensorFlow, Keras and the modules that
import them inside the hooks that use them, never at the top.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from research.config import ExperimentConfig, StageConfig, UnfreezeSpec


@dataclass
class Inputs:
    """What one trainable set trains on: its trainer, the stream it draws batches from,
    and the matching validation data (images through the model, or cached features)."""

    kind: str
    trainer: Any
    stream_source: Any
    val_dataset: Callable[[], Any]


@dataclass
class Context:
    """The run, as actions see it.

    Attributes:
      config / workdir / strategy / chief: the run's.
      source / pipeline: the data and its tf.data pipeline.
      built: `research.run.build.Model` (model, base, the optimizers, schedule).
      trainer: the image trainer (`research.run.loop.Trainer`).
      class_weights: the training loss's per-class weights (None: unweighted).
      ckpts: `research.run.checkpoints.Checkpoints`.
      summaries: the TensorBoard writers (`research.run.summaries.Summaries`).
      variants: other weights than the trained ones that the run scores, by name
        (`ema`): a context manager that swaps them into the model. Validation
        becomes `val_NAME/...` and test `test_NAME/...` for each.
      listeners: the actions told of `base_changed`.
    """

    config: ExperimentConfig
    workdir: str
    strategy: Any
    chief: bool
    verbose: bool
    source: Any
    pipeline: Any
    built: Any
    trainer: Any
    ckpts: Any
    class_weights: list | None = None
    summaries: Any = None
    variants: dict[str, Callable[[], contextlib.AbstractContextManager]] = field(default_factory=dict)
    listeners: list = field(default_factory=list)

    def say(self, text: str) -> None:
        if self.verbose:
            print(text, flush=True)

    def step(self) -> int:
        return self.built.step()

    def evaluate(self, dataset, trainer=None) -> dict[str, float]:
        """Loss and accuracies of the model's current weights on a dataset (top-5 only with
        more than 5 classes: with fewer it is always 1)."""
        m = (trainer or self.trainer).evaluate(self.strategy.experimental_distribute_dataset(dataset))
        if self.source.num_classes <= 5:
            m.pop("top5_accuracy", None)
        return m

    @contextlib.contextmanager
    def weights(self, variant: str | None) -> Iterator[None]:
        """The named variant's weights in the model for the block (None or `trained`: as they are)."""
        if variant in (None, "trained"):
            yield
        else:
            with self.variants[variant]():
                yield

    def write_json(self, name: str, obj) -> None:
        if self.chief:
            from research.run import workdir
            workdir.atomic_write_json(os.path.join(self.workdir, name), obj)

    def base_changed(self) -> None:
        """Tells every action that the backbone's weights or statistics changed outside
        training (AdaBN): what was computed from them (cached features) is stale."""
        for action in self.listeners:
            action.base_changed(self)


class Action:
    """An option of the run. Override the hooks you need; all are no-ops here.

    Class attributes:
      name: the key of its state in `RunState.actions` and of its log lines.
      State: a dataclass of its checkpointed state, or None (it keeps none).
      variants: the weight variants it registers in `setup` when enabled (scored as
        `val_NAME/...`, monitorable for `best/`, saved by `Checkpoints.save_variant`).
    """

    name = "action"
    State: type | None = None
    variants: tuple[str, ...] = ()

    def __init__(self, config: ExperimentConfig):
        self.config = config

    @classmethod
    def enabled(cls, config: ExperimentConfig) -> bool:
        """Whether this config uses the action at all."""
        return True

    # -- its validation: on the config alone, before TensorFlow is imported ----------

    @classmethod
    def check(cls, config: ExperimentConfig) -> None:
        """Raises `UserError` for values of its fields, or combinations with others, it
        cannot run. Called for every registered action, enabled or not."""

    @classmethod
    def resume_conflict(cls, old: dict, config: ExperimentConfig) -> str | None:
        """What makes a run with config `old` (its `config.json` as a dict, fields added to
        the code since then at their defaults) impossible to resume with `config`, because
        the checkpointed state it owns would not fit (None: nothing)."""
        return None

    # -- its state -------------------------------------------------------------------

    def state(self, run):
        """Its part of the run state (created on first use, read back as its dataclass on resume)."""
        s = run.actions.get(self.name)
        if s is None or isinstance(s, dict):
            s = self.State(**(s or {}))
            run.actions[self.name] = s
        return s

    def results(self, run) -> dict:
        """Its entries in `results.json`."""
        return {}

    # -- hooks, in the order a run calls them ------------------------------------------

    def setup(self, ctx: Context) -> None:
        """Once, after building and before the first stage (register `ctx.variants` here)."""

    def stage_start(self, ctx: Context, run, stage: StageConfig) -> None:
        """At a stage's start, and again when a run resumes inside the stage."""

    def unfreeze_spec(self, ctx: Context, run, stage: StageConfig, spec: UnfreezeSpec) -> UnfreezeSpec:
        """The spec the stage trains with (an `auto:` spec resolves to `blocks:...`)."""
        return spec

    def inputs(self, ctx: Context, run, stage: StageConfig, selection, limit) -> Inputs | None:
        """Other inputs for this trainable set than images through the whole model (None: images)."""
        return None

    def trainable_set(self, ctx: Context, run, stage: StageConfig, selection, inputs: Inputs) -> None:
        """A new trainable set is active (a stage start, the next block of a gradual stage)."""

    def describe_trainable(self, ctx: Context, run, stage: StageConfig, record: dict) -> None:
        """Adds to the set's `trainable.json` record."""

    def train_metrics(self, ctx: Context, run, stage: StageConfig, inputs: Inputs) -> dict[str, float]:
        """Extra training metrics of the epoch just trained (`train/NAME` in the history)."""
        return {}

    def epoch_end(self, ctx: Context, run, stage: StageConfig, metrics: dict, selection, last: bool) -> None:
        """After the epoch's metrics and summaries, before the checkpoint."""

    def best_restored(self, ctx: Context) -> None:
        """`restore_best_weights` just put `best/`'s weights into the model."""

    def base_changed(self, ctx: Context) -> None:
        """See `Context.base_changed`."""

    def run_end(self, ctx: Context, run) -> None:
        """After the last stage, before the checkpoint that marks the run finished."""
