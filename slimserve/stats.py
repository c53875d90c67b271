"""Latency percentiles, computed one way for every benchmark and reliability report."""

from __future__ import annotations

from collections.abc import Iterable


def percentile(values: Iterable[float | None], q: float) -> float | None:
    """The q-th percentile (q in 0..100) of `values` as one observed value; None when empty.

    The value at 1-based rank `round(q/100 * n + 0.5)`, clamped to 1..n, which is the nearest
    rank except where `q/100 * n` is an odd integer (Python rounds that half to even, one rank
    up). numpy's `method="inverted_cdf"` differs in exactly those cases, so it would change
    figures already published in reports/; None values (a request with no token) are skipped.
    """
    data = sorted(v for v in values if v is not None)
    if not data:
        return None
    rank = max(0, min(len(data) - 1, round(q / 100 * len(data) + 0.5) - 1))
    return data[rank]
