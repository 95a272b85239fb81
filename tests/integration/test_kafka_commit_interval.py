"""On Kafka a stage replica starts at most one transaction per RELAIS_KAFKA_COMMIT_INTERVAL_MS, and an idle one
commits its next record at once.

Each transaction costs the broker requests and a commit marker per partition it wrote, whatever it carries: a
stream of records each committed alone made the broker's JVM the largest CPU user per Bundle (issue 16). The
transactions are counted from the broker's side: in a partition read `read_committed`, each transaction's records
are contiguous and its commit marker takes the next offset, so the output's runs of consecutive offsets are its
transactions.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence

import pytest

from services.core.envelope import Emit, Record
from services.core.kafka import KafkaBus
from services.core.runner import run_stage
from services.core.settings import Settings
from services.core.topics import RECEIVED, VALIDATED
from tests.support.kafka import received, wait_for

pytestmark = pytest.mark.kafka

INTERVAL_S, STREAM, EVERY_S = 3.0, 30, 0.05


class Copying:
    name = "copying"
    topics: Sequence[str] = (RECEIVED,)

    def __init__(self) -> None:
        self.handled = 0

    async def handle(self, record: Record) -> Sequence[Emit]:
        self.handled += 1
        return [Emit(VALIDATED, record.key, record.envelope.evolve())]


class Reader:
    """One member of a group of its own, reading the stage's output as it is committed."""

    def __init__(self, bus: KafkaBus) -> None:
        self.sub = bus.subscribe(f"reader-{time.monotonic_ns()}", [VALIDATED])
        self.records: list[Record] = []

    async def until(self, n: int, timeout_s: float = 30.0) -> list[Record]:
        deadline = time.monotonic() + timeout_s
        while len(self.records) < n and time.monotonic() < deadline:
            self.records += await self.sub.poll(500, 0.05)
        assert len(self.records) >= n, f"{len(self.records)} of {n} outputs committed within {timeout_s:g} s"
        return self.records


def _transactions(outputs: list[Record]) -> int:
    """Runs of consecutive offsets in one partition: one per transaction (its marker breaks the run)."""
    offsets = sorted(r.offset for r in outputs)
    return 1 + sum(1 for a, b in itertools.pairwise(offsets) if b != a + 1)


async def test_a_stream_shares_transactions_and_an_idle_stage_commits_at_once(
        kafka_bootstrap: str, make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(kafka_bootstrap=kafka_bootstrap, topic_partitions=1,
                             kafka_commit_interval_ms=int(INTERVAL_S * 1000))
    bus, stop, stage = KafkaBus(settings), asyncio.Event(), Copying()
    await bus.start()
    reader = Reader(bus)
    await reader.sub.start()
    task = asyncio.create_task(run_stage(stage, bus, settings, stop))
    try:
        await bus.publish([received()])
        await reader.until(1)  # the stage is in its group and has committed once
        # Idle past the interval: the next record is committed at once, not an interval later.
        await asyncio.sleep(INTERVAL_S + 0.5)
        began = time.monotonic()
        await bus.publish([received()])
        await reader.until(2)
        alone_s = time.monotonic() - began
        # A stream of records 50 ms apart, about 1.5 s long: a transaction per interval, not one per record.
        stream_began = time.monotonic()
        for _ in range(STREAM):
            await bus.publish([received()])
            await asyncio.sleep(EVERY_S)
        span_s = time.monotonic() - stream_began
        outputs = list(await reader.until(2 + STREAM))
        # Stopping within an interval does not wait it out: the record handled last is committed on the way out.
        await bus.publish([received()])
        await reader.until(3 + STREAM)
        await bus.publish([received()])
        await wait_for(lambda: stage.handled == 4 + STREAM)
        stopping = time.monotonic()
        stop.set()
        await asyncio.wait_for(task, 30)
        stop_s = time.monotonic() - stopping
        lag = await bus.lag("copying", [RECEIVED])
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await reader.sub.stop()
        await bus.stop()
    assert alone_s < INTERVAL_S * 0.6, f"an idle stage's record took {alone_s:.2f} s to be committed"
    stream = sorted(outputs, key=lambda r: r.offset)[2:]
    assert len(stream) == STREAM
    most = 2 + span_s / INTERVAL_S  # one per interval, plus the first and a last part-interval
    assert _transactions(stream) <= most, f"{_transactions(stream)} transactions for {STREAM} records in {span_s:.1f} s"
    assert stop_s < INTERVAL_S * 0.6, f"stopping took {stop_s:.2f} s"
    assert sum(lag.values()) == 0  # the record handled last was committed on the way out

