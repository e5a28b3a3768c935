"""Shared launcher plumbing: quiet TF start-up, flag errors as exit status 2, and `guarded`:
every expected failure as one `error:` line and its exit status (research/errors.py)."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import warnings  # noqa: E402

from absl import flags  # noqa: E402

# Printed once per distributed dataset, about TF's own implementation; nothing to act on.
warnings.filterwarnings("ignore", message="To make it possible to preserve tf.data options")

# Exit statuses other tools rely on (research/errors.py maps the library's exceptions to them).
from research.errors import EXIT_INTERRUPTED, EXIT_NON_FINITE, EXIT_STORAGE, EXIT_USER_ERROR  # noqa: E402,F401


def parse_flags_or_exit(argv):
    """absl's flag parser, but a bad flag is a user error: exit 2, one message, no usage dump."""
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    from absl import logging
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # TF's INFO chatter drowns the progress bars
    return rest


def parse_own_flags_then_passthrough(argv):
    """The tool's own flags before `--`, then `launch.train` flags after it, passed on unparsed."""
    if "--" in argv:
        cut = argv.index("--")
        return parse_flags_or_exit(argv[:cut]) + argv[cut + 1:]
    return parse_flags_or_exit(argv)


def die(message: str, status: int) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def guarded(main):
    """`main` whose expected failures end in one line and their exit status, never a traceback."""
    from research import errors

    @functools.wraps(main)
    def run(argv):
        try:
            return main(argv)
        except (Exception, KeyboardInterrupt) as e:
            status = errors.exit_status_of(e)
            if status is None:
                raise
            die(errors.message_of(e), status)
    return run


# Start-up lines TensorFlow 2.21's C++ side prints before absl logging is initialised,
# whatever TF_CPP_MIN_LOG_LEVEL says (tensorflow issue 100442): informational on a
# machine without CUDA, and printed by every command.
_STARTUP_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} .*\] .*|E\d{4} .*cuda_platform\.cc:\d+\] failed call to cuInit.*"
    r"|To enable the following instructions: .*)$")


@contextlib.contextmanager
def quiet_tensorflow_startup():
    """Imports TensorFlow (and initialises its devices inside the block) without the
    start-up noise; any other line written to stderr meanwhile is shown as written."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2") == "0":  # asked for everything
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as buf:
        os.dup2(buf.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            buf.seek(0)
            for line in buf.read().decode(errors="replace").splitlines():
                if line.strip() and not _STARTUP_NOISE.match(line):
                    print(line, file=sys.stderr)


def start_tensorflow_quietly() -> None:
    """Imports TensorFlow and initialises its devices, without the start-up noise
    (for tools that do not pick a distribution strategy)."""
    with quiet_tensorflow_startup():
        import tensorflow as tf
        tf.config.list_logical_devices()



def ensemble_dir(runs: list[str]) -> str:
    """Where an ensemble's files go by default: `ensemble/` beside its runs (their common parent)."""
    return os.path.join(os.path.commonpath([os.path.abspath(r) for r in runs]), "ensemble")
