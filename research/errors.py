"""The one exception type of user mistakes, importable without TensorFlow.

Entry points turn a `UserError` into one clear message and exit status 2; it
lives here, apart from `config.py` and `backbones.py`, so that neither has to
import the other to raise it.
"""


class UserError(Exception):
    """A problem with what the user asked for (flags, data, spec, weights)."""
