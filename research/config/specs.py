"""The config's two mini-languages, each parsed in one place into a typed value:
`--dataset` (`DatasetRef`) and unfreeze specs (`UnfreezeSpec`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from research.errors import UserError

SPEC_FORMS = ("none", "all", "top:K", "blocks:a,b", "from:NAME", "regex:PATTERN", "auto:K", "auto:rgn:K",
              "auto:probe:K", "norm", "bias", "lora:R", "lora:R@SPEC", "A+B")
# Specs that pick parameters by what they are, in every block, instead of blocks.
PARAM_KINDS = ("norm", "bias")


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

    A spec is one part (`top:2`, `norm`) or several joined by `+` (`top:2+norm`): the
    union of what each part trains. A `regex:` part reads to the end of the spec (its
    pattern may hold a `+`), so it comes last.

    Attributes:
      text: the spec as written (`top:2`), for messages and records.
      kind: `none`, `all`, `top`, `blocks`, `from`, `regex`, `auto`, `norm`, `bias`, `lora`,
        or `+` for several parts.
      arg: what follows `KIND:` (`auto`: the K part).
      method / k: `auto:` specs' measure (`rgn` or `probe`) and K; `top:K`'s K; `lora:R`'s rank.
      parts: a `+` spec's parts, in the order written.
      inner: `lora:R@SPEC`'s SPEC, the blocks whose layers get LoRA (`all` when not given).
    """

    text: str
    kind: str
    arg: str = ""
    method: str = ""
    k: int = 0
    parts: tuple["UnfreezeSpec", ...] = ()
    inner: "UnfreezeSpec | None" = None

    @classmethod
    def parse(cls, text: str) -> "UnfreezeSpec":
        """Raises UserError: a spec of no known form (the block names are checked later, on the backbone)."""
        head, regex, tail = text.partition("regex:")
        texts = head.split("+") if "+" in head else [head]
        if regex:
            texts[-1] += regex + tail
        if len(texts) == 1:
            return cls._parse_part(text)
        check(all(texts), f"unfreeze spec {text!r}: an empty part around '+'; join parts as top:2+norm")
        parts = tuple(cls._parse_part(t) for t in texts)
        kinds = [p.kind for p in parts]
        blocks = [k for k in kinds if k not in PARAM_KINDS]
        check("all" not in kinds or len(blocks) == 1,
              f"unfreeze spec {text!r}: 'all' already holds every block; join it only with norm or bias")
        check("none" not in kinds, f"unfreeze spec {text!r}: 'none' adds nothing to a '+' spec; drop it")
        check(sum(p.auto is not None for p in parts) <= 1, f"unfreeze spec {text!r}: at most one auto: part")
        check(kinds.count("lora") <= 1, f"unfreeze spec {text!r}: at most one lora: part (one rank per run)")
        check(len(set(texts)) == len(texts), f"unfreeze spec {text!r} names a part twice")
        return cls(text, "+", parts=parts)

    @classmethod
    def _parse_part(cls, text: str) -> "UnfreezeSpec":
        if text in ("none", "all", *PARAM_KINDS):
            return cls(text, text)
        kind, sep, arg = text.partition(":")
        if kind == "lora":
            rank, at, inner = arg.partition("@")
            check(rank.isdigit() and int(rank) >= 1 and (not at or inner),
                  f"unfreeze spec {text!r} is not valid; LoRA specs are lora:R or lora:R@SPEC (R >= 1, SPEC the "
                  "blocks: all, top:K, blocks:a,b, from:NAME or auto:K)")
            inner_spec = cls._parse_part(inner or "all")
            check(inner_spec.kind in ("all", "top", "blocks", "from", "auto"),
                  f"unfreeze spec {text!r}: after '@' comes the blocks whose layers get LoRA (all, top:K, "
                  "blocks:a,b, from:NAME or auto:K)")
            return cls(text, kind, arg, k=int(rank), inner=inner_spec)
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

    @property
    def each(self) -> tuple["UnfreezeSpec", ...]:
        """The parts (a one-part spec is its own only part)."""
        return self.parts or (self,)

    @property
    def auto(self) -> "UnfreezeSpec | None":
        """The `auto:` part (or `lora:R@auto:K`'s), chosen at the stage's start, or None."""
        for p in self.each:
            if p.kind == "auto":
                return p
            if p.inner is not None and p.inner.kind == "auto":
                return p.inner
        return None

    @property
    def lora(self) -> "UnfreezeSpec | None":
        """The `lora:` part, or None."""
        return next((p for p in self.each if p.kind == "lora"), None)

    def with_auto_resolved(self, blocks_spec: str) -> "UnfreezeSpec":
        """This spec with its `auto:` part replaced by the blocks it chose (`blocks:a,b`)."""
        def resolved(p):
            if p.kind == "auto":
                return blocks_spec
            if p.inner is not None and p.inner.kind == "auto":
                return f"lora:{p.k}@{blocks_spec}"
            return p.text
        return UnfreezeSpec.parse("+".join(resolved(p) for p in self.each))
