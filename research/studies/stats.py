"""Uncertainty over seeds: the intervals the sweep and study tables report.

A row of a table is a handful of seeds, so its spread is estimated with the
sample standard deviation (ddof=1) and the interval uses Student's t with n-1
degrees of freedom, not the normal 1.96. Two rows run on the same seeds are
compared by their per-seed differences (a paired t-interval), which cancels
what the seed does to both (data order, head initialisation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence

import numpy as np

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean over `n` values and its two-sided t-interval (`lo`, `hi` are NaN for n < 2)."""

    mean: float
    lo: float
    hi: float
    n: int

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
        return f"{f.format(self.mean)} [{f.format(self.lo)}, {f.format(self.hi)}]"


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean of `values` and its t-interval (ddof=1, n-1 degrees of freedom)."""
    from scipy import stats

    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, n)


def paired_difference(row: Mapping[Hashable, float], baseline: Mapping[Hashable, float],
                      confidence: float = CONFIDENCE) -> Interval:
    """`row - baseline` over the seeds both have: mean difference and its t-interval."""
    common = [k for k in row if k in baseline and row[k] is not None and baseline[k] is not None]
    return t_interval([row[k] - baseline[k] for k in common], confidence)
