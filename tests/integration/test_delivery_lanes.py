"""Lanes (issues 11 and 15): in one partition, a slow target's records do not hold another target's.

Delivery names a lane per target + person (the record key); the runner handles lanes side by side,
each in order, and commits a partition up to its first unfinished record. Real demo targets, both buses.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import orjson
import pytest

from services.core.envelope import Emit, Envelope
from services.core.settings import Settings
from services.core.targets import TargetDirectory
from services.core.topics import DELIVERIES
from tests.fixtures.tddui import make_bundle, patient_identifier
from tests.support.delivering import delivering
from tests.support.kafka import wait_for
from tests.support.processes import DemoTarget

Factory = Callable[..., Settings]


@pytest.fixture
def two_targets(tmp_path: Path) -> Iterator[tuple[DemoTarget, DemoTarget]]:
    slow, fast = DemoTarget(tmp_path / "slow.log").start(), DemoTarget(tmp_path / "fast.log").start()
    yield slow, fast
    slow.stop()
    fast.stop()


async def _has(target: DemoTarget, n: int) -> bool:
    return len(await asyncio.to_thread(target.received)) >= n


def delivery(target: str, person: int, seed: int) -> Emit:
    env = Envelope(type="fr.relais.delivery.requested", source="/relais/tests", transfer_id=str(uuid.uuid4()),
                   data=orjson.dumps(make_bundle(4, seed=seed)), producer="p", target=target)
    return Emit(DELIVERIES, f"{target}|person-{person}".encode(), env)


async def test_a_slow_target_does_not_hold_a_fast_one_in_the_same_partition_and_each_person_keeps_order(
        bus_settings: Factory, two_targets: tuple[DemoTarget, DemoTarget], tmp_path: Path) -> None:
    slow, fast = two_targets
    slow.fault(delay_s=6, count=-1)  # answers every transaction after 6 s (within its 10 s timeout)
    s = bus_settings(topic_partitions=1)  # every record in one partition: only lanes can keep them apart
    directory = TargetDirectory.model_validate({"targets": [
        {"id": "slow", "base_url": slow.fhir, "timeouts": {"connect_s": 1, "total_s": 10}},
        {"id": "fast", "base_url": fast.fhir}]})
    # Interleaved: slow, fast, slow, fast...; 3 persons per target, 3 Bundles each, in send order.
    emits = [delivery(t, person, seed=100 * person + 10 * n + (t == "fast"))
             for n in range(3) for person in range(3) for t in ("slow", "fast")]
    async with delivering(s, directory, tmp_path) as (bus, _):
        await bus.publish(emits)
        await wait_for(lambda: _has(fast, 9), timeout_s=60)
        slow_rounds_begun = len(slow.received())  # the slow target's requests so far, counted as they arrive
        await wait_for(lambda: _has(slow, 9), timeout_s=60)
    # The slow target takes 6 s a Bundle and one person's three are sequential: its second round begins
    # 6 s after its first. The fast target's nine, interleaved with them in one partition, are all there
    # before that (a count, not a clock: a loaded machine slows both sides alike).
    assert len(fast.received()) == 9 and len(slow.received()) == 9
    assert slow_rounds_begun <= 3, (f"the slow target had received {slow_rounds_begun} when the fast one had its 9: "
                                    "the fast target's Bundles waited behind the slow target's")
    for target in (slow, fast):  # per target + person, the send order holds
        rows = sorted(target.received(), key=lambda r: datetime.fromisoformat(str(r["time"])))
        arrived = [patient_identifier(r["body"]) for r in rows]  # type: ignore[arg-type]
        sent = [patient_identifier(orjson.loads(e.envelope.data)) for e in emits
                if e.key and e.key.startswith(b"slow|" if target is slow else b"fast|")]
        for person_key in {e.key for e in emits}:
            mine = {patient_identifier(orjson.loads(e.envelope.data)) for e in emits if e.key == person_key}
            assert [p for p in arrived if p in mine] == [p for p in sent if p in mine]


async def test_each_persons_bundles_arrive_in_order_at_a_healthy_and_a_flaky_target(
        bus_settings: Factory, two_targets: tuple[DemoTarget, DemoTarget], tmp_path: Path) -> None:
    """Issue 15: 5 persons x 10 Bundles; one target fails a third of its POSTs with 503. Order per person holds."""
    flaky, healthy = two_targets
    for n in range(90):  # every third transaction refused, then the target recovers
        flaky.fault(status=503) if n % 3 == 0 else flaky.fault(delay_s=0.0)
    s = bus_settings(topic_partitions=3, retry_delays_s=[0.2, 0.4, 0.8], max_attempts=20)
    directory = TargetDirectory.model_validate({"targets": [
        {"id": "flaky", "base_url": flaky.fhir, "breaker": {"failures": 1000, "probe_every_s": 1},
         "retry": {"jitter": 0.0}},
        {"id": "healthy", "base_url": healthy.fhir}]})
    # Each person's ten Bundles in send order, the persons interleaved; one record per target each.
    sent: dict[str, list[tuple[str, str]]] = {}
    emits = []
    for n in range(10):
        for person in range(5):
            bundle = make_bundle(3, seed=1000 * person + n)
            sent.setdefault(str(person), []).append(patient_identifier(bundle))
            for target in ("flaky", "healthy"):
                env = Envelope(type="fr.relais.delivery.requested", source="/relais/tests",
                               transfer_id=str(uuid.uuid4()), data=orjson.dumps(bundle), producer="p", target=target)
                emits.append(Emit(DELIVERIES, f"{target}|person-{person}".encode(), env))
    async with delivering(s, directory, tmp_path) as (bus, _):
        await bus.publish(emits)
        await wait_for(lambda: _applied(flaky, 50), timeout_s=90)
        await wait_for(lambda: _applied(healthy, 50), timeout_s=30)
    assert sum(1 for r in flaky.received() if r["status"] == 503) >= 10  # it really was flaky
    for target in (flaky, healthy):
        rows = sorted((r for r in target.received() if r["applied"]),
                      key=lambda r: datetime.fromisoformat(str(r["time"])))
        arrived = [patient_identifier(r["body"]) for r in rows]  # type: ignore[arg-type]
        assert len(arrived) == len(set(arrived)) == 50  # none lost, none twice
        for person, bundles in sent.items():
            assert [p for p in arrived if p in set(bundles)] == bundles, f"person {person} out of order"


async def _applied(target: DemoTarget, n: int) -> bool:
    rows = await asyncio.to_thread(target.received)
    return sum(1 for r in rows if r["applied"]) >= n
