"""Back-pressure per target (issue 15): slow targets' backlogs never stop the poll for a fast one.

A stage holds at most `batch_size` records it has not started; records waiting for their target's
concurrency slot wait in that target's own area (bounded by count and age), and past the bound are
parked durably in a retry tier (`overflow: wait`) or dead-lettered (`overflow: refuse`). Real demo
targets, both buses.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from services.core.bus import Bus
from services.core.envelope import Emit, Envelope
from services.core.settings import Settings
from services.core.targets import TargetDirectory
from services.core.topics import DELIVERIES, DELIVERIES_DLQ
from tests.fixtures.tddui import make_bundle, patient_identifier
from tests.support.delivering import delivering
from tests.support.kafka import wait_for
from tests.support.processes import DemoTarget

Factory = Callable[..., Settings]


@pytest.fixture
def targets(tmp_path: Path) -> Iterator[list[DemoTarget]]:
    started = [DemoTarget(tmp_path / f"t{i}.log").start() for i in range(4)]
    yield started
    for t in started:
        t.stop()


def _delivery(target: str, person: str, seed: int) -> Emit:
    env = Envelope(type="fr.relais.delivery.requested", source="/relais/tests", transfer_id=str(uuid.uuid4()),
                   data=orjson.dumps(make_bundle(3, seed=seed)), producer="p", target=target)
    return Emit(DELIVERIES, f"{target}|{person}".encode(), env)


async def _count(target: DemoTarget, n: int) -> bool:
    return sum(1 for r in await asyncio.to_thread(target.received) if r["applied"]) >= n


async def test_three_slow_targets_backlogs_never_hold_a_fast_target(
        bus_settings: Factory, targets: list[DemoTarget], tmp_path: Path) -> None:
    fast, *slow = targets
    for t in slow:
        t.fault(delay_s=2, count=-1)  # every transaction answered after 2 s
    # One partition, few records in hand: only per-target waiting areas keep the fast target moving.
    s = bus_settings(topic_partitions=1, batch_size=8)
    directory = {"targets": [
        {"id": "fast", "base_url": fast.fhir},
        *({"id": f"slow{i}", "base_url": t.fhir, "max_concurrency": 1, "timeouts": {"total_s": 10}}
          for i, t in enumerate(slow))]}
    emits = []
    for n in range(10):  # interleaved: each slow target gets its 10 first, then the fast one
        emits += [_delivery(f"slow{i}", f"s{n}", seed=100 * i + n) for i in range(3)]
        emits.append(_delivery("fast", f"f{n}", seed=1000 + n))
    async with delivering(s, TargetDirectory.model_validate(directory), tmp_path) as (bus, _):
        began = time.monotonic()
        await bus.publish(emits)
        await wait_for(lambda: _count(fast, 10), timeout_s=60)
        fast_done = time.monotonic() - began
        for t in slow:  # the slow targets speed up: their records are all delivered
            await asyncio.to_thread(_clear_faults, t)
        for t in slow:
            await wait_for(lambda t=t: _count(t, 10), timeout_s=60)  # type: ignore[misc]
    assert fast_done < 3.0, f"the fast target's 10 Bundles took {fast_done:.1f}s: held behind slow targets"
    for t in targets:  # none lost, none twice
        applied = [r for r in t.received() if r["applied"]]
        assert len(applied) == len({patient_identifier(r["body"]) for r in applied}) == 10  # type: ignore[arg-type]


async def test_a_slow_targets_deep_lanes_never_hold_a_fast_target_and_keep_each_persons_order(
        bus_settings: Factory, targets: list[DemoTarget], tmp_path: Path) -> None:
    """Several Bundles per person for a slow target: those queued behind their person's first are the slow
    target's backlog too — they must not fill the stage's shared budget of records in hand."""
    fast, slow = targets[0], targets[1]
    slow.fault(delay_s=2, count=-1)
    s = bus_settings(topic_partitions=1, batch_size=8, retry_delays_s=[0.3, 1.0])
    directory = {"targets": [
        {"id": "fast", "base_url": fast.fhir},
        {"id": "slow", "base_url": slow.fhir, "max_concurrency": 1, "timeouts": {"total_s": 10}}]}
    sent: dict[int, list[tuple[str, str]]] = {}
    emits = []
    for n in range(6):  # 3 persons × 6 Bundles for the slow target first ...
        for person in range(3):
            bundle = make_bundle(3, seed=100 * person + n)
            sent.setdefault(person, []).append(patient_identifier(bundle))
            env = Envelope(type="fr.relais.delivery.requested", source="/relais/tests",
                           transfer_id=str(uuid.uuid4()), data=orjson.dumps(bundle), producer="p", target="slow")
            emits.append(Emit(DELIVERIES, f"slow|person-{person}".encode(), env))
    emits += [_delivery("fast", f"f{n}", seed=900 + n) for n in range(5)]  # ... then 5 for the fast one
    async with delivering(s, TargetDirectory.model_validate(directory), tmp_path) as (bus, _):
        fast_done = await _fast_then_slow(bus, emits, (fast, 5), (slow, 18))
    # Held behind the slow lanes, they waited for most of the slow backlog (18 × 2 s, one at a time): 18 s before.
    assert fast_done < 8.0, f"the fast target's 5 Bundles took {fast_done:.1f}s: held behind a slow target's lanes"
    rows = sorted((r for r in slow.received() if r["applied"]), key=lambda r: datetime.fromisoformat(str(r["time"])))
    arrived = [patient_identifier(r["body"]) for r in rows]  # type: ignore[arg-type]
    assert len(arrived) == len(set(arrived)) == 18
    for person, bundles in sent.items():
        assert [p for p in arrived if p in set(bundles)] == bundles, f"person {person} out of order"


async def _fast_then_slow(bus: Bus, emits: list[Emit], fast: tuple[DemoTarget, int],
                          slow: tuple[DemoTarget, int]) -> float:
    """Publish `emits`; once the fast target has its count, the slow one speeds up and gets its count too. Seconds
    the fast target took."""
    began = time.monotonic()
    await bus.publish(emits)
    await wait_for(lambda: _count(fast[0], fast[1]), timeout_s=60)
    fast_done = time.monotonic() - began
    await asyncio.to_thread(_clear_faults, slow[0])
    await wait_for(lambda: _count(slow[0], slow[1]), timeout_s=90)
    return fast_done


def _clear_faults(target: DemoTarget) -> None:
    httpx.delete(f"{target.base_url}/_faults", timeout=10).raise_for_status()


async def test_past_its_bound_a_slow_targets_records_wait_in_a_retry_tier_in_order(
        bus_settings: Factory, targets: list[DemoTarget], tmp_path: Path) -> None:
    """overflow: wait — past 2 waiting records, the slow target's records are parked; each person keeps order."""
    fast, slow = targets[0], targets[1]
    slow.fault(delay_s=1, count=-1)
    s = bus_settings(topic_partitions=1, batch_size=50, retry_delays_s=[0.3, 1.0])
    directory = {"targets": [
        {"id": "fast", "base_url": fast.fhir},
        {"id": "slow", "base_url": slow.fhir, "max_concurrency": 1, "timeouts": {"total_s": 10},
         "backlog": {"records": 2, "overflow": "wait"}}]}
    sent: dict[str, list[tuple[str, str]]] = {}
    emits = []
    for n in range(4):
        for person in range(3):
            bundle = make_bundle(3, seed=10 * person + n)
            sent.setdefault(str(person), []).append(patient_identifier(bundle))
            env = Envelope(type="fr.relais.delivery.requested", source="/relais/tests",
                           transfer_id=str(uuid.uuid4()), data=orjson.dumps(bundle), producer="p", target="slow")
            emits.append(Emit(DELIVERIES, f"slow|person-{person}".encode(), env))
        emits.append(_delivery("fast", f"f{n}", seed=500 + n))
    async with delivering(s, TargetDirectory.model_validate(directory), tmp_path) as (bus, _):
        await bus.publish(emits)
        await wait_for(lambda: _count(fast, 4), timeout_s=30)
        await wait_for(lambda: _count(slow, 12), timeout_s=80)
    rows = sorted((r for r in slow.received() if r["applied"]), key=lambda r: datetime.fromisoformat(str(r["time"])))
    arrived = [patient_identifier(r["body"]) for r in rows]  # type: ignore[arg-type]
    assert len(arrived) == len(set(arrived)) == 12
    for person, bundles in sent.items():
        assert [p for p in arrived if p in set(bundles)] == bundles, f"person {person} out of order"


