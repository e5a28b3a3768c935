"""Every exception the launchers map to an exit status, importable without TensorFlow.

`launch/common.py:exit_status_of` is the one mapping: `UserError` 2,
`NonFiniteLoss` 3, `StorageError` 4, `Interrupted` 75 (run the same command
again to resume).
"""

import signal


class UserError(Exception):
    """A problem with what the user asked for (flags, data, spec, weights)."""


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class StorageError(Exception):
    """The workdir cannot be written (disk full, permissions)."""


class Interrupted(Exception):
    """SIGTERM/SIGINT: what was done is saved and the same command resumes it."""

    def __init__(self, signum: int, path: str | None = None, *, what: str = "checkpoint"):
        where = f"; {what} saved at {path}" if path else ""
        super().__init__(f"interrupted by {signal.Signals(signum).name}{where}; "
                         "run the same command again to resume")
        self.signum = signum
