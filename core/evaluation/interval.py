"""95% intervals for a task's scores from its per-example values, so that a score measured on 50 examples is
shown with its uncertainty, and a partial result (the first batch of examples) with how far it may move.

Every metric MoEScope reports per task is a weighted mean of per-example values: exact match, F1 and accuracy
weigh every example alike; the loss (nll) weighs each text by its scored tokens. The interval of such a mean is
the ratio estimator's normal interval (Cochran, *Sampling Techniques*, 6.3); for 0/100 metrics (exact match,
accuracy) alone it is Wilson's score interval, which stays honest at 0% or 100% where the normal one collapses
to a point. A change between two models scored on the same examples is paired: the interval of the mean
per-example difference, much narrower than two separate intervals suggest.

Written here rather than taken from scipy or statsmodels: neither is a dependency, and the three formulas are
a few lines each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # standard normal quantile at 0.975


def _weighted(values: Sequence[float], weights: Sequence[float] | None) -> tuple[list[float], list[float]]:
    w = [1.0] * len(values) if weights is None else [float(x) for x in weights]
    if len(w) != len(values):
        raise ValueError(f"{len(values)} values but {len(w)} weights")
    return [float(v) for v in values], w


def mean_interval(values: Sequence[float], weights: Sequence[float] | None = None,
                  z: float = Z95) -> tuple[float, float]:
    """(low, high) of the weighted mean of ``values``: the ratio estimator's normal interval,
    mean ± z·sqrt(Σ w²(v − mean)² / (n(n − 1)) ) / mean(w). With a single value it is unbounded."""
    v, w = _weighted(values, weights)
    n = len(v)
    if n == 0:
        return math.nan, math.nan
    total = sum(w)
    mean = sum(a * b for a, b in zip(v, w)) / total
    if n < 2:
        return -math.inf, math.inf
    spread = sum((b * (a - mean)) ** 2 for a, b in zip(v, w)) / (n * (n - 1))
    half = z * math.sqrt(spread) / (total / n)
    return mean - half, mean + half


def wilson_interval(successes: float, n: int, scale: float = 100.0, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval of a proportion, in units of ``scale`` (100: percent)."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return scale * max(0.0, centre - half), scale * min(1.0, centre + half)


def score_interval(values: Sequence[float], weights: Sequence[float] | None = None) -> tuple[float, float]:
    """The 95% interval of one model's score: Wilson's for 0/100 values with equal weights, else the ratio
    estimator's."""
    if weights is None and values and all(v in (0.0, 100.0) for v in values):
        return wilson_interval(sum(v == 100.0 for v in values), len(values))
    return mean_interval(values, weights)


def change_interval(pruned: Sequence[float], full: Sequence[float],
                    weights: Sequence[float] | None = None) -> tuple[float, float]:
    """The 95% interval of (pruned − full) when both were scored on the same examples: the interval of the
    weighted mean per-example difference."""
    if len(pruned) != len(full):
        raise ValueError(f"{len(pruned)} pruned values but {len(full)} full-model values: not the same examples")
    return mean_interval([a - b for a, b in zip(pruned, full)], weights)
