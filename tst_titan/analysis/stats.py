"""The statistics the quality study reports, each small enough to check by hand.

- :func:`clustered_se`: standard error of a mean whose observations come in correlated
  groups (held-out windows of one source file), the cluster-robust ("sandwich")
  estimate with the G / (G - 1) small-sample factor. With one observation per
  cluster it is the ordinary sqrt(var / n) (up to ddof).
- :func:`mean_sd`: mean and sample standard deviation over seeds.
- :func:`loglinear_steps` / :func:`fit_power_law`: the baseline ladder's final loss
  against its length, read at a target loss (the equal-loss speed-up).
- :func:`crossover`: where an equal-FLOPs gap changes sign against log tokens per
  parameter, with a bootstrap interval over seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


def clustered_se(values: Sequence[float], clusters: Sequence[int]) -> float:
    """Cluster-robust standard error of ``mean(values)``; NaN with fewer than 2 clusters."""
    x = np.asarray(values, dtype=np.float64)
    g = np.asarray(clusters)
    if len(x) != len(g):
        raise ValueError(f"{len(x)} values but {len(g)} cluster labels")
    ids, inv = np.unique(g, return_inverse=True)
    n_clusters = len(ids)
    if n_clusters < 2:
        return math.nan
    resid_sums = np.bincount(inv, weights=x - x.mean(), minlength=n_clusters)
    var = n_clusters / (n_clusters - 1) * float(np.sum(resid_sums**2)) / len(x) ** 2
    return math.sqrt(var)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample sd); sd is NaN for a single value."""
    x = np.asarray(values, dtype=np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else math.nan


def loglinear_steps(steps: Sequence[float], losses: Sequence[float], target: float) -> tuple[float | None, bool]:
    """Steps at which a ladder of annealed runs (final loss of each length) reaches
    ``target``: piecewise linear in log(steps) between the two lengths whose losses
    bracket it. Returns (steps, extrapolated); (None, False) when the ladder does not
    fall. Outside the ladder it extrapolates from the nearest segment and says so."""
    order = np.argsort(steps)
    n = np.asarray(steps, dtype=np.float64)[order]
    y = np.asarray(losses, dtype=np.float64)[order]
    if len(n) < 2:
        return None, False
    for i in range(len(n) - 1):
        lo, hi = min(y[i], y[i + 1]), max(y[i], y[i + 1])
        if lo <= target <= hi and y[i] > y[i + 1]:
            t = (y[i] - target) / (y[i] - y[i + 1])
            return float(np.exp(np.log(n[i]) + t * (np.log(n[i + 1]) - np.log(n[i])))), False
    i = len(n) - 2 if target < y.min() else 0
    if y[i] <= y[i + 1]:
        return None, False
    t = (y[i] - target) / (y[i] - y[i + 1])
    return float(np.exp(np.log(n[i]) + t * (np.log(n[i + 1]) - np.log(n[i])))), True


@dataclass
class PowerLaw:
    """L(n) = a + b * n ** -c, fitted by least squares."""

    a: float
    b: float
    c: float

    def loss(self, n: float | np.ndarray) -> float | np.ndarray:
        return self.a + self.b * np.power(n, -self.c)

    def steps_at(self, target: float) -> float | None:
        """Inverse: the n with L(n) = target (None when target <= a)."""
        if target <= self.a or self.b <= 0:
            return None
        return float(((target - self.a) / self.b) ** (-1.0 / self.c))


def fit_power_law(steps: Sequence[float], losses: Sequence[float]) -> PowerLaw | None:
    """Least-squares L(n) = a + b n^-c over a grid of exponents c (for each c the fit is
    linear in a and b): robust with the handful of points a ladder has. None with fewer
    than 3 points."""
    n = np.asarray(steps, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if len(n) < 3:
        return None
    best: tuple[float, PowerLaw] | None = None
    for c in np.linspace(0.05, 2.0, 391):
        A = np.stack([np.ones_like(n), n**-c], axis=1)
        coef, *_ = np.linalg.lstsq(A, y, rcond=None)
        sse = float(np.sum((A @ coef - y) ** 2))
        if coef[1] > 0 and (best is None or sse < best[0]):
            best = (sse, PowerLaw(float(coef[0]), float(coef[1]), float(c)))
    return None if best is None else best[1]


def crossover(x: Sequence[float], gaps_per_x: Sequence[Sequence[float]], n_boot: int = 2000,
              seed: int = 0) -> tuple[float | None, float | None, float | None]:
    """Where the mean gap crosses zero against log(x) (x: tokens per parameter, sorted
    ascending; one list of per-seed gaps per x), linearly between the two points around
    the first sign change from + to -. Returns (estimate, 2.5%, 97.5%), the interval from
    resampling each x's seeds with replacement; a bootstrap draw without a crossing
    counts as below (gap never positive) or above (never negative) the measured range."""
    lx = np.log(np.asarray(x, dtype=np.float64))

    def cross(means: np.ndarray) -> float:
        for i in range(len(means) - 1):
            if means[i] > 0 >= means[i + 1]:
                t = means[i] / (means[i] - means[i + 1])
                return float(lx[i] + t * (lx[i + 1] - lx[i]))
        return -math.inf if np.all(means <= 0) else math.inf

    means = np.array([np.mean(g) for g in gaps_per_x])
    est = cross(means)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        m = np.array([np.mean(rng.choice(np.asarray(g), size=len(g), replace=True)) for g in gaps_per_x])
        draws.append(cross(m))
    lo, hi = np.quantile(np.asarray(draws), [0.025, 0.975], method="nearest")

    def back(v: float) -> float | None:
        return None if not math.isfinite(v) else float(np.exp(v))

    return back(est), back(float(lo)), back(float(hi))
