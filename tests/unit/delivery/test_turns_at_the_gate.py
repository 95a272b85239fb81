"""A slow target's record takes its turn before its target's waiting area, not only before its attempt (issue 15).

A poll brings one quick target's record among several for targets answering in seconds, whose concurrency
slots are all taken. Each of those records costs the event loop a step when it starts (its lane, the log
context, the lane order, a place in the gate's waiting area with a timer), and lane tasks start in poll
order: so they ran before the quick record's first step (measured: +0.2 ms on a 3 ms delivery beside 5
such targets). Now such a record gives way first, then enters its gate.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import orjson

from services.core.blobstore import LocalBlobStore
from services.core.envelope import Envelope, Record
from services.core.errors import LetGo
from services.core.settings import Settings
from services.core.targets import Target, TargetDirectory
from services.core.topics import DELIVERIES
from services.delivery.journal import AttemptJournal
from services.delivery.stage import DeliveryStage
from services.tracker.ledger import Ledger
from tests.fixtures.tddui import make_bundle


async def test_a_slow_targets_record_gives_way_before_entering_its_targets_waiting_area(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite+aiosqlite:///{tmp_path}/l.db")
    await ledger.create_schema()
    targets = [Target(id="fast", base_url="http://127.0.0.1:9/fhir"),
               Target(id="slow", base_url="http://127.0.0.1:9/fhir", max_concurrency=1)]
    stage = DeliveryStage(Settings(auth_disabled=True, retry_delays_s=[1, 2]), TargetDirectory(targets=targets),
                          LocalBlobStore(tmp_path / "blobs"), AttemptJournal(ledger))
    stage.turns.observed("fast", 0.02)
    stage.turns.observed("slow", 5.0)  # answers in 5 s: slow beside a target answering in 20 ms
    gate = stage.runtimes["slow"].gate
    assert await gate.enter()  # its one slot is taken by a request still waiting for its answer
    env = Envelope(type="fr.relais.delivery", source="/relais/router", transfer_id="tr-1",
                   data=orjson.dumps(make_bundle(2, seed=1)), producer="p", target="slow")
    try:
        with stage.turns.in_progress("fast"):  # a quick target's record of the same poll, in progress
            slow = asyncio.create_task(stage.handle(Record(DELIVERIES, 0, 0, b"slow|x", env)))
            for _ in range(20):
                await asyncio.sleep(0)
            assert gate.waiting == 0, "the slow target's record took its place in the gate ahead of the quick one"
        for _ in range(20):  # the quick record is done: the slow one goes on, to wait for its target's slot
            await asyncio.sleep(0)
        assert gate.waiting == 1
        gate.close()  # stopping: a record waiting for a slot is let go unattempted, read again later
        with contextlib.suppress(LetGo):
            await asyncio.wait_for(slow, 2)
    finally:
        await stage.aclose()
        await ledger.close()
