"""A target's recent latency: p50/p99 over its last calls, against its budget. Pure bookkeeping, no I/O.

Slowness is a health signal: a target that answers, but slower than its budget (`latency_budget_s`,
default RELAIS_TARGET_LATENCY_BUDGET_S) at the 99th percentile, is `degraded`. The same window feeds
the breaker's optional slow-call rate (resilience4j's `slowCallRateThreshold`) and the estimate of
how long a record turned away from a full waiting area should park.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from services.core.targets import LATENCY_MIN_CALLS as MIN_CALLS
from services.core.targets import over_latency_budget

WINDOW = 100  # calls
FLOOR_CALLS = 10  # a target's pace: the quickest of its last this many answers (`floor`)


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """What operators see: the window's size, p50 and p99 (seconds), and whether p99 is over budget."""

    calls: int
    p50_s: float | None
    p99_s: float | None
    budget_s: float
    over_budget: bool
    slow_rate: float  # share of the window's calls slower than the budget


def percentile(values: list[float], p: float) -> float:
    """The nearest-rank percentile `p` (0-100) of non-empty `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]


class LatencyWindow:
    """The durations of a target's last `size` calls that got an answer (or timed out)."""

    def __init__(self, budget_s: float, size: int = WINDOW) -> None:
        self.budget_s = budget_s
        self._calls: deque[float] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        """Record one call's duration."""
        self._calls.append(seconds)

    def slow_rate(self, threshold_s: float) -> float | None:
        """The share of the window's calls slower than `threshold_s`; None before MIN_CALLS calls."""
        if len(self._calls) < MIN_CALLS:
            return None
        return sum(1 for c in self._calls if c > threshold_s) / len(self._calls)

    def clear(self) -> None:
        """Forget the window (the breaker opened on it: what follows is judged afresh)."""
        self._calls.clear()

    def floor(self, calls: int = FLOOR_CALLS) -> float | None:
        """The quickest of the last `calls` answers (None before any): the target's own pace, as near as this
        process can see it. Every duration also holds the time the answer waited for the event loop, which a
        burst inflates for every target alike but not at the same moments; the quickest answer waited least."""
        if not self._calls:
            return None
        return min(self._calls[i] for i in range(-min(calls, len(self._calls)), 0))

    def p50(self, default: float) -> float:
        """The median latency, or `default` before any call."""
        return percentile(list(self._calls), 50) if self._calls else default

    def summary(self) -> LatencySummary:
        """The window as operators see it."""
        calls = list(self._calls)
        if not calls:
            return LatencySummary(0, None, None, self.budget_s, False, 0.0)
        p99 = percentile(calls, 99)
        slow = sum(1 for c in calls if c > self.budget_s) / len(calls)
        return LatencySummary(len(calls), percentile(calls, 50), p99, self.budget_s,
                              over_latency_budget(p99, len(calls), self.budget_s), slow)
