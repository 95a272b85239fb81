"""LatencyWindow: p50/p99 against a budget, and the slow-call rate."""

from __future__ import annotations

from services.delivery.latency import FLOOR_CALLS, LatencyWindow, percentile


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


def test_a_targets_pace_is_the_quickest_of_its_last_answers() -> None:
    window = LatencyWindow(budget_s=1.0)
    assert window.floor() is None
    window.add(0.02)
    assert window.floor() == 0.02
    for d in (1.5, 0.4, 2.0):  # answers that also waited for a busy event loop: the quickest waited least
        window.add(d)
    assert window.floor() == 0.02
    for _ in range(FLOOR_CALLS):
        window.add(5.0)  # it takes 5 s every time now: the quick answer has left the last FLOOR_CALLS
    assert window.floor() == 5.0
    window.add(0.03)
    assert window.floor() == 0.03  # quick again at its first quick answer
