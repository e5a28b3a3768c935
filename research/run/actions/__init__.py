"""The run's options, each one file and one line in `REGISTRY` (research/run/actions/base.py
says what an action is and when its hooks run).

To add one: write `research/run/actions/NAME.py` with a subclass of `Action`,
and add it to `REGISTRY` below (or `register(MyAction)` from your own code).
Hooks of different actions run in this order at each point.

Importing this package does not import TensorFlow (see base.py): `check` runs every
action's own checks on the config (from `research.run.preflight.validate`) before a
launcher starts TensorFlow.
"""

from __future__ import annotations

from research.config import ExperimentConfig
from research.config.specs import check as check_that
from research.run.actions.adabn import AdaBN
from research.run.actions.auto_unfreeze import AutoUnfreeze
from research.run.actions.base import Action, Context, Inputs
from research.run.actions.block_grads import BlockGrads
from research.run.actions.ema import Ema
from research.run.actions.feature_cache import CachedFeatures
from research.run.actions.histograms import Histograms
from research.run.actions.test_evaluation import TestEvaluation

REGISTRY: list[type[Action]] = [AdaBN, AutoUnfreeze, CachedFeatures, BlockGrads, Histograms, TestEvaluation, Ema]


def register(action: type[Action]) -> type[Action]:
    """Adds an action to every later run of this process (usable as a class decorator)."""
    if action not in REGISTRY:
        REGISTRY.append(action)
    return action


def for_config(config: ExperimentConfig) -> list[Action]:
    """The actions this config enables, in registration order."""
    return [cls(config) for cls in REGISTRY if cls.enabled(config)]


def check(config: ExperimentConfig) -> None:
    """Every registered action's own checks (`Action.check`), on a validated config.

    Raises:
      UserError: naming the bad value.
    """
    for cls in REGISTRY:
        cls.check(config)
    # A variant's own action refuses its monitor when it is off (naming its flag); here,
    # only names no action provides.
    monitor = config.train.early_stopping.monitor
    if monitor.startswith("val_"):
        known = [v for cls in REGISTRY for v in cls.variants]
        check_that(monitor.split("/")[0][len("val_"):] in known,
                   f"--early_stopping_monitor={monitor!r} names no weight variant; variants: {', '.join(known)}")


def resume_conflicts(old: dict, config: ExperimentConfig) -> list[str]:
    """What no action's checkpointed state can follow from the run with config `old` to `config`."""
    return [c for c in (cls.resume_conflict(old, config) for cls in REGISTRY) if c]


__all__ = ["Action", "Context", "Inputs", "REGISTRY", "for_config", "register", "resume_conflicts",
           "check"]
