"""The run's options, each one file and one line in `REGISTRY` (research/run/actions/base.py
says what an action is and when its hooks run).

To add one: write `research/run/actions/NAME.py` with a subclass of `Action`,
and add it to `REGISTRY` below (or `register(MyAction)` from your own code).
Hooks of different actions run in this order at each point.
"""

from __future__ import annotations

from research.config import ExperimentConfig
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


__all__ = ["Action", "Context", "Inputs", "REGISTRY", "for_config", "register"]
