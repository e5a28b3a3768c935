"""Every exception the launchers map to an exit status, and the mapping, importable
without TensorFlow: `UserError` 2, `NonFiniteLoss` 3, `StorageError` (or an
operating-system error of storage) 4, `Interrupted` (or Ctrl-C) 75: run the same
command again to resume. `launch/common.py:guarded` applies it to every launcher.
"""

import errno
import signal

EXIT_USER_ERROR = 2
EXIT_NON_FINITE = 3
EXIT_STORAGE = 4
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: try again (the run resumes)


class UserError(Exception):
    """A problem with what the user asked for (flags, data, spec, weights)."""


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class StorageError(Exception):
    """The workdir cannot be written (disk full, permissions)."""


class Interrupted(Exception):
    """SIGTERM/SIGINT: what was done is saved and the same command resumes it."""

    def __init__(self, signum: int, path: str):
        where = f"; checkpoint saved at {path}"
        super().__init__(f"interrupted by {signal.Signals(signum).name}{where}; "
                         "run the same command again to resume")
        self.signum = signum


# Operating-system errors that mean "this storage cannot be written", not a bug.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def message_of(e: BaseException) -> str:
    """The one line an expected failure prints after `error: `."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted; what finished is kept, run the same command again to resume"
    if isinstance(e, OSError):
        where = f" {e.filename}" if e.filename else ""
        return f"storage error{where}: {e.strerror or e} (a full disk, a read-only or forbidden path?)"
    return str(e)


def exit_status_of(e: BaseException) -> int | None:
    """The exit status of an expected failure; None: a bug, to be shown as a traceback."""
    if isinstance(e, UserError):
        return EXIT_USER_ERROR
    if isinstance(e, NonFiniteLoss):
        return EXIT_NON_FINITE
    if isinstance(e, StorageError) or (isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS):
        return EXIT_STORAGE
    if isinstance(e, (Interrupted, KeyboardInterrupt)):
        return EXIT_INTERRUPTED
    return None
