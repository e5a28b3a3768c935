"""The test split, scored once after the last epoch, so no decision of the run can depend on it.

It scores the final weights (and each weight variant, `test_ema/`), and the run's
best weights when they differ, into `results.json`'s `final` and `best`. The
checkpoint that marks the run finished carries the scores: a kill before it
repeats only the stage end.
"""

from __future__ import annotations

from absl import logging

from research.run.actions.base import Action, Context


class TestEvaluation(Action):
    name = "test_evaluation"

    def run_end(self, ctx: Context, run) -> None:
        from research.run.run_state import headline, prefixed

        ds = ctx.pipeline.test_dataset()
        if ds is None:
            return
        final = prefixed("test", ctx.evaluate(ds))
        for name in ctx.variants:
            with ctx.weights(name):
                final.update(prefixed(f"test_{name}", ctx.evaluate(ds)))
        run.final.update(final)
        best = run.best
        if best is not None:
            restored = run.stages[-1]["weights_from"] != "last epoch"
            if restored or (best["global_epoch"] == run.global_epoch - 1 and best["weights"] == "trained"):
                best.update({k: v for k, v in final.items() if k.startswith("test/")})  # the same weights
            else:
                kept = ctx.built.model.get_weights()
                if ctx.ckpts.restore_best_weights() is None:
                    logging.warning("best/ holds no checkpoint; its weights are not scored on test")
                else:
                    best.update(prefixed("test", ctx.evaluate(ds)))
                ctx.built.model.set_weights(kept)
        for split in ["test"] + [f"test_{name}" for name in ctx.variants]:
            scalars = {k.removeprefix(f"{split}/"): v for k, v in final.items() if k.startswith(f"{split}/")}
            if scalars:
                ctx.summaries.scalars(split, scalars, ctx.step())
        ctx.say(f"  test (final weights): {headline(final)}"
                + (f"; best epoch's: {headline(best)}" if best and "test/accuracy" in best else ""))
