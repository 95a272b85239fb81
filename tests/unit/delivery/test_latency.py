"""LatencyWindow: p50/p99 against a budget, and the slow-call rate."""

from __future__ import annotations

from services.delivery.latency import LatencyWindow, percentile


def test_percentiles_nearest_rank() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(n) for n in range(1, 101)], 99) == 99.0


def test_over_budget_only_with_enough_calls() -> None:
    window = LatencyWindow(budget_s=1.0)
    for _ in range(4):
        window.add(5.0)
    assert not window.summary().over_budget  # four calls say nothing yet
    window.add(5.0)
    summary = window.summary()
    assert summary.over_budget and summary.p50_s == summary.p99_s == 5.0 and summary.slow_rate == 1.0


def test_a_fast_target_is_within_budget_and_slow_rate_counts_calls_over_a_threshold() -> None:
    window = LatencyWindow(budget_s=1.0)
    assert window.slow_rate(0.5) is None and window.p50(default=7.0) == 7.0
    for d in (0.1, 0.1, 0.1, 0.9, 0.9):
        window.add(d)
    assert not window.summary().over_budget
    assert window.slow_rate(0.5) == 0.4
    window.clear()
    assert window.summary().calls == 0
