"""One person's order at a flaky target holds while a second delivery process joins (issue 15), on both buses.

Two delivery stages in one group (two bus clients, as two processes), one flaky target: a third of the
transactions refused with 503, so each person's records wait in retry tiers, and the later ones behind
them. The second member joins while they wait: the partitions it takes over come with records waiting
in their retry tiers that the first member parked, and it must learn them before handling anything of
those lanes. Counted at the target, by content: each person's Bundles applied in send order, once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from services.core.blobstore import LocalBlobStore
from services.core.buses import make_bus
from services.core.envelope import Emit, Envelope
from services.core.runner import run_stage
from services.core.settings import Settings
from services.core.targets import TargetDirectory
from services.core.topics import DELIVERIES
from services.delivery.journal import AttemptJournal
from services.delivery.stage import DeliveryStage
from services.tracker.ledger import Ledger
from tests.fixtures.tddui import make_bundle
from tests.support.kafka import wait_for
from tests.support.processes import DemoTarget

Factory = Callable[..., Settings]
PERSONS, BUNDLES = 6, 8


async def test_a_persons_order_at_a_flaky_target_holds_while_a_second_delivery_member_joins(
        bus_settings: Factory, tmp_path: Path) -> None:
    flaky = DemoTarget(tmp_path / "flaky.log").start()
    for n in range(3 * PERSONS * BUNDLES):
        flaky.fault(status=503) if n % 3 == 0 else flaky.fault(delay_s=0.0)
    s = bus_settings(topic_partitions=4, retry_delays_s=[0.3, 0.6, 1.2])
    directory = TargetDirectory.model_validate({"targets": [
        {"id": "flaky", "base_url": flaky.fhir, "breaker": {"failures": 1000},
         "retry": {"delays_s": [0.3, 0.6], "max_attempts": 30, "jitter": 0}}]})
    sent: dict[str, tuple[int, int]] = {}
    emits = []
    for n in range(BUNDLES):  # interleaved persons, each person's Bundles in send order
        for person in range(PERSONS):
            env = Envelope(type="fr.relais.delivery.requested", source="/relais/tests", transfer_id=str(uuid.uuid4()),
                           data=orjson.dumps(make_bundle(3, seed=1000 + 100 * person + n)), producer="p",
                           target="flaky")
            sent[env.transfer_id] = (person, n)
            emits.append(Emit(DELIVERIES, f"flaky|person-{person}".encode(), env))
    try:
        async with _TwoMembers(s, directory, tmp_path) as members:
            await members.join(0)
            await members.buses[0].publish(emits)
            await wait_for(lambda: _requests(flaky, PERSONS * 2), timeout_s=30)  # retries are waiting now
            await members.join(1)
            await wait_for(lambda: _applied_count(flaky, PERSONS * BUNDLES), timeout_s=75)
    finally:
        applied = _applied(flaky)
        flaky.stop()
    transfers = [str(r["request_id"]).split("/")[0] for r in applied]
    assert len(transfers) == len(set(transfers)) == PERSONS * BUNDLES, "lost or applied twice"
    for person in range(PERSONS):
        order = [sent[t][1] for t in transfers if sent[t][0] == person]
        assert order == list(range(BUNDLES)), f"person {person}'s Bundles arrived as {order}"


class _TwoMembers:
    """Two delivery stages of one group on two bus clients (as two processes), one shared ledger; `join(i)` starts
    member i; leaving stops both and closes everything."""

    def __init__(self, settings: Settings, directory: TargetDirectory, work: Path) -> None:
        self.settings, self.ledger = settings, Ledger(settings.database_url)
        self.buses = [make_bus(settings), make_bus(settings)]
        self.stages = [DeliveryStage(settings, directory, LocalBlobStore(work / "blobs"),
                                     AttemptJournal(self.ledger)) for _ in self.buses]
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> _TwoMembers:
        await self.ledger.create_schema()
        for bus in self.buses:
            await bus.start()
        return self

    async def join(self, member: int) -> None:
        self.tasks.append(asyncio.create_task(run_stage(self.stages[member], self.buses[member], self.settings,
                                                        self.stop)))

    async def __aexit__(self, *_: object) -> None:
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), 30)
        for stage in self.stages:
            await stage.aclose()
        for bus in self.buses:
            await bus.stop()
        await self.ledger.close()


async def _requests(target: DemoTarget, n: int) -> bool:
    return len(await asyncio.to_thread(target.received)) >= n


async def _applied_count(target: DemoTarget, n: int) -> bool:
    return len(await asyncio.to_thread(_applied, target)) >= n


def _applied(target: DemoTarget) -> list[dict[str, Any]]:
    rows = [r for r in target.received() if r["applied"]]
    return sorted(rows, key=lambda r: datetime.fromisoformat(str(r["time"])))


async def test_a_hand_over_does_not_wait_for_records_queued_for_a_slow_target(
        bus_settings: Factory, tmp_path: Path) -> None:
    """Records waiting for a slow target's slot are let go when their partition changes hands (read again by the
    next holder), so a joining member gets its share at once, not after the slow target got through them."""
    slow = DemoTarget(tmp_path / "slow.log").start()
    slow.fault(delay_s=3, count=-1)
    s = bus_settings(topic_partitions=4)
    directory = TargetDirectory.model_validate({"targets": [
        {"id": "slow", "base_url": slow.fhir, "max_concurrency": 1, "timeouts": {"total_s": 10},
         "backlog": {"wait_s": 120}}]})
    emits = [Emit(DELIVERIES, f"slow|person-{n}".encode(),
                  Envelope(type="fr.relais.delivery.requested", source="/relais/tests", transfer_id=str(uuid.uuid4()),
                           data=orjson.dumps(make_bundle(3, seed=500 + n)), producer="p", target="slow"))
             for n in range(10)]
    try:
        async with _TwoMembers(s, directory, tmp_path) as members:
            await members.join(0)
            await members.buses[0].publish(emits)
            # One POST in flight, nine records waiting for the slow target's one slot: 30 s of work for one member.
            await wait_for(lambda: _requests(slow, 1), timeout_s=30)
            joined = time.monotonic()
            await members.join(1)
            second = members.stages[1].runtimes["slow"]
            await wait_for(lambda: _true(second.gate.busy > 0 or second.latency.summary().calls > 0), timeout_s=40)
            took = time.monotonic() - joined
            await wait_for(lambda: _applied_count(slow, 10), timeout_s=60)
    finally:
        applied = _applied(slow)
        slow.stop()
    # Before: the hand-over waited for the slow target to get through the records in hand (embedded: all of that
    # number's; Kafka: 8 s, then the rest was rewound while still waiting in the old member).
    assert took < 8, f"the joining member made its first attempt {took:.1f}s after it joined"
    transfers = [str(r["request_id"]).split("/")[0] for r in applied]
    assert len(transfers) == len(set(transfers)) == 10, "lost or applied twice"


async def _true(value: bool) -> bool:
    return value
