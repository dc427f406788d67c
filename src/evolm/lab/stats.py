"""Is a variant's loss really different from the baseline's? Seeds, intervals, a test.

A small-scale ablation is noisy: two seeds of the same model differ by about as much as many
innovations buy. Each variant is run with several seeds (the same data order and held-out set per
seed for every variant), and its final losses are compared with the baseline's by Welch's t-test
(Welch 1947: unequal variances, Welch-Satterthwaite degrees of freedom), which needs no pairing
and no equal spread. ``compare`` returns the difference of means, its 95% confidence interval and
the two-sided p-value; ``verdict`` says "not distinguishable from noise" when the interval holds 0.
modded-nanogpt's bar for a record is p < 0.01 on the mean loss; the report prints p as it is.
A percentile bootstrap of the difference (``bootstrap_interval``) is the check that assumes no
normality, for the few-seed case where the t interval is most fragile.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from statistics import fmean, stdev


@dataclass(frozen=True)
class Comparison:
    """A variant against the baseline: ``delta`` = mean(variant) - mean(baseline); negative is better."""

    mean: float
    std: float
    n: int
    delta: float
    low: float    # 95% interval of delta
    high: float
    p_value: float
    dof: float

    @property
    def verdict(self) -> str:
        if self.low <= 0.0 <= self.high:
            return "not distinguishable from noise"
        return "lower loss" if self.delta < 0 else "higher loss"


def compare(variant: list[float], baseline: list[float], confidence: float = 0.95) -> Comparison:
    """Welch's two-sample t comparison of ``variant`` against ``baseline`` (at least two values each)."""
    from scipy import stats

    if len(variant) < 2 or len(baseline) < 2:
        raise ValueError(f"a comparison needs at least 2 seeds per variant, got {len(variant)} and {len(baseline)}")
    va, vb = _var_of_mean(variant), _var_of_mean(baseline)
    delta = fmean(variant) - fmean(baseline)
    se = math.sqrt(va + vb)
    if se == 0.0:  # identical runs: no spread to test against
        return Comparison(fmean(variant), 0.0, len(variant), delta, delta, delta,
                          1.0 if delta == 0 else 0.0, float("inf"))
    dof = (va + vb) ** 2 / (va ** 2 / (len(variant) - 1) + vb ** 2 / (len(baseline) - 1))
    t = delta / se
    p = 2.0 * stats.t.sf(abs(t), dof)
    half = stats.t.ppf(0.5 + confidence / 2, dof) * se
    return Comparison(fmean(variant), stdev(variant), len(variant), delta, delta - half, delta + half, p, dof)


def bootstrap_interval(variant: list[float], baseline: list[float], resamples: int = 10000,
                       confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of mean(variant) - mean(baseline), seeds resampled with replacement."""
    rng = random.Random(seed)
    deltas = sorted(fmean(rng.choices(variant, k=len(variant))) - fmean(rng.choices(baseline, k=len(baseline)))
                    for _ in range(resamples))
    lo = deltas[int(math.floor((1 - confidence) / 2 * (resamples - 1)))]
    hi = deltas[int(math.ceil((1 + confidence) / 2 * (resamples - 1)))]
    return lo, hi


def _var_of_mean(xs: list[float]) -> float:
    return stdev(xs) ** 2 / len(xs)
