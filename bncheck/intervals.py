"""Confidence intervals for the train/eval gap, and the sequential stopping rule.

Pure functions over counts and sums. Each sample is scored in eval mode and in train
mode, so the two accuracies are paired proportions:

* :func:`paired_difference_interval` is Newcombe's hybrid score interval for a
  difference of paired proportions (Newcombe 1998, "Improved confidence intervals for
  the difference between binomial proportions based on paired data", method 10): Wilson
  score intervals of the two marginal proportions, combined with the phi correlation of
  the 2x2 table of paired outcomes. It keeps its coverage at small n and at gaps near
  0 or 1, where the Wald interval collapses.
* :func:`ratio_interval` is the delta-method interval of a ratio of sums
  ``sum D_i / sum T_i`` over independent units, with Student's t quantile for the
  number of units. The units are batches: in train mode every sample of a batch is
  normalised with the same batch statistics, so samples of one batch are not
  independent (relative loss gaps, per-pixel accuracy of segmentation maps).
* :func:`wilson_interval` is the score interval of one proportion (label-free
  disagreement).

:func:`sequential_z` spends the error rate over repeated looks (``alpha * 6 / (pi^2 k^2)``
at look ``k``, which sums to ``alpha``), so a verdict settled early by ``--quick`` is
wrong with probability at most ``alpha`` however many batches were looked at.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

Interval = tuple[float, float]
CONFIDENCE = 0.95
MIN_RATIO_UNITS = 3     # batches a ratio interval needs (fewer give no interval)
GATE_TOLERANCE = 1e-12  # a gap equal to its threshold, up to rounding, passes


def z_value(confidence: float = CONFIDENCE) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def sequential_z(look: int, confidence: float = CONFIDENCE) -> float:
    """The z of look ``look`` (1, 2, ...) when the error rate ``1 - confidence`` is spent over all looks."""
    alpha = (1.0 - confidence) * 6.0 / (math.pi ** 2 * look ** 2)
    return NormalDist().inv_cdf(1.0 - alpha / 2)


def t_quantile(z: float, dof: int) -> float:
    """Student's t quantile with the two-sided tail probability of the normal quantile ``z``."""
    if dof > 300:
        v = float(dof)  # Cornish-Fisher: within 1e-6 there
        return (z + (z ** 3 + z) / (4 * v) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * v * v)
                + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * v ** 3))
    target = 2 * NormalDist().cdf(z) - 1
    low, high = z, max(2 * z, 1.0)
    while _t_central(high, dof) < target:
        high *= 2
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if _t_central(middle, dof) < target else (low, middle)
    return high


def _t_central(t: float, dof: int) -> float:
    """P(|T| < t) for Student's t with an integer ``dof`` (Abramowitz and Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(dof))
    c2, term, total = math.cos(theta) ** 2, 1.0, 1.0
    if dof % 2 == 0:
        for k in range(1, dof // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return math.sin(theta) * total
    if dof == 1:
        return 2 * theta / math.pi
    for k in range(1, (dof - 1) // 2):
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)


def wilson_interval(successes: float, n: float, z: float) -> Interval:
    """Wilson's score interval for a proportion; ``(0, 1)`` without data."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class PairedTable:
    """Paired binary outcomes: ``both`` right in both modes, ``first_only`` right only in the
    first mode, ``second_only`` right only in the second, ``neither``."""

    both: float
    first_only: float
    second_only: float
    neither: float

    @property
    def n(self) -> float:
        return self.both + self.first_only + self.second_only + self.neither

    @classmethod
    def from_sums(cls, n: float, first: float, second: float, both: float) -> "PairedTable":
        """From the number of units, the successes of each mode and the joint successes."""
        return cls(both, first - both, second - both, n - first - second + both)


def paired_difference_interval(table: PairedTable, z: float) -> Interval:
    """Newcombe's method 10 interval for ``p_first - p_second``."""
    a, b, c, d, n = table.both, table.first_only, table.second_only, table.neither, table.n
    if n <= 0:
        return (-1.0, 1.0)
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_interval(a + b, n, z)
    l2, u2 = wilson_interval(a + c, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(margins) if margins > 0 else 0.0
    lower = math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    upper = math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    diff = p1 - p2
    return (max(-1.0, diff - lower), min(1.0, diff + upper))


@dataclass(frozen=True)
class RatioSums:
    """Sums over independent units (batches) of a numerator ``D_i`` and denominator ``T_i``."""

    n: float
    d: float
    t: float
    dd: float
    tt: float
    dt: float


def ratio_interval(sums: RatioSums, z: float) -> Interval | None:
    """Delta-method interval of ``sum D / sum T``: ``R +- t * sqrt(sum (D_i - R T_i)^2 / (n (n - 1))) / mean T``,
    with ``t`` the quantile of Student's t on ``n - 1`` degrees of freedom at ``z``'s level.

    None with fewer than :data:`MIN_RATIO_UNITS` units or a zero denominator.
    """
    if sums.n < MIN_RATIO_UNITS or sums.t == 0:
        return None
    ratio = sums.d / sums.t
    residual = sums.dd - 2 * ratio * sums.dt + ratio * ratio * sums.tt
    mean_t = sums.t / sums.n
    half = t_quantile(z, int(sums.n) - 1) * math.sqrt(max(residual, 0.0) / (sums.n * (sums.n - 1))) / abs(mean_t)
    return (ratio - half, ratio + half)


def settles(interval: Interval | None, threshold: float) -> bool | None:
    """True when the interval lies entirely above ``threshold`` (fail), False when entirely at or
    below it (pass), None while it straddles it."""
    if interval is None:
        return None
    low, high = interval
    if low > threshold + GATE_TOLERANCE:
        return True
    if high <= threshold + GATE_TOLERANCE:
        return False
    return None
