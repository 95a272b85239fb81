"""Alert rules are states: they fire while the problem lasts, resolve when it clears, and flapping is damped."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from services.ops.alerts import (
    AlertEvaluator,
    Condition,
    Notification,
    Observation,
    TargetObservation,
    Thresholds,
    advance,
    conditions,
    run_alerts,
)

LIMITS = Thresholds(dlq_max=0, lag_max=100, waiting_max=10, waiting_age_s=600, for_s=0, keep_firing_s=0,
                    repeat_s=0)
NOW = datetime(2025, 4, 1, tzinfo=UTC)


def obs(at: float, dlq: int = 0, lag: int = 0, waiting: int = 0, down: bool = False, circuit: str = "closed",
        age: float | None = None) -> Observation:
    return Observation(at=at, dlq_size=dlq, lag={"delivery": lag},
                       targets={"essms-a": TargetObservation(waiting, down, circuit, age, "HTTP 500: boom")})


def active(conds: list[Condition]) -> set[tuple[str, str]]:
    return {c.key for c in conds if c.active}


def test_rules_each_watch_their_subject() -> None:
    assert active(conditions(obs(0, lag=101, waiting=11), LIMITS)) == {
        ("stage_lag", "delivery"), ("target_waiting", "essms-a")}
    assert active(conditions(obs(0, lag=100, waiting=10), LIMITS)) == set()
    assert active(conditions(obs(0, dlq=1, down=True, age=601), LIMITS)) == {
        ("dlq_not_empty", "dlq"), ("target_down", "essms-a"), ("oldest_waiting", "essms-a")}
    down = next(c for c in conditions(obs(0, down=True), LIMITS) if c.rule == "target_down")
    assert "HTTP 500: boom" in down.message


def test_storage_rules_fire_while_a_store_cannot_be_written_or_runs_low_and_resolve_after() -> None:
    mib = 1024 * 1024
    limits = Thresholds(free_min_bytes=100 * mib, keep_firing_s=0)

    def storage(at: float, problem: str | None, free: int) -> Observation:
        return Observation(at=at, dlq_size=0, lag={}, targets={}, storage={"bus": problem, "data-disk": None},
                           free_bytes={"/var/lib/relais": free})

    assert active(conditions(storage(0, None, 200 * mib), limits)) == set()
    assert active(conditions(storage(0, "disk-full: 0 KiB free", 50 * mib), limits)) == {
        ("storage_not_ready", "bus"), ("storage_free_low", "/var/lib/relais")}
    low = next(c for c in conditions(storage(0, None, 50 * mib), limits) if c.rule == "storage_free_low")
    assert "50 MiB free for /var/lib/relais" in low.message
    evaluator = AlertEvaluator(limits)
    fired = evaluator.step(storage(0, "read-only", 200 * mib), NOW)
    assert [(n.state, n.condition.rule) for n in fired] == [("firing", "storage_not_ready")]
    assert "read-only" in fired[0].condition.message
    resolved = evaluator.step(storage(1, None, 200 * mib), NOW)
    assert [(n.state, n.condition.rule) for n in resolved] == [("resolved", "storage_not_ready")]


def test_a_dead_letter_left_alone_keeps_firing_for_hours() -> None:
    evaluator = AlertEvaluator(LIMITS)
    notes = [n for hour in range(48) for n in evaluator.step(obs(hour * 3600.0, dlq=4, down=True), NOW)]
    assert sorted((n.state, n.condition.rule) for n in notes) == [("firing", "dlq_not_empty"),
                                                                  ("firing", "target_down")]
    assert set(evaluator.firing) == {("dlq_not_empty", "dlq"), ("target_down", "essms-a")}
    notes = evaluator.step(obs(48 * 3600.0, dlq=0), NOW)
    assert sorted((n.state, n.condition.rule) for n in notes) == [("resolved", "dlq_not_empty"),
                                                                  ("resolved", "target_down")]


def test_flapping_gives_one_firing_and_one_resolved() -> None:
    limits = Thresholds(keep_firing_s=30, repeat_s=0)
    evaluator = AlertEvaluator(limits)
    notes: list[Notification] = []
    t = 0.0
    for _ in range(3):  # down 5 s, up 5 s, three times
        for _ in range(5):
            notes += evaluator.step(obs(t, down=True), NOW)
            t += 1
        for _ in range(5):
            notes += evaluator.step(obs(t), NOW)
            t += 1
    for _ in range(40):  # then up for good
        notes += evaluator.step(obs(t), NOW)
        t += 1
    assert [n.state for n in notes if n.condition.rule == "target_down"] == ["firing", "resolved"]


def test_for_s_needs_the_condition_to_last() -> None:
    limits = Thresholds(for_s=10, keep_firing_s=0, repeat_s=0)
    states, notes = advance({}, [Condition("stage_lag", "router", True, 500, 100, "behind")], 0, NOW, limits)
    assert notes == [] and states[("stage_lag", "router")].phase == "pending"
    states, notes = advance(states, [Condition("stage_lag", "router", False, 0, 100, "ok")], 5, NOW, limits)
    assert notes == [] and states == {}  # cleared before it was due: never fired, nothing to resolve
    for at in (6, 12, 17):
        states, notes = advance(states, [Condition("stage_lag", "router", True, 500, 100, "behind")], at, NOW, limits)
    assert [n.state for n in notes] == ["firing"]


def test_still_firing_alerts_are_sent_again_at_the_repeat_interval() -> None:
    limits = Thresholds(keep_firing_s=0, repeat_s=60)
    evaluator = AlertEvaluator(limits)
    notes = [n for at in range(0, 200, 10) for n in evaluator.step(obs(float(at), dlq=1), NOW)
             if n.condition.rule == "dlq_not_empty"]
    assert [(n.state, n.repeat) for n in notes] == [("firing", False), ("firing", True), ("firing", True),
                                                    ("firing", True)]
    assert all(n.since == NOW for n in notes)


def test_a_firing_subject_that_disappears_resolves() -> None:
    states, _ = advance({}, [Condition("target_waiting", "gone", True, 50, 10, "x")], 0, NOW, LIMITS)
    states, notes = advance(states, [], 1, NOW, LIMITS)
    assert [(n.state, n.condition.subject) for n in notes] == [("resolved", "gone")] and states == {}


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
