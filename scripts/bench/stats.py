"""Percentiles and summaries of latency samples."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

QUANTILES = {"p50": 0.50, "p90": 0.90, "p99": 0.99}


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0 ≤ q ≤ 1) with linear interpolation between ranks, as numpy's default."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(values: Iterable[float]) -> dict[str, float]:
    """n, mean and the p50/p90/p99 of `values`, rounded to microseconds when in ms."""
    data = list(values)
    result = {name: round(percentile(data, q), 3) for name, q in QUANTILES.items()}
    result["mean"] = round(sum(data) / len(data), 3) if data else math.nan
    result["n"] = len(data)
    return result


def difference(minuend: dict[str, float], subtrahend: dict[str, float]) -> dict[str, float]:
    """Percentile by percentile: what `minuend` adds over `subtrahend`."""
    return {name: round(minuend[name] - subtrahend[name], 3) for name in (*QUANTILES, "mean")}
