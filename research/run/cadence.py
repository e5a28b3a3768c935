"""The one cadence rule for logging, evaluation, histograms and checkpoints."""


def itstime(step: int, every: int, total: int | None = None) -> bool:
    """big_vision's cadence rule: every `every` steps (0: never), and always at `total`."""
    return every > 0 and (step % every == 0 or step == total)
