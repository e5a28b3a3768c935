"""Every refusal that needs neither TensorFlow nor a pixel, made before TensorFlow starts.

`launch.train` calls `check` before it imports TensorFlow, so a workdir in use, one
that cannot be written, one holding another run or a finished one, a folder with one
class or an empty `val/` cost well under two seconds, not a data load and a model
build. `train_and_evaluate` calls it again for callers of the library, but for the
folder's layout, which loading the data checks right after.
"""

from __future__ import annotations

import json
import os
import re

from research.config import ExperimentConfig, UserError, config_diff, writable_dir
from research.config.fields import with_defaults
from research.config import validate as validate_config
from research.data import layout
from research.model import backbones, unfreeze
from research.run import actions
from research.run import workdir as workdir_lib


def validate(config: ExperimentConfig) -> ExperimentConfig:
    """Every check of a config alone: its sections' (`research.config.validate`), each
    run option's own (`research.run.actions.check`), and every stage's unfreeze spec
    against the backbone's blocks (the registry names them; no model is built).

    Returns:
      The config with every path made absolute.

    Raises:
      UserError: naming the bad value and what is allowed.
    """
    config = validate_config(config)
    actions.check(config)
    m = config.model
    # The blocks the model keeps: a spec naming one the head's features drop is refused here.
    # (`auto` keeps what the probes choose at the run's start; the spec is checked then.)
    blocks = backbones.kept_blocks(m.backbone, "top" if m.features == "auto" else m.features)
    for stage in config.stages:
        try:
            unfreeze.resolve_blocks(stage.spec, blocks, backbone=m.backbone)
        except UserError as e:
            if m.features in ("top", "auto"):
                raise
            raise UserError(f"{e} (--features={m.features} keeps only these)") from None
    return config


def check(config: ExperimentConfig, workdir: str, *, allow_config_change: bool = False, chief: bool = True,
          data: bool = True) -> list[str]:
    """Refuses what would fail later for a reason the files already show.

    Args:
      config: a validated config (`validate`).
      workdir: the run's directory.
      chief: whether this process writes the run (the others neither lock nor write it).
      data: check a folder dataset's layout (its files are listed once more when the
        data is loaded: `train_and_evaluate`, which loads it next, passes False).

    Returns:
      The config changes of a resumed run (`changes_on_resume`).

    Raises:
      UserError: naming what is wrong.
    """
    workdir = os.path.abspath(workdir)
    if chief:
        if os.path.exists(workdir) and not os.path.isdir(workdir):
            raise UserError(f"--workdir={workdir!r} is a file, not a directory")
        if not writable_dir(workdir):
            raise UserError(f"--workdir={workdir!r} cannot be created or written into (a read-only place?)")
        workdir_lib.check_unlocked(workdir)
    changes = changes_on_resume(workdir, config, allow_config_change)
    if data and config.data.source.kind == "folder":
        names = layout.folder_splits(config.data)[0]
        layout.parse_classes(config.data.classes, names)
    return changes


def chief_of(strategy: str) -> bool:
    """Whether this process will write the run, from `--strategy` and `TF_CONFIG` alone (as
    `research.run.distribute.is_chief` decides it once TensorFlow runs)."""
    if strategy != "multi_worker" or "TF_CONFIG" not in os.environ:
        return True
    try:
        tf_config = json.loads(os.environ["TF_CONFIG"])
        task = tf_config.get("task", {})
        kind, index = task.get("type", "worker"), int(task.get("index", 0))
    except (ValueError, AttributeError, TypeError) as e:
        raise UserError(f"TF_CONFIG is not the JSON TensorFlow expects ({e}); see the README's multi-host "
                        "section") from None
    if "chief" in tf_config.get("cluster", {}):
        return kind == "chief"
    return kind == "worker" and index == 0


def changes_on_resume(workdir: str, config: ExperimentConfig, allow: bool) -> list[str]:
    """Compares `config` with the run already in `workdir` (reads only).

    Raises:
      UserError: the config changed, without `allow`.
    """
    path = os.path.join(workdir, "config.json")
    if not (os.path.exists(path) and workdir_lib.has_checkpoint(workdir)):
        return []  # nothing trained yet: the new config simply replaces the old one
    with open(path) as f:
        old = with_defaults(json.load(f))
    # A stage naming the run's optimizer and one leaving it empty are the same optimizer;
    # an optimizer that does differ is in `_stage_optimizer_changes`.
    diff = [d for d in config_diff(old, config.to_dict()) if not re.match(r"stages\.\d+\.optimizer:", d)]
    # The optimizer's slots are checkpointed by position: another optimizer would load one
    # slot's values into another (or fail to load at all); so would an option's own state.
    # So is the model: another `--features` is another set of variables, or other inputs to the head.
    fixed = ([d for d in diff if d.startswith(("train.optimizer:", "model.features:", "model.features_norm:"))]
             + _stage_optimizer_changes(old, config) + actions.resume_conflicts(old, config))
    if fixed:
        raise UserError(f"--workdir={workdir!r}: {'; '.join(fixed)}: changes the optimizer's checkpointed "
                        "state (or the model's variables or inputs, or an option's state), which cannot be "
                        "resumed even with --allow_config_change; start a new run from its weights: --workdir=NEW "
                        f"--weights=ckpt:{workdir}")
    if diff and os.path.exists(os.path.join(workdir, "results.json")):
        raise UserError(f"the run in {workdir!r} is finished; a changed config cannot be recorded for it "
                        f"(changed: {_summary(diff)}). To train further, start a new run from its weights: "
                        f"--workdir=NEW --weights=ckpt:{workdir}")
    if diff and not allow:
        raise UserError(f"--workdir={workdir!r} holds a run with a different config; changed: {_summary(diff)}; "
                        "use another --workdir, or pass --allow_config_change to resume with the new config")
    return diff


def _stage_optimizer_changes(old: dict, config: ExperimentConfig) -> list[str]:
    """Another optimizer for a stage both configs have, or another set of stage optimizers:
    each optimizer is a part of the checkpoint, with slots for its stages' variables."""
    run_old, run_new = old["train"]["optimizer"], config.train.optimizer
    before = [s.get("optimizer") or run_old for s in old.get("stages", [])]
    after = [s.optimizer_of(run_new) for s in config.stages]
    out = [f"stages.{i}.optimizer: {a!r} -> {b!r}" for i, (a, b) in enumerate(zip(before, after)) if a != b]
    if not out and set(before) - {run_old} != set(after) - {run_new}:
        out.append(f"stage optimizers: {sorted(set(before) - {run_old})} -> {sorted(set(after) - {run_new})}")
    return out


def _summary(diff: list[str], shown: int = 8) -> str:
    more = len(diff) - shown
    return "; ".join(diff[:shown]) + (f"; and {more} more (compare config.json)" if more > 0 else "")
