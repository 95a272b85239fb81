"""Stage tests that run on both buses (real Kafka and the embedded SQLite log), so they cannot drift."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from services.core.bus import Bus
from services.core.buses import make_bus
from services.core.envelope import Emit, Record
from services.core.runner import run_stage
from services.core.settings import Settings
from services.core.topics import POISON, RECEIVED, REJECTED, VALIDATED
from tests.support.kafka import received, wait_for

Factory = Callable[..., Settings]


async def read_all(bus: Bus, topic: str, expect: int, timeout_s: float = 30.0, settle_s: float = 0.0) -> list[Record]:
    """Every record of a topic through the bus's own consumer interface (a throwaway group)."""
    sub = bus.subscribe(f"reader-{time.monotonic_ns()}", [topic])
    await sub.start()
    out: list[Record] = []
    try:
        deadline = time.monotonic() + timeout_s
        settle_until = None
        while time.monotonic() < deadline:
            out += await sub.poll(500, 0.2)
            if len(out) >= expect:
                settle_until = settle_until or time.monotonic() + settle_s
                if time.monotonic() >= settle_until:
                    break
    finally:
        await sub.stop()
    return out


def transfer_ids(records: Sequence[Record]) -> list[str]:
    return [r.envelope.transfer_id for r in records]


class RecordingStage:
    """Copies records to transfers.validated and notes when it saw each; fails on demand."""

    name = "recording"
    topics: Sequence[str] = (RECEIVED,)

    def __init__(self) -> None:
        self.seen: dict[str, datetime] = {}

    async def handle(self, record: Record) -> Sequence[Emit]:
        self.seen[record.envelope.transfer_id] = datetime.now(UTC)
        if record.envelope.extra.get("poison"):
            raise ValueError("this record cannot be handled")
        return [Emit(VALIDATED, record.key, record.envelope.evolve())]


async def test_delayed_record_waits_without_blocking_others(
        bus_settings: Factory) -> None:
    s = bus_settings(topic_partitions=1)
    due = datetime.now(UTC) + timedelta(seconds=2)
    delayed = received()
    delayed = Emit(delayed.topic, delayed.key, delayed.envelope.evolve(not_before=due))
    stage, bus, stop = RecordingStage(), make_bus(s), asyncio.Event()
    await bus.start()
    task = asyncio.create_task(run_stage(stage, bus, s, stop))
    try:
        await bus.publish([delayed])
        tid = delayed.envelope.transfer_id
        await wait_for(lambda: tid in stage.seen, timeout_s=30)
        assert stage.seen[tid] >= due
        out = await read_all(bus, VALIDATED, expect=1)
        assert transfer_ids(out) == [tid]
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await bus.stop()


async def test_unhandleable_record_goes_to_poison_topic_and_the_rest_flows(
        bus_settings: Factory) -> None:
    s = bus_settings()
    bad = received(poison="yes")
    good = [received() for _ in range(3)]
    stage, bus, stop = RecordingStage(), make_bus(s), asyncio.Event()
    await bus.start()
    task = asyncio.create_task(run_stage(stage, bus, s, stop))
    try:
        await bus.publish([bad, *good])
        out = await read_all(bus, VALIDATED, expect=3)
        assert sorted(transfer_ids(out)) == sorted(e.envelope.transfer_id for e in good)
        poisoned = await read_all(bus, POISON, expect=1)
        assert transfer_ids(poisoned) == [bad.envelope.transfer_id]
        assert poisoned[0].envelope.extra["failedstage"] == "recording"
        assert "ValueError" in poisoned[0].envelope.extra["reason"]
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await bus.stop()


