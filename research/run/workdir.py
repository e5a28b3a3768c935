"""The workdir as files: who holds it (the lock), whether it has a checkpoint, and
JSON written whole. No TensorFlow: a launcher refuses a busy workdir, or one that
holds another run, before it starts TensorFlow."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import tempfile
import time

from research.errors import UserError


def check_unlocked(workdir: str) -> None:
    """Fails fast when another process holds the workdir (the lock itself is taken
    later, by `workdir_lock`, once everything has been checked).

    Raises:
      UserError: naming the process that holds it.
    """
    path = os.path.join(workdir, ".lock")
    if not os.path.exists(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        _flock_or_refuse(fd, fcntl.LOCK_SH, workdir)
    finally:
        os.close(fd)


def _flock_or_refuse(fd: int, mode: int, workdir: str) -> None:
    """Takes `mode` on the lock file without waiting, or names the process holding it."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
        raise UserError(f"--workdir={workdir!r} is in use by {owner}; wait for it to finish, "
                        "stop it, or use another --workdir") from None


def has_checkpoint(workdir: str) -> bool:
    """Whether `WORKDIR/ckpt/checkpoint` lists a checkpoint (as `tf.train.get_checkpoint_state`
    reads that text file, without TensorFlow)."""
    try:
        with open(os.path.join(workdir, "ckpt", "checkpoint")) as f:
            return any(line.startswith("all_model_checkpoint_paths:") for line in f)
    except OSError:
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str, obj) -> None:
    """Writes JSON under a temporary name and renames it: never half-written.

    `mkstemp` creates files readable by the owner only; the file gets the mode
    any other file of the workdir gets (0666 minus the umask), so collaborators
    can read a run. Keys keep the order they were made in (a stage's fields as the
    config declares them, an `auto:` choice's scores input to output), not sorted.
    """
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=".json")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def workdir_lock(workdir: str, *, enabled: bool = True):
    """Only one process runs in a workdir at a time.

    An advisory `flock` on `WORKDIR/.lock`, which holds the owner's pid, host and
    start time for the message a second process gets. The kernel releases the
    lock when its process dies, so a killed run's lock is taken over at once.
    Creates the workdir; on an error inside the block, a workdir this call
    created and that stayed empty but for the lock is removed again, so a
    mistake leaves nothing behind.

    Raises:
      UserError: the workdir cannot be created, or another process holds it.
    """
    if not enabled:  # non-chief multi-worker replicas: the chief holds the lock
        yield
        return
    created = not os.path.exists(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--workdir={workdir!r} cannot be created: {e.strerror}") from None
    if not os.access(workdir, os.W_OK):
        raise UserError(f"--workdir={workdir!r} is not writable")
    path = os.path.join(workdir, ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _flock_or_refuse(fd, fcntl.LOCK_EX, workdir)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})\n"
                  .encode(), 0)
        try:
            yield
        except BaseException:
            if created and os.listdir(workdir) == [".lock"]:
                os.remove(path)
                os.rmdir(workdir)
            raise
    finally:
        os.close(fd)  # releases the flock