async def test_past_its_bound_a_refusing_targets_records_are_dead_lettered_for_it_alone(
        bus_settings: Factory, targets: list[DemoTarget], tmp_path: Path) -> None:
    """overflow: refuse — past 1 waiting record, the slow target's new records go to deliveries.dlq at once."""
    fast, slow = targets[0], targets[1]
    slow.fault(delay_s=2, count=-1)
    s = bus_settings(topic_partitions=1, batch_size=50)
    directory = {"targets": [
        {"id": "fast", "base_url": fast.fhir},
        {"id": "slow", "base_url": slow.fhir, "max_concurrency": 1, "timeouts": {"total_s": 10},
         "backlog": {"records": 1, "overflow": "refuse"}}]}
    emits = [_delivery("slow", f"s{n}", seed=n) for n in range(6)] + [_delivery("fast", "f", seed=99)]
    async with delivering(s, TargetDirectory.model_validate(directory), tmp_path) as (bus, _):
        dlq = bus.subscribe(f"t-{uuid.uuid4().hex[:6]}", [DELIVERIES_DLQ])
        await dlq.start()
        try:
            await bus.publish(emits)
            await wait_for(lambda: _count(fast, 1), timeout_s=20)
            dead: list[Any] = []

            async def four_dead() -> bool:
                dead.extend(await dlq.poll(10, 0.5))
                return len(dead) >= 4

            await wait_for(four_dead, timeout_s=30)
            await wait_for(lambda: _count(slow, 2), timeout_s=30)
        finally:
            await dlq.stop()
    # 1 in flight + 1 waiting are delivered; the 4 others are refused for this target, with the reason.
    assert len(dead) == 4
    assert all("backlog" in (d.envelope.extra.get("reason") or "") for d in dead)
    await asyncio.sleep(1)
    assert sum(1 for r in slow.received() if r["applied"]) == 2


