"""A lease hand-over on the embedded bus must never leave the SQLite ledger locked.

With several worker processes, a stage that loses a partition rejoins its group; the lanes it was running
were cancelled in the middle of a ledger transaction, and SQLite stayed locked for every process until its
30 s timeout (issue 16). Real SQLite files; "another process" is another EmbeddedBus / Ledger on the same
files (their own connections and threads).
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from services.core.bus import Partition
from services.core.embedded import EmbeddedBus
from services.core.envelope import Emit, Envelope
from services.core.runner import run_stage
from services.core.settings import Settings
from services.core.topics import EVENTS
from services.delivery.journal import NOT_APPLIED, AttemptJournal, AttemptKey
from services.tracker import audit
from services.tracker.auditchain import AuditingTracker
from services.tracker.ledger import Ledger, LedgerEvent
from services.tracker.stage import TrackerStage

Factory = Callable[..., Settings]


def write_lock_free(db: Path, within_s: float = 3.0) -> bool:
    """Whether another connection (as another process would) gets SQLite's write lock within `within_s`."""
    conn = sqlite3.connect(db, timeout=within_s, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


def ledger_event(n: int | None = None) -> LedgerEvent:
    return LedgerEvent(id=uuid.uuid4().hex, transfer_id=f"t{n}" if n is not None else uuid.uuid4().hex,
                       kind="accepted", stage="ingress", time=datetime.now(UTC), producer="p",
                       detail={"targets": ["demo"], "size": 5})


async def test_lanes_cancelled_mid_transaction_never_leave_the_ledger_locked(make_settings: Factory,
                                                                             tmp_path: Path) -> None:
    settings = make_settings()
    ledger = Ledger(settings.database_url)
    await audit.open_trail(ledger, settings)
    journal = AttemptJournal(ledger)
    db = tmp_path / "ledger.db"

    async def tracker_lane() -> None:  # what a tracker lane does per event
        while True:
            ev = ledger_event()
            await ledger.apply(ev)
            await audit.record_event(ledger, ev)

    async def tracker_poll() -> None:  # what the tracker's poll loop does per poll
        while True:
            await ledger.apply_many([ledger_event() for _ in range(20)])

    async def delivery_lane() -> None:  # what a delivery lane does around each POST
        while True:
            key = AttemptKey(uuid.uuid4().hex, "demo", 0, 1)
            await journal.claim(key, in_flight_s=60)
            await journal.finish(key, NOT_APPLIED, 503)

    try:
        for trial in range(40):
            lanes = [asyncio.create_task(lane()) for lane in (tracker_lane,) * 12 + (delivery_lane,) * 3]
            lanes.append(asyncio.create_task(tracker_poll()))
            await asyncio.sleep(random.uniform(0.05, 0.3))
            for lane in lanes:  # a hand-over: the stage rejoins, its lanes are stopped wherever they are
                lane.cancel()
            await asyncio.gather(*lanes, return_exceptions=True)
            assert await asyncio.to_thread(write_lock_free, db), (
                f"hand-over {trial}: the ledger stays locked after the lanes stopped (every process waits 30 s)")
    finally:
        await ledger.close()


async def test_a_stage_handing_partitions_over_and_back_loses_and_stalls_nothing(make_settings: Factory,
                                                                                 tmp_path: Path) -> None:
    """Two tracker members (two processes' buses and ledgers): the second joins and leaves, and takes partitions
    over as a member frozen past its lease would lose them, while events flow; every event ends in the ledger
    once, well within one SQLite lock timeout, and the ledger's write lock stays free."""
    settings = make_settings(kafka_bootstrap=None, embedded_log_path=tmp_path / "log.db", topic_partitions=6)
    db = tmp_path / "ledger.db"
    count = 600
    ledgers = [Ledger(settings.database_url), Ledger(settings.database_url)]
    for ledger in ledgers:
        await audit.open_trail(ledger, settings)
    buses = [EmbeddedBus(settings), EmbeddedBus(settings)]
    for bus in buses:
        await bus.start()
    stop_a, stop_b = asyncio.Event(), asyncio.Event()

    def tracker(ledger: Ledger) -> AuditingTracker:
        return AuditingTracker(TrackerStage(ledger), ledger)

    def event_emit(n: int) -> Emit:
        env = Envelope(type="fr.relais.event.accepted", source="/test", transfer_id=f"t{n}", producer="p",
                       data=orjson.dumps({"kind": "accepted", "stage": "ingress", "targets": ["demo"], "size": 5}))
        return Emit(EVENTS, f"t{n}".encode(), env)

    async def produce() -> None:
        for start in range(0, count, 20):
            await buses[0].publish([event_emit(n) for n in range(start, start + 20)])
            await asyncio.sleep(0.05)

    def projected() -> tuple[int, int]:
        with sqlite3.connect(db, timeout=30) as conn:
            (events,) = conn.execute("SELECT count(*) FROM events").fetchone()
            (audited,) = conn.execute("SELECT count(*) FROM audit_log WHERE kind='accepted'").fetchone()
        return int(events), int(audited)

    async def steal_from_a() -> None:
        # Member A frozen past its lease, as seen by the group: its partitions go to B (epoch bumped).
        def steal(conn: sqlite3.Connection) -> None:
            b = conn.execute("SELECT member FROM members WHERE grp=? AND member NOT IN "
                             "(SELECT holder FROM leases WHERE grp=? AND holder IS NOT NULL AND partition=0)",
                             (settings.group("tracker"), settings.group("tracker"))).fetchone()
            if b is not None:
                conn.execute("UPDATE leases SET holder=?, epoch=epoch+1 WHERE grp=? AND partition % 2 = 0",
                             (b[0], settings.group("tracker")))
        await buses[1].write(steal)

    started = time.monotonic()
    a = asyncio.create_task(run_stage(tracker(ledgers[0]), buses[0], settings, stop_a))
    producer = asyncio.create_task(produce())
    try:
        for round_ in range(3):
            await asyncio.sleep(1.0)
            stop_b.clear()
            b = asyncio.create_task(run_stage(tracker(ledgers[1]), buses[1], settings, stop_b))
            await asyncio.sleep(2.5)  # B joins: A hands its surplus over
            await steal_from_a()
            await asyncio.sleep(1.5)
            stop_b.set()  # B leaves: its partitions go back to A
            await asyncio.wait_for(b, 25)
            assert await asyncio.to_thread(write_lock_free, db), f"round {round_}: the ledger stays locked"
        await producer
        for _ in range(60):  # the last events reach the ledger
            if await asyncio.to_thread(projected) == (count, count):
                break
            await asyncio.sleep(0.3)
        assert await asyncio.to_thread(projected) == (count, count), "an event was projected twice or never"
        assert time.monotonic() - started < 40, "the hand-overs stalled the tracker (a ledger lock timeout?)"
        assert await asyncio.to_thread(write_lock_free, db)
    finally:
        stop_a.set()
        stop_b.set()
        producer.cancel()
        await asyncio.gather(a, producer, return_exceptions=True)
        for bus in buses:
            await bus.stop()
        for ledger in ledgers:
            await ledger.close()


pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


async def test_a_member_with_records_in_hand_hands_its_surplus_over_without_being_fenced(make_settings: Factory,
                                                                                         tmp_path: Path) -> None:
    settings = make_settings(kafka_bootstrap=None, embedded_log_path=tmp_path / "log.db")
    one, two = EmbeddedBus(settings), EmbeddedBus(settings)  # two processes' buses on one log
    await one.start()
    await two.start()
    try:
        await one.publish([Emit(EVENTS, f"t{n}".encode(), Envelope(type="t", source="/test", transfer_id=f"t{n}",
                                                                   data=b"{}")) for n in range(60)])
        a = one.subscribe("stage", [EVENTS])
        await a.start()
        in_hand = await a.poll(100, 1)  # every partition has records in hand (a slow lane, say)
        assert {r.partition for r in in_hand} == {0, 1, 2}
        b = two.subscribe("stage", [EVENTS])
        await b.start()
        await asyncio.sleep(1.5)  # a's heartbeat learns it holds more than its share
        assert await a.poll(100, 0.1) == []  # the surplus drains: not read, not given back under records in hand
        assert not b.assignment()
        offsets: dict[Partition, int] = {}
        for r in in_hand:
            offsets[Partition(r.topic, r.partition)] = max(offsets.get(Partition(r.topic, r.partition), 0),
                                                           r.offset + 1)
        await a.complete([], offsets)  # not fenced: a still holds every partition it commits
        await a.poll(100, 0.1)  # between two polls, with nothing in hand, the surplus goes
        await asyncio.sleep(1.5)  # b's heartbeat takes it
        assert b.assignment() and not (a.assignment() & b.assignment())
        assert a.assignment() | b.assignment() == {Partition(EVENTS, p) for p in range(3)}
        await a.stop()
        await b.stop()
    finally:
        await one.stop()
        await two.stop()
