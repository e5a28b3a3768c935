"""`auto:K` unfreeze specs: the stage's blocks chosen at its start, before any update.

`auto:rgn:K` (= `auto:K`) ranks blocks by their relative gradient norm on a few
training batches; `auto:probe:K` by linear probes of each block's features on
validation (research/model/probe.py). Test is never read. The choice is
recorded in the run state, so a resumed stage trains the same blocks without
measuring again, and in `trainable.json` and `results.json` with its scores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from research.config import UnfreezeSpec
from research.model import backbones
from research.run.actions.base import Action, Context

# `auto:rgn:K` measures gradients on this many training batches (no update).
RGN_BATCHES = 8


@dataclass
class AutoUnfreezeState:
    # {"stage", "spec", "method", "k", "scores", "blocks", "resolved", "seconds"} per stage
    choices: list = field(default_factory=list)


class AutoUnfreeze(Action):
    name = "auto_unfreeze"
    State = AutoUnfreezeState

    def _record(self, run, stage) -> dict | None:
        return next((r for r in self.state(run).choices if r["stage"] == stage.name and r["spec"] == stage.unfreeze),
                    None)

    def stage_start(self, ctx: Context, run, stage) -> None:
        auto = stage.spec.auto  # `auto:4`, or the auto part of `auto:4+norm`
        if auto is not None and self._record(run, stage) is None:
            self.state(run).choices.append(self._choose(ctx, run, stage, auto.method, auto.k))

    def unfreeze_spec(self, ctx: Context, run, stage, spec: UnfreezeSpec) -> UnfreezeSpec:
        record = self._record(run, stage)
        return UnfreezeSpec.parse(record["resolved"]) if record else spec

    def describe_trainable(self, ctx: Context, run, stage, record: dict) -> None:
        chosen = self._record(run, stage)
        if chosen is not None:  # why these blocks: the scores and the choice
            record["auto"] = {k: chosen[k] for k in ("spec", "method", "k", "scores", "seconds")}

    def results(self, run) -> dict:
        return {"auto_unfreeze": self.state(run).choices}  # [] without auto: specs

    def _choose(self, ctx: Context, run, stage, method: str, k: int) -> dict:
        """Scores every block with the weights the stage starts from, and picks K."""
        from research.model import probe

        t0 = time.perf_counter()
        backbone, m, pipeline = ctx.config.model.backbone, ctx.built, ctx.pipeline
        names = backbones.blocks(m.base, backbone)
        if method == "rgn":
            batches = pipeline.train_dataset(run.global_epoch, augment=False).take(RGN_BATCHES)
            scores = probe.relative_gradient_norms(m.model, backbone, batches, train_bn=ctx.config.model.train_bn)
            blocks = probe.choose_by_rgn(scores, names, k)
        else:
            feats, labels = probe.split_features(probe.tap_model(m.base, backbone), {
                "train": (pipeline.cached_train, pipeline.train_preprocess, ctx.source.num_train),
                "val": (pipeline.cached_val, pipeline.eval_preprocess, ctx.source.num_val)})
            rows = probe.probe_curve(feats, labels, names, log=lambda text: None)
            scores = {r["block"]: r["val_accuracy"] for r in rows}
            blocks = probe.choose_by_probe(rows, names, k)
        seconds = time.perf_counter() - t0
        ctx.say(f"stage {stage.name}: {stage.unfreeze} chose {', '.join(blocks)} by {method} "
                f"({', '.join(f'{b} {s:.3g}' for b, s in scores.items())}; {seconds:.1f}s)")
        return {"stage": stage.name, "spec": stage.unfreeze, "method": method, "k": k, "scores": scores,
                "blocks": blocks, "resolved": stage.spec.with_auto_resolved("blocks:" + ",".join(blocks)).text,
                "seconds": seconds}
