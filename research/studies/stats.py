"""Uncertainty over seeds: the intervals the sweep and study tables report.

A row of a table is a handful of seeds, so its spread is estimated with the
sample standard deviation (ddof=1) and the interval uses Student's t with n-1
degrees of freedom, not the normal 1.96. Two rows run on the same seeds are
compared by their per-seed differences (a paired t-interval), which cancels
what the seed does to both (data order, head initialisation).

A t-interval knows nothing of what a metric can take: with 2 seeds it is 12.7
standard errors wide and runs past an accuracy of 1. Each interval is cut to
its metric's range (`bounds`), and one of fewer than `FEW` values says that it
means little.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence

import numpy as np

CONFIDENCE = 0.95
FEW = 3  # below this many values an interval is printed with a warning


# What each metric of the run's vocabulary can take, by its name after the split
# (`test/accuracy` -> `accuracy`). A new bounded metric (an F1, an AUC) adds its line;
# one not listed is not cut.
BOUNDS = {"accuracy": (0.0, 1.0), "top5_accuracy": (0.0, 1.0), "loss": (0.0, math.inf),
          "wall_time_s": (0.0, math.inf), "images_per_second": (0.0, math.inf)}


def bounds(metric: str) -> tuple[float, float]:
    """What `metric` can take (`BOUNDS`); (-inf, inf) for a metric not listed there."""
    return BOUNDS.get(metric.rsplit("/", 1)[-1], (-math.inf, math.inf))


def difference_bounds(metric: str) -> tuple[float, float]:
    """What a difference of two values of `metric` can take."""
    lo, hi = bounds(metric)
    return lo - hi, hi - lo


@dataclass(frozen=True)
class Interval:
    """A mean over `n` values and its two-sided t-interval (`lo`, `hi` are NaN for n < 2)."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def few(self) -> bool:
        return 2 <= self.n < FEW

    @property
    def has_interval(self) -> bool:
        return self.n >= 2 and math.isfinite(self.lo)

    def excludes_zero(self) -> bool:
        return self.has_interval and (self.lo > 0 or self.hi < 0)

    def format(self, signed: bool = False) -> str:
        """`0.8824 [0.8701, 0.8947]`; `+0.0131 [-0.0050, +0.0312]` when `signed`."""
        if not math.isfinite(self.mean):
            return ""
        f = "{:+.4f}" if signed else "{:.4f}"
        if not self.has_interval:
            return f.format(self.mean) + f" (n={self.n}, no interval)"
        text = f"{f.format(self.mean)} [{f.format(self.lo)}, {f.format(self.hi)}]"
        return text + (f" (only {self.n} seeds: too few for the interval to mean much)" if self.few else "")


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE,
               within: tuple[float, float] = (-math.inf, math.inf)) -> Interval:
    """The mean of `values` and its t-interval (ddof=1, n-1 degrees of freedom), cut to
    `within` (the metric's range: `bounds`)."""
    from scipy import stats

    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return Interval(mean, max(mean - half, within[0]), min(mean + half, within[1]), n)


def paired_difference(row: Mapping[Hashable, float], baseline: Mapping[Hashable, float],
                      confidence: float = CONFIDENCE, *, metric: str | None = None) -> Interval:
    """`row - baseline` over the seeds both have: mean difference and its t-interval, cut to
    what a difference of `metric` can take (None: not cut)."""
    common = [k for k in row if k in baseline and row[k] is not None and baseline[k] is not None]
    within = difference_bounds(metric) if metric else (-math.inf, math.inf)
    return t_interval([row[k] - baseline[k] for k in common], confidence, within)


def cv_interval(values: Sequence[float], folds: int, confidence: float = CONFIDENCE,
                within: tuple[float, float] = (-math.inf, math.inf)) -> Interval:
    """The mean of K-fold cross-validation scores (K folds x any number of repeats) and
    its corrected resampled t-interval (Nadeau and Bengio, 2003; Bouckaert and Frank, 2004).

    Fold scores are not independent: every pair of folds shares K-2 of its K-1 training
    parts. The plain t-interval treats them as independent and is too narrow; the
    correction widens the variance of the mean from s²/n to s²·(1/n + n_val/n_train), with
    n_val/n_train = 1/(K-1). Paired differences of two rows on the same folds and seeds
    use it too.
    """
    plain = t_interval(values, confidence)
    if plain.n < 2:
        return plain
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    from scipy import stats

    half = float(stats.t.ppf(0.5 + confidence / 2, plain.n - 1)
                 * math.sqrt(x.var(ddof=1) * (1 / plain.n + 1 / (folds - 1))))
    return Interval(plain.mean, max(plain.mean - half, within[0]), min(plain.mean + half, within[1]), plain.n)


def kendall_tau(scores: Sequence[float], truth: Sequence[float]) -> float:
    """Kendall's tau-b between a selection score and what it should predict (NaN when
    either is constant)."""
    from scipy import stats

    return float(stats.kendalltau(scores, truth).statistic)
