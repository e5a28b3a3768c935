"""What is derived from the field declarations of research/config/sections.py: the flag
of every field, a config from flag values, the `--stages` mini-language, the
simple head-then-fine-tune stages, and the comparison of two configs on resume.
Nothing here lists fields: a field added to a section appears everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from typing import Any

from absl import logging

from research.config.sections import ExperimentConfig, StageConfig, check
from research.errors import UserError


@dataclass(frozen=True)
class FlagField:
    """One config field as a command-line flag.

    Attributes:
      flag: the flag's name (the field's, unless its metadata names another).
      path: where the field sits in the config, e.g. `("train", "early_stopping", "patience")`.
      type: bool, int, float or str.
      default / help / enum: the field's.
    """

    flag: str
    path: tuple[str, ...]
    type: type
    default: Any
    help: str
    enum: tuple | None


def _leaf_type(hint) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def flag_fields(cls: type = ExperimentConfig, prefix: tuple[str, ...] = ()) -> list[FlagField]:
    """Every field of `cls` and of its nested sections that has a flag, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind = _leaf_type(hints[f.name])
        if f.metadata.get("flag") is False:
            continue
        if dataclasses.is_dataclass(kind):
            out += flag_fields(kind, prefix + (f.name,))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append(FlagField(f.metadata.get("flag") or f.name, prefix + (f.name,), kind, default,
                             f.metadata.get("help", ""), f.metadata.get("enum")))
    return out


def from_flat(cls: type, values: dict[tuple[str, ...], Any], prefix: tuple[str, ...] = (), **top) -> Any:
    """`cls` with the field at each path of `values` set (the rest default); `top`: fields of `cls` itself."""
    hints = typing.get_type_hints(cls)
    kwargs = dict(top)
    for f in dataclasses.fields(cls):
        if f.name in kwargs:
            continue
        kind, path = _leaf_type(hints[f.name]), prefix + (f.name,)
        if dataclasses.is_dataclass(kind):
            kwargs[f.name] = from_flat(kind, values, path)
        elif path in values:
            kwargs[f.name] = values[path]
    return cls(**kwargs)


def resume_safe_fields(cls: type = ExperimentConfig, prefix: str = "") -> set[str]:
    """The dotted names of the fields that may change on resume (`opt(resume_safe=True)`)."""
    hints, out = typing.get_type_hints(cls), set()
    for f in dataclasses.fields(cls):
        kind = _leaf_type(hints[f.name])
        if dataclasses.is_dataclass(kind):
            out |= resume_safe_fields(kind, f"{prefix}{f.name}.")
        elif f.metadata.get("resume_safe"):
            out.add(f"{prefix}{f.name}")
    return out


# Fields that may change on resume: they change speed or bookkeeping, not the maths.
# The same list decides when a sweep trial that ran before counts as stale.
RESUME_SAFE_FIELDS = resume_safe_fields()


# --- The `--stages` mini-language -------------------------------------------------

_STAGE_TYPES = {f.name: _leaf_type(typing.get_type_hints(StageConfig)[f.name]) for f in dataclasses.fields(StageConfig)}
_STAGE_ALIASES = {"warmup": "warmup_epochs"}