async def test_stopping_lets_records_waiting_for_a_slow_target_go_and_a_restart_delivers_each_once(
        bus_settings: Factory, targets: list[DemoTarget], tmp_path: Path) -> None:
    """Records waiting in a target's area are uncommitted: a stop neither waits for them nor loses them."""
    slow = targets[1]
    slow.fault(delay_s=1.5, count=-1)
    s = bus_settings(topic_partitions=1, batch_size=20)
    directory = {"targets": [{"id": "slow", "base_url": slow.fhir, "max_concurrency": 1,
                              "timeouts": {"total_s": 10}, "backlog": {"wait_s": 60}}]}
    emits = [_delivery("slow", f"s{n}", seed=n) for n in range(8)]
    async with delivering(s, TargetDirectory.model_validate(directory), tmp_path) as (bus, _):
        await bus.publish(emits)
        await wait_for(lambda: _count(slow, 1), timeout_s=20)
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 5, "stop waited for records queued for the slow target"
    await asyncio.to_thread(_clear_faults, slow)
    async with delivering(s, TargetDirectory.model_validate(directory), tmp_path):
        await wait_for(lambda: _count(slow, 8), timeout_s=30)
        await asyncio.sleep(1)
    applied = [patient_identifier(r["body"]) for r in slow.received() if r["applied"]]  # type: ignore[arg-type]
    assert len(applied) == len(set(applied)) == 8


