"""Shared launcher plumbing: quiet TF start-up, flag errors and user errors as exit status 2."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

# Exit statuses other tools rely on.
EXIT_USER_ERROR = 2
EXIT_NON_FINITE = 3
EXIT_STORAGE = 4
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: try again (the run resumes)


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


def die(message: str, status: int) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)
