"""`--histogram_every_epochs=N`: TensorBoard histograms of the trainable weights every N
epochs (counted over the whole run) and at the last."""

from __future__ import annotations

from research.run.actions.base import Action, Context
from research.run.cadence import itstime


class Histograms(Action):
    name = "histograms"

    @classmethod
    def enabled(cls, config) -> bool:
        return config.train.histogram_every_epochs > 0

    def epoch_end(self, ctx: Context, run, stage, metrics: dict, selection, last: bool) -> None:
        epoch_number = run.global_epoch + 1
        if itstime(epoch_number, self.config.train.histogram_every_epochs, epoch_number if last else None):
            ctx.summaries.histograms("train", selection.variables, ctx.step())
