"""One training stage's settings (`StageConfig`): a run has one or more, in order."""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

from research.config.declare import check_enums as _check_enums
from research.config.declare import opt
from research.config.specs import UnfreezeSpec, check
from research.errors import UserError

SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adam", "sgd", "adamw")


@dataclass(frozen=True)
class StageConfig:
    """One training stage: what is trainable, for how long, how fast.

    `unfreeze` is an unfreeze spec (`none`, `all`, `top:K`, `blocks:a,b`, `from:NAME`,
    `regex:PATTERN`, `auto:K`, `norm`, `bias`, `lora:R[@SPEC]`, parts joined by `+`), see
    research/model/unfreeze.py. With `gradual_every`,
    the stage starts with the top block of its spec and unfreezes one more block every
    that many epochs; with `lr_decay_per_block`, block i below the top trains at
    lr * decay**i. The flags set the fine-tuning stage (and, for the fields marked
    `head=True`, the head-only stage of `--head_epochs`); `--stages` sets every stage.
    """

    name: str = opt("train", "", flag=False)
    unfreeze: str = opt("all", "Unfreeze spec of the (fine-tuning) stage: none | all | top:K | blocks:a,b | "
                        "from:NAME | regex:PAT | auto:K (= auto:rgn:K) | auto:probe:K (chosen at the stage's start) "
                        "| norm (normalisation gamma/beta in every block) | bias (every bias plus the normalisation "
                        "beta: BitFit; the convolutions of mobilenet, mobilenet_v2, inception_v3, xception and "
                        "small_cnn have no bias, so there it is the beta alone) | lora:R or lora:R@SPEC (LoRA "
                        "factors of rank R on the Conv/Dense layers of SPEC's blocks, default all) | parts joined "
                        "by +, e.g. top:2+norm")
    epochs: int = opt(20, "Epochs of the (fine-tuning) stage.", flag="finetune_epochs")
    lr: float = opt(2e-3, "Learning rate (of the head stage, and of fine-tuning unless --finetune_lr).", head=True)
    schedule: str = opt("cosine", "Learning-rate schedule within each stage.", enum=SCHEDULES, head=True)
    warmup_epochs: float = opt(0.0, "Linear warmup at the start of each stage, in epochs.", head=True)
    gradual_every: int = opt(0, "Gradual unfreezing: one more block every N epochs (0: off).")
    lr_decay_per_block: float = opt(1.0, "Layer-wise LR decay per block below the top (1: off).")
    base_lr_ratio: float = opt(1.0, "The base's learning rate as a fraction of the head's (fastai's discriminative "
                               "rates; 1: the same; times the layer-wise decay).")
    zero_lr_steps: int = opt(0, "The stage's first N steps update at learning rate 0: no weight moves, the "
                             "optimizer's moments (Adam's) are estimated on N batches first; the schedule (warmup, "
                             "decay) starts after them.")
    optimizer: str = opt("", f"The stage's own optimizer: {' | '.join(OPTIMIZERS)} (empty: --optimizer's). A stage "
                         "with another optimizer than the run's gets one of its own, with its own slots and step "
                         "count, checkpointed beside the run's (SGD takes --momentum).", flag="finetune_optimizer")
    continue_schedule: bool = opt(False, "The stage does not restart the learning-rate schedule: it goes on "
                                  "with the previous stage's (its lr, schedule, warmup), which then spans both "
                                  "stages' planned steps (it starts at its planned place, also after an early "
                                  "stop); the stage's own lr, schedule and warmup are not used.")
    patience: int | None = opt(None, "", flag=False)

    def validate(self) -> None:
        s = self
        _check_enums(s)
        check(re.fullmatch(r"[A-Za-z0-9_.-]+", s.name) is not None,
              f"stage name {s.name!r} may only contain letters, digits, '_', '.', '-'")
        check(s.epochs >= 1, f"stage {s.name!r}: epochs={s.epochs} must be >= 1")
        check(s.lr > 0 and math.isfinite(s.lr), f"stage {s.name!r}: lr={s.lr} must be a finite number > 0")
        check(0 <= s.warmup_epochs <= s.epochs,
              f"stage {s.name!r}: warmup_epochs={s.warmup_epochs} must be in [0, epochs={s.epochs}]")
        check(s.gradual_every >= 0, f"stage {s.name!r}: gradual_every={s.gradual_every} must be >= 0")
        check(0 < s.lr_decay_per_block <= 1,
              f"stage {s.name!r}: lr_decay_per_block={s.lr_decay_per_block} must be in (0, 1]")
        check(0 < s.base_lr_ratio <= 1e3 and math.isfinite(s.base_lr_ratio),
              f"stage {s.name!r}: base_lr_ratio={s.base_lr_ratio} must be in (0, 1000] (1: off)")
        check(s.zero_lr_steps >= 0, f"stage {s.name!r}: zero_lr_steps={s.zero_lr_steps} must be >= 0")
        check(s.patience is None or s.patience >= 0, f"stage {s.name!r}: patience must be >= 0")
        check(s.optimizer in ("", *OPTIMIZERS), f"stage {s.name!r}: optimizer={s.optimizer!r} is not valid; "
              f"allowed values: {', '.join(OPTIMIZERS)} (or empty: the run's --optimizer)")
        check(not (s.continue_schedule and s.zero_lr_steps),
              f"stage {s.name!r}: zero_lr_steps restarts the schedule at 0, which continue_schedule does not do")
        try:
            s.spec
        except UserError as e:
            raise UserError(f"stage {s.name!r}: {e}") from None
        check(not s.gradual_every or any(p.kind in ("all", "top", "blocks", "from", "auto") for p in s.spec.each),
              f"stage {s.name!r}: gradual unfreezing adds whole blocks, and {s.unfreeze!r} names none "
              "(norm, bias, lora: and regex: parts train from the stage's start)")

    def describe(self, run_optimizer: str, lead: StageConfig | None = None) -> str:
        """The stage in the run's printed plan (`lead`: the stage whose schedule it continues,
        the first of `schedule_span`)."""
        rate = (f"continuing stage {lead.name}'s schedule" if self.continue_schedule and lead else
                f"at lr {self.lr:g} ({self.schedule}"
                f"{f', warmup {self.warmup_epochs:g} epoch(s)' if self.warmup_epochs else ''})")
        extras = [f"{self.zero_lr_steps} zero-LR step(s) first" if self.zero_lr_steps else "",
                  f"the base at lr x {self.base_lr_ratio:g}" if self.base_lr_ratio != 1 else "",
                  f"lr x {self.lr_decay_per_block:g} per block down" if self.lr_decay_per_block != 1 else "",
                  f"one more block every {self.gradual_every} epoch(s)" if self.gradual_every else ""]
        return ", ".join([f"unfreeze {self.unfreeze}", f"{self.epochs} epoch(s) {rate}",
                          self.optimizer_of(run_optimizer), *filter(None, extras)])

    def optimizer_of(self, run_optimizer: str) -> str:
        """The optimizer that steps this stage, given the run's `--optimizer`."""
        return self.optimizer or run_optimizer

    @property
    def rescaled_updates(self) -> list[str]:
        """The options of this stage that scale some variables' updates (a per-variable rate)."""
        return [k for k in ("lr_decay_per_block", "base_lr_ratio") if getattr(self, k) != 1.0]

    @functools.cached_property
    def spec(self) -> UnfreezeSpec:
        """`unfreeze`, parsed once per config (the field stays the string of the flag and config.json)."""
        return UnfreezeSpec.parse(self.unfreeze)


def schedule_span(stages: tuple[StageConfig, ...], index: int) -> list[StageConfig]:
    """The stages whose one schedule `stages[index]` runs on: itself, and the stages it
    continues (`continue_schedule`) or that continue it."""
    first = last = index
    while first > 0 and stages[first].continue_schedule:
        first -= 1
    while last + 1 < len(stages) and stages[last + 1].continue_schedule:
        last += 1
    return list(stages[first:last + 1])
