"""Alert rules and dedup: a lasting condition fires once and resolves once, whatever the cycles."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from services.ops.alerts import (
    AlertEvaluator,
    Condition,
    Notification,
    Observation,
    Thresholds,
    conditions,
    run_alerts,
    transitions,
)

LIMITS = Thresholds(dlq_growth=2, window_s=60, lag_max=100, waiting_max=10)
NOW = datetime(2025, 4, 1, tzinfo=UTC)


def obs(at: float, dlq: int = 0, lag: int = 0, waiting: int = 0) -> Observation:
    return Observation(at=at, dlq_size=dlq, lag={"delivery": lag}, waiting={"essms-a": waiting})


def active(conds: list[Condition]) -> set[tuple[str, str]]:
    return {c.key for c in conds if c.active}


def test_rules_each_watch_their_subject() -> None:
    assert active(conditions([], obs(0, lag=101, waiting=11), LIMITS)) == {
        ("stage_lag", "delivery"), ("target_waiting", "essms-a")}
    assert active(conditions([], obs(0, lag=100, waiting=10), LIMITS)) == set()


def test_dlq_growth_is_measured_over_the_window() -> None:
    history = [obs(0, dlq=5), obs(30, dlq=6)]
    assert active(conditions(history, obs(50, dlq=7), LIMITS)) == {("dlq_growth", "dlq")}
    # The old sample left the window: growth 1 since t=30, below the threshold.
    assert active(conditions(history, obs(85, dlq=7), LIMITS)) == set()


def test_transitions_only_report_changes() -> None:
    on = Condition("stage_lag", "router", True, 500, 100, "behind")
    off = Condition("stage_lag", "router", False, 3, 100, "caught up")
    firing, notes = transitions({}, [on], NOW)
    assert [n.state for n in notes] == ["firing"]
    firing, notes = transitions(firing, [on], NOW)
    assert notes == []
    firing, notes = transitions(firing, [off], NOW)
    assert [n.state for n in notes] == ["resolved"] and firing == {}


def test_a_firing_subject_that_disappears_resolves() -> None:
    firing, _ = transitions({}, [Condition("target_waiting", "gone", True, 50, 10, "x")], NOW)
    firing, notes = transitions(firing, [], NOW)
    assert [(n.state, n.condition.subject) for n in notes] == [("resolved", "gone")]


def test_condition_lasting_many_cycles_fires_once_and_resolves_once() -> None:
    evaluator = AlertEvaluator(LIMITS)
    notes: list[Notification] = []
    for cycle in range(50):
        notes += evaluator.step(obs(cycle, lag=500))
    for cycle in range(50, 100):
        notes += evaluator.step(obs(cycle, lag=0))
    lag_notes = [(n.state, n.condition.rule) for n in notes if n.condition.rule == "stage_lag"]
    assert lag_notes == [("firing", "stage_lag"), ("resolved", "stage_lag")]


async def test_the_loop_notifies_once_per_change() -> None:
    stop = asyncio.Event()
    seen: list[Notification] = []
    cycles = 0

    async def observe() -> Observation:
        nonlocal cycles
        cycles += 1
        if cycles == 5:
            raise OSError("ledger down")  # one failed observation is skipped, not fatal
        if cycles >= 40:
            stop.set()
        return obs(cycles, waiting=50 if cycles < 30 else 0)

    async def notify(note: Notification) -> None:
        seen.append(note)

    await asyncio.wait_for(run_alerts(AlertEvaluator(LIMITS), observe, notify, 0.001, stop), 10)
    assert [(n.state, n.condition.subject) for n in seen] == [("firing", "essms-a"), ("resolved", "essms-a")]
    assert seen[0].as_dict()["rule"] == "target_waiting"
