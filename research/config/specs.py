"""The config's two mini-languages, each parsed in one place into a typed value:
`--dataset` (`DatasetRef`) and unfreeze specs (`UnfreezeSpec`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from research.errors import UserError

SPEC_FORMS = ("none", "all", "top:K", "blocks:a,b", "from:NAME", "regex:PATTERN", "auto:K", "auto:rgn:K",
              "auto:probe:K")


SOURCE_KINDS = ("digits", "folder", "tfds", "tfrecord")


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


@dataclass(frozen=True)
class DatasetRef:
    """`--dataset` parsed, the one place its `KIND:ARG` form is read: `digits`, `folder`
    (ARG a path), `tfds` (a TFDS name) or `tfrecord` (a directory of shards)."""

    kind: str
    arg: str = ""

    @classmethod
    def parse(cls, text: str) -> "DatasetRef":
        kind, sep, arg = text.partition(":")
        return cls(kind, arg) if sep else cls(text)

    def __str__(self) -> str:
        return f"{self.kind}:{self.arg}" if self.arg or self.kind != "digits" else self.kind


@dataclass(frozen=True)
class UnfreezeSpec:
    """An unfreeze spec parsed, the one place its grammar is read (`SPEC_FORMS`); which
    blocks and variables it means for a backbone is research/model/unfreeze.py's.

    Attributes:
      text: the spec as written (`top:2`), for messages and records.
      kind: `none`, `all`, `top`, `blocks`, `from`, `regex` or `auto`.
      arg: what follows `KIND:` (`auto`: the K part).
      method / k: `auto:` specs' measure (`rgn` or `probe`) and K; `top:K`'s K.
    """

    text: str
    kind: str
    arg: str = ""
    method: str = ""
    k: int = 0

    @classmethod
    def parse(cls, text: str) -> "UnfreezeSpec":
        """Raises UserError: a spec of no known form (the block names are checked later, on the backbone)."""
        if text in ("none", "all"):
            return cls(text, text)
        kind, sep, arg = text.partition(":")
        if kind == "auto":
            m = re.fullmatch(r"(?:(rgn|probe):)?([1-9]\d*)", arg)
            check(m is not None, f"unfreeze spec {text!r} is not valid; auto specs are auto:K, auto:rgn:K (relative "
                  "gradient norms) or auto:probe:K (linear probes), K >= 1")
            return cls(text, kind, m.group(2), m.group(1) or "rgn", int(m.group(2)))
        check(bool(sep and arg and kind in ("top", "blocks", "from", "regex")),
              f"unfreeze spec {text!r} is not valid; allowed forms: {', '.join(SPEC_FORMS)}")
        if kind == "top":
            check(arg.isdigit(), f"unfreeze spec {text!r}: K must be a whole number")
            return cls(text, kind, arg, k=int(arg))
        if kind == "regex":
            try:
                re.compile(arg)
            except re.error as e:
                raise UserError(f"unfreeze spec {text!r}: invalid regular expression ({e})") from None
        return cls(text, kind, arg)

    def __str__(self) -> str:
        return self.text
