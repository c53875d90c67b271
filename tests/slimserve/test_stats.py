"""The one percentile rule every report uses (pinned, so published figures stay comparable)."""

from __future__ import annotations

from slimserve.stats import percentile


def test_percentile_picks_an_observed_value_by_rank():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 99) == 5.0
    assert percentile(values, 0) == 1.0
    assert percentile([*values, None], 100) == 5.0  # None (no token) is skipped
    assert percentile([], 50) is None and percentile([None], 99) is None


def test_an_odd_integer_rank_rounds_half_to_even():
    """q/100·n = 3 (n = 6, q = 50): rank round(3.5) = 4, one above numpy's inverted_cdf."""
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 50) == 4.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
