"""The statistics the quality study reports, each small enough to check by hand.

- :func:`clustered_se`: standard error of a mean whose observations come in correlated
  groups (held-out windows of one source file), the cluster-robust ("sandwich")
  estimate with the G / (G - 1) small-sample factor. With one observation per
  cluster it is the ordinary sqrt(var / n) (up to ddof).
- :func:`cluster_jackknife_se`: the delete-one-cluster jackknife of the same mean, the
  one the report uses (less optimistic with clusters of very unequal size);
  :func:`effective_clusters` says how unequal they are.
- :func:`mean_sd`: mean and sample standard deviation over seeds; :func:`t_interval`:
  the 95% Student-t interval of their mean.
- :func:`loglinear_steps` / :func:`fit_power_law`: the baseline ladder's final loss
  against its length, read at a target loss (the equal-loss speed-up).
- :func:`crossover`: where an equal-FLOPs gap changes sign against log tokens per
  parameter, with an interval that carries the seed spread and the held-out error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


def _by_cluster(values: Sequence[float], clusters: Sequence[int]) -> tuple[np.ndarray, np.ndarray, int]:
    """(values as float64, each value's cluster index 0..G-1, G)."""
    x = np.asarray(values, dtype=np.float64)
    g = np.asarray(clusters)
    if len(x) != len(g):
        raise ValueError(f"{len(x)} values but {len(g)} cluster labels")
    ids, inv = np.unique(g, return_inverse=True)
    return x, inv, len(ids)


def clustered_se(values: Sequence[float], clusters: Sequence[int]) -> float:
    """Cluster-robust standard error of ``mean(values)``; NaN with fewer than 2 clusters."""
    x, inv, n_clusters = _by_cluster(values, clusters)
    if n_clusters < 2:
        return math.nan
    resid_sums = np.bincount(inv, weights=x - x.mean(), minlength=n_clusters)
    var = n_clusters / (n_clusters - 1) * float(np.sum(resid_sums**2)) / len(x) ** 2
    return math.sqrt(var)


def cluster_jackknife_se(values: Sequence[float], clusters: Sequence[int]) -> float:
    """Delete-one-cluster jackknife standard error of ``mean(values)``: the mean is
    recomputed without each cluster in turn. With clusters of very unequal size (the
    held-out set: two files hold 750 of 2,048 windows) it is less optimistic than
    :func:`clustered_se`. With one observation per cluster it equals sd / sqrt(n)."""
    x, inv, n_clusters = _by_cluster(values, clusters)
    if n_clusters < 2:
        return math.nan
    sums = np.bincount(inv, weights=x, minlength=n_clusters)
    counts = np.bincount(inv, minlength=n_clusters)
    loo = (x.sum() - sums) / (len(x) - counts)  # the mean without each cluster
    return math.sqrt((n_clusters - 1) / n_clusters * float(np.sum((loo - loo.mean()) ** 2)))


def effective_clusters(clusters: Sequence[int]) -> float:
    """1 / sum of squared cluster shares: how many equal clusters the set is worth."""
    _, counts = np.unique(np.asarray(clusters), return_counts=True)
    w = counts / counts.sum()
    return float(1.0 / np.sum(w**2))


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample sd); sd is NaN for a single value."""
    x = np.asarray(values, dtype=np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else math.nan


# two-sided 95% quantiles of Student's t by degrees of freedom (a handful of seeds)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """95% Student-t interval of the mean of ``values`` (seeds); NaNs with one value."""
    m, sd = mean_sd(values)
    df = len(values) - 1
    if df < 1:
        return math.nan, math.nan
    t = _T975.get(df) or _T975[max(k for k in _T975 if k <= df)]  # a few more df: slightly wide
    half = t * sd / math.sqrt(len(values))
    return m - half, m + half


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
    n_points: int = 0  # 3 points for 3 parameters: an exact fit, no check at all
    at_grid_edge: bool = False  # c at the end of the searched range: not a real optimum

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
    grid = np.linspace(0.05, 2.0, 391)
    for c in grid:
        A = np.stack([np.ones_like(n), n**-c], axis=1)
        coef, *_ = np.linalg.lstsq(A, y, rcond=None)
        sse = float(np.sum((A @ coef - y) ** 2))
        if coef[1] > 0 and (best is None or sse < best[0]):
            best = (sse, PowerLaw(float(coef[0]), float(coef[1]), float(c), len(n),
                                  bool(c in (grid[0], grid[-1]))))
    return None if best is None else best[1]


@dataclass
class Crossover:
    """Where an equal-FLOPs gap changes sign from + to -, in the units of ``x``.
    ``-inf``: never positive in the measured range (TST wins at every length); ``+inf``:
    positive at every length (TST behind); NaN: the gap only rises through 0 (no + to -
    change). ``lo``/``hi`` (95%) are NaN without an interval."""

    estimate: float
    lo: float
    hi: float
    seed_sd: float  # pooled over lengths: the sd of one seed's gap
    df: int  # its degrees of freedom: sum over lengths of (seeds - 1)
    bracket: tuple[float, float] | None  # the measured x's on either side of the estimate
    no_crossing_share: float  # share of the simulated draws with the gap only rising through 0


def crossover(x: Sequence[float], gaps_per_x: Sequence[Sequence[float]],
              se_per_x: Sequence[float] | None = None, n_draws: int = 4000, seed: int = 0) -> Crossover:
    """Where the mean gap crosses zero against log(x) (x ascending, e.g. tokens per
    parameter; one list of per-seed gaps per x): linearly in log(x) between the two
    points around the first sign change from + to -. Between lengths far apart the
    position rests on that straight line: ``bracket`` gives the measured x's around it.

    The interval is a parametric simulation, because 1-3 seeds per length are too few to
    resample: each draw takes the seed sd from its pooled estimate (scaled chi-square with
    ``df`` degrees of freedom, so a handful of seeds widens it as Student's t does), moves
    each length's mean gap by that sd / sqrt(its seeds) times a normal, plus its held-out
    measurement error (``se_per_x``: the SE of the seed-mean gap on the shared windows,
    which more seeds do not shrink), and records where that draw crosses. No seed pairs
    at all (df = 0): no interval."""
    lx = np.log(np.asarray(x, dtype=np.float64))
    gaps = [np.asarray(g, dtype=np.float64) for g in gaps_per_x]
    k = np.array([len(g) for g in gaps], dtype=np.float64)
    means = np.array([g.mean() for g in gaps])
    se = np.nan_to_num(np.asarray(se_per_x if se_per_x is not None else [0.0] * len(gaps), dtype=np.float64))

    def cross(m: np.ndarray) -> tuple[float, int | None]:
        for i in range(len(m) - 1):
            if m[i] > 0 >= m[i + 1]:
                t = m[i] / (m[i] - m[i + 1])
                return float(lx[i] + t * (lx[i + 1] - lx[i])), i
        if np.all(m <= 0):
            return -math.inf, None
        if np.all(m > 0):
            return math.inf, None
        return math.nan, None

    def back(v: float) -> float:  # log(x) -> x, keeping +-inf (out of range) and NaN
        return v if not math.isfinite(v) else float(np.exp(v))

    df = int(sum(len(g) - 1 for g in gaps))
    ss = float(sum(((g - g.mean()) ** 2).sum() for g in gaps))
    sd = math.sqrt(ss / df) if df > 0 else math.nan
    where0, i0 = cross(means)
    bracket = None if i0 is None else (float(x[i0]), float(x[i0 + 1]))
    if df == 0:
        return Crossover(back(where0), math.nan, math.nan, sd, df, bracket, math.nan)
    rng = np.random.default_rng(seed)
    sigma = sd * np.sqrt(df / rng.chisquare(df, size=n_draws))
    draws = (means[None, :] + sigma[:, None] / np.sqrt(k)[None, :] * rng.standard_normal((n_draws, len(gaps)))
             + se[None, :] * rng.standard_normal((n_draws, len(gaps))))
    where = np.array([cross(d)[0] for d in draws])
    crossing = where[~np.isnan(where)]
    lo, hi = (np.quantile(crossing, [0.025, 0.975], method="nearest") if len(crossing)
              else (math.nan, math.nan))
    return Crossover(back(where0), back(float(lo)), back(float(hi)), sd, df, bracket,
                     float(np.isnan(where).mean()))
