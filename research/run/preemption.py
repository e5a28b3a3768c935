"""SIGTERM/SIGINT as a flag the loop checks between step calls."""

from __future__ import annotations

import signal

from absl import logging


class Preemption:
    """Turns SIGTERM/SIGINT into a flag the loop checks between step calls, so the
    current steps finish and a checkpoint is written before exiting."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        if self.signum:  # a second signal: give up waiting
            raise KeyboardInterrupt
        self.signum = signum
        logging.warning("received %s: finishing the current steps, then saving a checkpoint",
                        signal.Signals(signum).name)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False
