"""How a config field is declared (`opt`) and how a section checks its listed values:
shared by research/config/sections.py and research/config/stage.py."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

from research.config.specs import check


def opt(default: Any, help: str, *, flag: str | bool | None = None, enum: tuple | None = None,
        resume_safe: bool = False, head: bool = False, factory=None):
    """A config field.

    Args:
      default: its default (the flag's too).
      help: the flag's help text.
      flag: the flag's name if not the field's; False: no flag.
      enum: the allowed values; the flag refuses any other.
      resume_safe: may change on resume (and does not make a sweep trial stale).
      head: (stage fields) the head-only stage of `--head_epochs` takes it too.
      factory: a default factory instead of a default (nested sections).
    """
    md = {"help": help, "flag": flag, "enum": enum, "resume_safe": resume_safe, "head": head}
    if factory is not None:
        return field(default_factory=factory, metadata=md)
    return field(default=default, metadata=md)


def choice(name: str, value: str, allowed) -> None:
    check(value in allowed, f"--{name}={value!r} is not valid; allowed values: {', '.join(allowed)}")


def check_enums(section) -> None:
    for f in dataclasses.fields(section):
        if f.metadata.get("enum"):
            choice(f.metadata.get("flag") or f.name, getattr(section, f.name), f.metadata["enum"])
