"""`--cache_features`: a head-only stage trains the head on features computed once
(research/run/features.py says how, and why the result is the same)."""

from __future__ import annotations

from absl import logging

from research.run.actions.base import Action, Context, Inputs


class CachedFeatures(Action):
    """`--cache_features`: a head-only stage without augmentation, on data not sharded by
    worker, trains the head on features computed once (an `Inputs` of kind `features`)."""

    name = "cache_features"

    @classmethod
    def enabled(cls, config) -> bool:
        return config.train.cache_features

    def __init__(self, config):
        super().__init__(config)
        self._cache = None  # research.run.features.FeatureCache
        self._trainer = None

    def base_changed(self, ctx: Context) -> None:
        self._cache = None  # computed with the old statistics

    def best_restored(self, ctx: Context) -> None:
        self._cache = None  # computed with other weights

    def trainable_set(self, ctx: Context, run, stage, selection, inputs) -> None:
        from research.model import unfreeze
        if len(selection.variables) > len(unfreeze.head_variables(ctx.built.model)):
            self._cache = None  # this set trains the base: its features will change

    def inputs(self, ctx: Context, run, stage, selection, limit) -> Inputs | None:
        from research.run.features import FeatureCache
        from research.model import unfreeze
        from research.run.loop import Trainer

        head_only = len(selection.variables) == len(unfreeze.head_variables(ctx.built.model))
        aug = ctx.config.augment
        # Features are extracted from this worker's images only when it reads its own shards,
        # and FeatureCache streams them as if every worker had every image.
        if not head_only or aug.enabled or aug.mixes or ctx.pipeline.sharded:
            if run.epoch == 0 and limit in (None, 1):
                logging.warning("stage %s: --cache_features applies to head-only stages without augmentation, on "
                                "data not sharded by worker; training through the base", stage.name)
            return None
        if self._cache is None:
            self._cache = FeatureCache(ctx.built.model, ctx.pipeline)
            t = ctx.config.train
            self._trainer = Trainer(self._cache.head, ctx.built.optimizer, strategy=ctx.strategy,
                                    grad_accum_steps=ctx.trainer.grad_accum_steps, jit_compile=ctx.trainer.jit_compile,
                                    label_smoothing=t.label_smoothing, class_weights=ctx.class_weights)
            ctx.say(f"cached base features of {len(self._cache.train_y)} training and "
                    f"{len(self._cache.val_y)} validation images in {self._cache.seconds:.1f}s")
        return Inputs("features", self._trainer, self._cache, self._cache.val_dataset)