async def test_graceful_stop_commits_what_was_handled(
        bus_settings: Factory) -> None:
    s = bus_settings()
    inputs = [received() for _ in range(20)]
    stage, bus, stop = RecordingStage(), make_bus(s), asyncio.Event()
    await bus.start()
    await bus.publish(inputs)
    task = asyncio.create_task(run_stage(stage, bus, s, stop))
    await wait_for(lambda: len(stage.seen) == len(inputs))
    started = time.monotonic()
    stop.set()
    await asyncio.wait_for(task, 30)
    assert time.monotonic() - started < s.shutdown_grace_s
    lag = await bus.lag("recording", [RECEIVED])
    await bus.stop()
    assert lag and sum(lag.values()) == 0  # non-empty: every partition was read, and all are committed


async def test_records_not_completed_are_read_again_completed_ones_are_not(bus_settings: Factory) -> None:
    s = bus_settings()
    bus = make_bus(s)
    await bus.start()
    try:
        inputs = [received() for _ in range(6)]
        await bus.publish(inputs)
        first = bus.subscribe("member", [RECEIVED])
        await first.start()
        got: list[Record] = []
        while len(got) < 6:
            got += await first.poll(100, 1.0)
        # Complete half (with an output), then "crash": stop without completing the rest.
        from services.core.bus import Partition

        done = [r for r in got if r.envelope.transfer_id in {e.envelope.transfer_id for e in inputs[:3]}]
        offsets: dict[Partition, int] = {}
        for r in got:  # commit, per partition, only up to the first record that is not done
            p = Partition(r.topic, r.partition)
            if p in offsets and offsets[p] != r.offset:
                continue
            if r in done:
                offsets[p] = r.offset + 1
        completed = [r for r in done if Partition(r.topic, r.partition) in offsets
                     and r.offset < offsets[Partition(r.topic, r.partition)]]
        await first.complete([Emit(VALIDATED, r.key, r.envelope.evolve()) for r in completed], offsets)
        await first.stop()
        committed_ids = {r.envelope.transfer_id for r in completed}

        second = bus.subscribe("member", [RECEIVED])
        await second.start()
        again: list[Record] = []
        deadline = time.monotonic() + 20
        while len(again) < 6 - len(committed_ids) and time.monotonic() < deadline:
            again += await second.poll(100, 0.5)
        await second.stop()
        assert {r.envelope.transfer_id for r in again} == {e.envelope.transfer_id for e in inputs} - committed_ids
        outputs = await read_all(bus, VALIDATED, expect=len(committed_ids), settle_s=0.5)
        assert sorted(transfer_ids(outputs)) == sorted(committed_ids)
    finally:
        await bus.stop()


async def test_keys_keep_order_within_a_partition(bus_settings: Factory) -> None:
    s = bus_settings()
    bus = make_bus(s)
    await bus.start()
    try:
        emits = [received(transfer_id=f"same-key-{i:03d}") for i in range(30)]
        emits = [Emit(e.topic, b"one-person", e.envelope) for e in emits]
        await bus.publish(emits)
        records = await read_all(bus, RECEIVED, expect=30)
        assert len({r.partition for r in records}) == 1
        assert transfer_ids(records) == [e.envelope.transfer_id for e in emits]
    finally:
        await bus.stop()


