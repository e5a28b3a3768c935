"""Sweeps and the recipes study: a grid of flag values (or named recipes) run as trials
(research/studies/trials.py), then tabulated and plotted (research/studies/tables.py).

A sweep root holds one workdir per trial under `trials/`, and at the top
`results.csv`, `results.md`, `results.png` and the TensorBoard HParams
experiment, so `tensorboard --logdir ROOT` compares every trial. The transfer
and probe studies are research/studies/transfer.py and research/studies/probe.py.
"""

from __future__ import annotations

import re
import shlex

from research.config import UserError
from research.studies.tables import collect, parse_baseline, plot, write_hparams, write_tables
from research.studies.trials import (SEED_KEY, MakeConfig, Trial, expand, parse_sweep, prepare, run_all,
                                     trial_name)


def run_sweep(root: str, sweep_items: list[str], train_flags: list[str], make_config: MakeConfig, *,
              parallel: int = 1, rerun: bool = False, baseline: str | None = None, log=print,
              ready=lambda: None) -> list[dict]:
    """A grid of `--sweep=KEY:V1,V2` items over training flags: runs, tabulates, plots.

    Args:
      baseline: `KEY:VALUE`, the row the others are compared with (default: the
        first value of the first swept key).
      ready: called once every trial is checked, before the first runs (a launcher
        starts TensorFlow there: a bad sweep is refused without it).

    Returns:
      One row per trial (`collect`).

    Raises:
      UserError: a malformed sweep or baseline, an invalid trial, or stale trials without `rerun`.
    """
    sweep = parse_sweep(sweep_items)
    trials = expand(sweep, train_flags)
    keys = [k for k, _ in sweep]
    base = parse_baseline(baseline, keys, [t.values for t in trials])
    prepare(root, trials, make_config, rerun=rerun, log=log)
    ready()
    run_all(root, trials, parallel=parallel, log=log)
    rows = collect(root, trials)
    write_tables(root, rows, keys, baseline=base)
    plot(root, rows, keys)
    write_hparams(root, trials)
    return rows


# The guide's `model.fit` recipe (the baseline) and this codebase's defaults, on the same flags.
RECIPES_BUILTIN = ("guide", "default")


def parse_recipes(items: list[str]) -> list[tuple[str, list[str]]]:
    """`--recipe=NAME:FLAGS` items -> (name, flags), e.g. `adapt:--bn=adapt --schedule=constant`.

    Raises:
      UserError: a malformed item, a reserved or repeated name.
    """
    out = []
    for item in items:
        name, sep, rest = item.partition(":")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
            raise UserError(f"--recipe={item!r} is not NAME:FLAGS (for example 'adapt:--bn=adapt --schedule=constant')")
        if name in RECIPES_BUILTIN or name in [n for n, _ in out]:
            raise UserError(f"--recipe name {name!r} is taken; the study always runs {', '.join(RECIPES_BUILTIN)}")
        try:
            flags_ = shlex.split(rest)
        except ValueError as e:
            raise UserError(f"--recipe={item!r}: {e}") from None
        bad = [f for f in flags_ if not f.startswith("--") or f.startswith("--workdir")]
        if bad:
            raise UserError(f"--recipe={item!r}: {bad[0]!r} is not a training --flag (each trial gets its own "
                            "--workdir)")
        out.append((name, flags_))
    return out


def recipe_trials(base_flags: list[str], recipes: list[tuple[str, list[str]]], seeds: list[str]) -> list[Trial]:
    """Per seed: the guide's recipe, the defaults, then each named recipe (its flags
    after the shared ones, so they override them)."""
    trials = []
    for name, extra in [("guide", []), ("default", []), *recipes]:
        for seed in seeds:
            values = {"recipe": name, SEED_KEY: seed}
            trials.append(Trial(trial_name(values), values, [*base_flags, *extra, f"--seed={seed}"],
                                trial_name({"recipe": name}), "guide" if name == "guide" else "train"))
    return trials


def run_recipe_study(root: str, train_flags: list[str], make_config: MakeConfig, *, seeds: list[str],
                     recipes: list[str], parallel: int = 1, rerun: bool = False, log=print) -> list[dict]:
    """The Keras guide's `model.fit` recipe against this codebase's defaults and any
    `--recipe=NAME:FLAGS`, on the same data, weights, stages and seeds: one table
    (mean, 95 % t-interval, paired difference against the guide) and one plot.

    Raises:
      UserError: invalid flags or recipes, stages the guide cannot run, or stale trials.
    """
    trials = recipe_trials(train_flags, parse_recipes(recipes), seeds)
    prepare(root, trials, make_config, rerun=rerun, log=log)
    run_all(root, trials, parallel=parallel, log=log)
    rows = collect(root, trials)
    keys = ["recipe", SEED_KEY]
    write_tables(root, rows, keys, title="Recipes: the Keras guide's model.fit recipe and this codebase's",
                 baseline=("recipe", "guide"))
    plot(root, rows, keys)
    write_hparams(root, trials)
    return rows