async def test_a_slow_call_rate_over_its_threshold_opens_the_targets_breaker(
        bus_settings: Factory, targets: list[DemoTarget], tmp_path: Path) -> None:
    """breaker.slow_call_s (resilience4j style): slow calls open the circuit though every call succeeds."""
    slow = targets[1]
    slow.fault(delay_s=0.4, count=-1)
    s = bus_settings(topic_partitions=1, retry_delays_s=[1.0])
    directory = {"targets": [{"id": "slow", "base_url": slow.fhir, "max_concurrency": 1,
                              "breaker": {"slow_call_s": 0.2, "slow_call_rate": 0.8, "probe_every_s": 60}}]}
    async with delivering(s, TargetDirectory.model_validate(directory), tmp_path) as (bus, stage):
        await bus.publish([_delivery("slow", f"s{n}", seed=n) for n in range(8)])
        await wait_for(lambda: _count(slow, 5), timeout_s=30)
        await asyncio.sleep(1.0)
        breaker = stage.breaker("slow")
        assert breaker is not None and breaker.circuit.value == "open"
    # Five calls (the window's minimum) were slow: the circuit opened, the rest wait for a probe.
    assert sum(1 for r in slow.received() if r["applied"]) == 5


async def test_a_burst_past_a_healthy_targets_bound_comes_back_at_its_pace_not_a_retry_tiers(
        bus_settings: Factory, targets: list[DemoTarget], tmp_path: Path) -> None:
    """A burst for one quick target overflows its waiting area; the overflow comes back when the records ahead
    of it should be done, at the target's pace. Parked for at least the first retry delay (10 s by default),
    the target sat idle once it had answered the rest (`relais run`: 5 s stalls in bursts of 1,200). Here, with
    tiers of 10 and 60 s: 34-36 s before (both buses), 4-6 s now."""
    target = targets[0]
    s = bus_settings(topic_partitions=1, batch_size=50, retry_delays_s=[20.0, 60.0])
    directory = {"targets": [{"id": "quick", "base_url": target.fhir, "max_concurrency": 2,
                              "backlog": {"records": 4, "overflow": "wait"}}]}
    emits = [_delivery("quick", f"person-{n}", seed=700 + n) for n in range(60)]
    sent = {patient_identifier(orjson.loads(e.envelope.data)) for e in emits}
    async with delivering(s, TargetDirectory.model_validate(directory), tmp_path) as (bus, _):
        began = time.monotonic()
        await bus.publish(emits)
        await wait_for(lambda: _count(target, 60), timeout_s=60)
        elapsed = time.monotonic() - began
    arrived = [patient_identifier(r["body"]) for r in target.received() if r["applied"]]  # type: ignore[arg-type]
    assert len(arrived) == 60 and set(arrived) == sent  # each once
    assert elapsed < 15, f"the burst took {elapsed:.1f}s: its overflow waited out a retry tier (20 s)"


async def test_a_slow_targets_waiting_records_never_fill_the_stages_records_in_hand(
        bus_settings: Factory, targets: list[DemoTarget], tmp_path: Path) -> None:
    """Records waiting in memory for a slow target's slot hold their partition's commit, and so every record
    handled behind them. Past half the records a stage may hold in hand (batch_size x 10), the longest-waiting
    ones move out to a retry tier, whatever their target's own bound (200 records, 30 s by default, far more than
    20 here): before, the poll stopped at the bound and the fast target's records were read one per slow answer
    (sustained, 5 targets answering in 5 s beside a quick one: the quick one's p50 went from 3 ms to 17 s)."""
    fast, slow = targets[0], targets[1]
    slow.fault(delay_s=2, count=-1)
    s = bus_settings(topic_partitions=1, batch_size=2)  # at most 20 records in hand
    directory = {"targets": [
        {"id": "fast", "base_url": fast.fhir},
        {"id": "slow", "base_url": slow.fhir, "max_concurrency": 1, "timeouts": {"total_s": 10}}]}
    emits = [_delivery("slow", f"s{n}", seed=n) for n in range(25)]
    emits += [_delivery("fast", f"f{n}", seed=900 + n) for n in range(3)]
    async with delivering(s, TargetDirectory.model_validate(directory), tmp_path) as (bus, _):
        fast_done = await _fast_then_slow(bus, emits, (fast, 3), (slow, 25))
        await asyncio.sleep(1)  # a second copy of any of them would have come by now
    assert fast_done < 5.0, f"the fast target's 3 Bundles took {fast_done:.1f}s: the stage's records in hand were full"
    for t, sent in ((fast, 3), (slow, 25)):  # none lost, none twice
        applied = [patient_identifier(r["body"]) for r in t.received() if r["applied"]]  # type: ignore[arg-type]
        assert len(applied) == len(set(applied)) == sent