def parse_stages(text: str) -> tuple[StageConfig, ...]:
    """Parses `--stages`.

    Stages are separated by `;`; each is whitespace-separated `key=value` pairs:

        unfreeze=none epochs=10 lr=1e-3; unfreeze=top:2 epochs=5 lr=1e-4 warmup=1

    Keys: every `StageConfig` field (name, unfreeze, epochs, lr, schedule,
    warmup_epochs or warmup, gradual_every, lr_decay_per_block, patience, ...).
    Unnamed stages are called `stage0`, `stage1`, ...

    Raises:
      UserError: on an unknown key or a value of the wrong type.
    """
    keys = [*_STAGE_TYPES, *_STAGE_ALIASES]
    stages = []
    parts = [p.strip() for p in text.split(";") if p.strip()]
    check(bool(parts), f"--stages={text!r} defines no stage; example: "
          "'unfreeze=none epochs=10 lr=1e-3; unfreeze=top:2 epochs=5 lr=1e-4'")
    for i, part in enumerate(parts):
        kwargs: dict[str, Any] = {"name": f"stage{i}"}
        for tok in part.split():
            key, sep, value = tok.partition("=")
            check(bool(sep) and key in keys, f"--stages: {tok!r} in stage {i} (counted from 0) is not key=value "
                  f"with a known key; allowed keys: {', '.join(keys)}")
            name = _STAGE_ALIASES.get(key, key)
            try:
                kwargs[name] = _parse_bool(value) if _STAGE_TYPES[name] is bool else _STAGE_TYPES[name](value)
            except ValueError:
                raise UserError(f"--stages: {key}={value!r} in stage {i} (counted from 0) is not a valid "
                                f"{_STAGE_TYPES[name].__name__}"
                                + (" (1, true, yes, 0, false or no)" if _STAGE_TYPES[name] is bool else "")) from None
        given = [tok.partition("=")[0] for tok in part.split()]
        unused = [k for k in given if _STAGE_ALIASES.get(k, k) in ("lr", "schedule", "warmup_epochs")
                  ] if kwargs.get("continue_schedule") else []
        check(not unused, f"--stages: stage {i} (counted from 0) continues the schedule of the stage before it, "
              f"so its own {', '.join(unused)} would not be used; drop {'it' if len(unused) == 1 else 'them'}")
        stages.append(StageConfig(**kwargs))
    return tuple(stages)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise ValueError(text)


def simple_stages(*, head_epochs: int, finetune_lr: float | None, **stage: Any) -> tuple[StageConfig, ...]:
    """The common recipe: an optional head-only stage, then a fine-tuning stage.

    Args:
      head_epochs: epochs of the head-only stage (0: none).
      finetune_lr: the fine-tuning stage's learning rate (None: `lr`).
      **stage: `StageConfig` fields of the fine-tuning stage; the head stage takes
        those declared `head=True` (lr, schedule, warmup) and trains only the head.

    Raises:
      UserError: a negative number of epochs (the stages themselves are checked
        by `validate`, the same checks as for `--stages`).
    """
    epochs = stage.get("epochs", StageConfig.epochs)
    check(head_epochs >= 0, f"--head_epochs={head_epochs} must be >= 0 (0: no head-only stage)")
    check(epochs >= 0, f"--finetune_epochs={epochs} must be >= 0")
    shared = {f.name: stage[f.name] for f in dataclasses.fields(StageConfig)
              if f.metadata.get("head") and f.name in stage}
    stages = []
    if head_epochs > 0:
        stages.append(StageConfig(**shared, name="head", unfreeze="none", epochs=head_epochs))
    if epochs > 0:
        lr = finetune_lr or stage.get("lr", StageConfig.lr)
        if finetune_lr and stage.get("continue_schedule") and head_epochs > 0:
            # Kept in the config as given (a sweep's trials stay the same trials); said here.
            logging.warning("--finetune_lr=%g is not used: with --continue_schedule the fine-tuning stage goes on "
                            "with the head stage's schedule (--lr=%g)", finetune_lr, shared.get("lr", StageConfig.lr))
        stages.append(StageConfig(**dict(stage, name="finetune" if head_epochs > 0 else "train", lr=lr)))
    return tuple(stages)


# --- Comparing configs -------------------------------------------------------------

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


def with_defaults(old: dict) -> dict:
    """A `config.json` written earlier, read back through `ExperimentConfig.from_dict`: a
    field added to the code since then takes its default (one removed since: as written)."""
    try:
        return ExperimentConfig.from_dict(old).to_dict()
    except (TypeError, KeyError):
        return old


def config_diff(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every field that differs and changes the maths.

    The old config is read `with_defaults`; then every key counts, including a stage
    that only one of them has.
    """
    old = with_defaults(old)
    a, b = _flatten(json.loads(json.dumps(old))), _flatten(json.loads(json.dumps(new)))
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "(absent)") != b.get(k, "(absent)")
                  and k not in RESUME_SAFE_FIELDS)
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in keys]