class SlowOnDemandStage(RecordingStage):
    """A record marked `slow` takes until `release` is set; the others are handled at once."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def handle(self, record: Record) -> Sequence[Emit]:
        if record.envelope.extra.get("slow"):
            await self.release.wait()
        return await super().handle(record)


async def test_a_slow_record_holds_only_its_own_partition_and_the_others_are_committed(
        bus_settings: Factory) -> None:
    """Issue 11/15: completed records are committed as they complete, not when the poll's slowest is done."""
    s = bus_settings(topic_partitions=6)
    slow = received(slow="1")
    others = [received() for _ in range(30)]
    stage, bus, stop = SlowOnDemandStage(), make_bus(s), asyncio.Event()
    await bus.start()
    task = asyncio.create_task(run_stage(stage, bus, s, stop))
    try:
        await bus.publish([slow, *others])
        inputs = await read_all(bus, RECEIVED, expect=len(others) + 1)
        [held] = [r.partition for r in inputs if r.envelope.extra.get("slow")]
        elsewhere = {r.envelope.transfer_id for r in inputs if r.partition != held}

        async def only_the_slow_partition_lags() -> bool:
            lag = await bus.lag(stage.name, [RECEIVED])
            return all(n == 0 for p, n in lag.items() if p.partition != held) and sum(lag.values()) > 0

        # Every other partition's outputs are published and its offsets committed while the slow
        # record is still in hand (the old runner committed a poll's batch only once all of it was done).
        await wait_for(only_the_slow_partition_lags, timeout_s=30)
        out = await read_all(bus, VALIDATED, expect=len(elsewhere))
        assert elsewhere <= set(transfer_ids(out))
        assert slow.envelope.transfer_id not in transfer_ids(out)
        stage.release.set()
        await wait_for(lambda: _lag_is_zero(bus, stage.name), timeout_s=30)
    finally:
        stop.set()
        stage.release.set()
        await asyncio.wait_for(task, 30)
        await bus.stop()


async def _lag_is_zero(bus: Bus, stage: str) -> bool:
    return sum((await bus.lag(stage, [RECEIVED])).values()) == 0


class IntervalStage:
    """Reads two topics and notes, per key, which member handled each record and when (no outputs)."""

    name = "lanes"
    topics: Sequence[str] = (RECEIVED, REJECTED)

    def __init__(self, member: str, seen: dict[bytes, list[tuple[str, float, float]]], ids: set[str]) -> None:
        self.member, self.seen, self.ids = member, seen, ids

    async def handle(self, record: Record) -> Sequence[Emit]:
        began = time.monotonic()
        await asyncio.sleep(0.1)
        self.seen.setdefault(record.key or b"", []).append((self.member, began, time.monotonic()))
        self.ids.add(record.envelope.transfer_id)
        return []


async def test_one_member_at_a_time_holds_a_keys_records_in_every_topic_of_its_group_across_a_hand_over(
        bus_settings: Factory) -> None:
    """Issue 15: a key's records in all the topics a group reads (a delivery lane and its retry tiers) are
    handled by one member at a time, also while a joining member takes its share: partitions are shared by
    number (co-partitioned) and handed over once their records in hand are committed."""
    s = bus_settings(topic_partitions=4)
    keys = [f"person-{k}".encode() for k in range(8)]
    emits = [Emit(topic, key, received(transfer_id=f"{topic}-{key.decode()}-{n}").envelope)
             for n in range(30) for key in keys for topic in (RECEIVED, REJECTED)]
    seen: dict[bytes, list[tuple[str, float, float]]] = {}
    ids: set[str] = set()
    bus_a, bus_b, stop = make_bus(s), make_bus(s), asyncio.Event()
    await bus_a.start()
    await bus_b.start()
    tasks = [asyncio.create_task(run_stage(IntervalStage("a", seen, ids), bus_a, s, stop))]
    try:
        await bus_a.publish(emits)
        await wait_for(lambda: _at_least(ids, 16), timeout_s=30)
        tasks.append(asyncio.create_task(run_stage(IntervalStage("b", seen, ids), bus_b, s, stop)))
        await wait_for(lambda: _at_least(ids, len(emits)), timeout_s=60)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        await bus_a.stop()
        await bus_b.stop()
    assert {member for spans in seen.values() for member, _, _ in spans} == {"a", "b"}, "b never took a share"
    for key, spans in seen.items():
        for m1, start1, end1 in spans:
            for m2, start2, end2 in spans:
                assert m1 == m2 or end1 <= start2 or end2 <= start1, (
                    f"{key!r} handled by {m1} and {m2} at once ({start1:.2f}-{end1:.2f}, {start2:.2f}-{end2:.2f})")


async def _at_least(ids: set[str], n: int) -> bool:
    return len(ids) >= n
