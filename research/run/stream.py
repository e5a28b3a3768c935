"""The training data as one iterator across epochs and stages."""

from __future__ import annotations


class TrainingStream:
    """One training iterator across epochs and stages.

    The next epoch's batches are prepared while this one trains; the iterator is
    rebuilt only when it would not deliver the wanted epoch next: at start, on
    resume, and when switching to or from cached features.
    """

    def __init__(self, strategy, *, batches_per_epoch: int, accum: int):
        self.strategy = strategy
        self.batches_per_epoch = batches_per_epoch
        self.accum = accum
        self._at = None  # (kind, global epoch the iterator delivers next)
        self._iterator = None

    def iterator(self, source, kind: str, global_epoch: int, num_epochs: int, *, skip_steps: int):
        """The iterator that delivers `global_epoch` next (`skip_steps` into it when rebuilt)."""
        if self._at != (kind, id(source), global_epoch):
            self._iterator = iter(source.distribute(self.strategy, lambda: source.train_stream(
                global_epoch, num_epochs, batches_per_epoch=self.batches_per_epoch, skip=skip_steps * self.accum)))
            self._at = (kind, id(source), global_epoch)
        return self._iterator

    def epoch_done(self) -> None:
        if self._at is not None:
            self._at = (*self._at[:2], self._at[2] + 1)
