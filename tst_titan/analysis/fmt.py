"""Number formatting and small summaries shared by the reports (RESULTS tables, the GPU check)."""

from __future__ import annotations

import math
import statistics
from typing import Iterable


def format_number(x: float | None, spec: str = ".3g", missing: str = "n/a") -> str:
    """``format(x, spec)``, or ``missing`` for a figure that was not measured (None or NaN),
    so a report line never reads 'None' or 'nan'."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return missing
    return format(x, spec)


def finite(xs: Iterable[float | None]) -> list[float]:
    """The values that were measured and are finite."""
    return [x for x in xs if x is not None and math.isfinite(x)]


def median_or_none(xs: Iterable[float | None]) -> float | None:
    """Median of the finite values; None when there is none."""
    kept = finite(xs)
    return statistics.median(kept) if kept else None


def max_or_none(xs: Iterable[float | None]) -> float | None:
    """Largest finite value; None when there is none."""
    kept = finite(xs)
    return max(kept) if kept else None


def mean_or_none(xs: Iterable[float | None]) -> float | None:
    """Mean of the finite values; None when there is none."""
    kept = finite(xs)
    return statistics.fmean(kept) if kept else None
