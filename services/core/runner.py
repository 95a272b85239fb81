"""The one loop every stage runs in: consume, handle, publish and commit atomically, stop gracefully.

A stage only writes `handle()`. The runner owns everything else: batching, per-record log context
and timing, delayed records (`not_before`), the fate of exceptions, and commits. Its promise is the
bus's: an input offset is committed only together with the outputs it produced, so a crash at any
point means the record is handled again, never lost.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Protocol

import structlog

from services.core.bus import Bus, Partition, Subscription
from services.core.crypto import X_DECRYPT_ERROR, DecryptionError
from services.core.envelope import Emit, Record, event
from services.core.errors import TransientError
from services.core.logging import get_logger
from services.core.metrics import BATCH_COMMIT_SECONDS, HANDLE_SECONDS, RECORDS
from services.core.settings import Settings
from services.core.topics import EVENTS, POISON

log = get_logger(__name__)

POLL_TIMEOUT_S = 0.5
TRANSIENT_BACKOFF_S = (0.5, 1, 2, 5, 10, 30)


class Stage(Protocol):
    """What a pipeline stage provides; the runner does the rest.

    `name` names the consumer group and the log context; `topics` are the logical topics it reads.
    `handle` turns one record into the records to publish (to other topics, including events). It
    raises `TransientError` when the infrastructure it needs is down (the record is retried later,
    in order) and any other exception when the record itself cannot be handled (it goes to the
    poison topic, and the transfer is marked failed, so it never disappears silently).
    A stage may also define `async def prepare(records)`, called with a whole poll before `handle`,
    to do its I/O for the batch at once (the tracker projects a poll's events in one transaction).
    """

    name: str
    topics: Sequence[str]

    async def handle(self, record: Record) -> Sequence[Emit]:
        """Decide what `record` becomes."""
        ...


class _Deferred(Exception):
    """Internal: stop this partition here and come back at `due` (monotonic)."""

    def __init__(self, due: float) -> None:
        self.due = due


async def run_stage(stage: Stage, bus: Bus, settings: Settings, stop: asyncio.Event) -> None:
    """Run `stage` until `stop` is set; rejoins the group after bus failures, with backoff."""
    failures = 0
    while not stop.is_set():
        sub = bus.subscribe(stage.name, stage.topics)
        try:
            await sub.start()
            log.info("stage started", stage=stage.name, topics=list(stage.topics))
            failures = 0
            while not stop.is_set():
                await _run_once(stage, sub, settings)
                failures = 0
        except TransientError as exc:
            delay = TRANSIENT_BACKOFF_S[min(failures, len(TRANSIENT_BACKOFF_S) - 1)]
            failures += 1
            log.warning("stage interrupted; rejoining", stage=stage.name, error=str(exc), retry_in_s=delay)
            await _sleep_unless(stop, delay)
        finally:
            await sub.stop()
    log.info("stage stopped", stage=stage.name)


async def _run_once(stage: Stage, sub: Subscription, settings: Settings) -> None:
    records = await sub.poll(settings.batch_size, POLL_TIMEOUT_S)
    if not records:
        return
    prepare = getattr(stage, "prepare", None)  # optional: a stage's I/O for the whole poll at once (tracker)
    if prepare is not None:
        await prepare(records)
    by_partition: dict[Partition, list[Record]] = defaultdict(list)
    for record in records:
        by_partition[Partition(record.topic, record.partition)].append(record)
    # Partitions are independent (that is what keys are for), so they are handled concurrently;
    # inside a partition, records keep their order.
    results = await asyncio.gather(*(_handle_partition(stage, sub, p, rs) for p, rs in by_partition.items()))
    emits = [e for partition_emits, _ in results for e in partition_emits]
    offsets = {p: next_offset for (_, next_offset), p in zip(results, by_partition, strict=True) if next_offset}
    if emits or offsets:
        started = time.perf_counter()
        await sub.complete(emits, offsets)
        BATCH_COMMIT_SECONDS.labels(stage.name).observe(time.perf_counter() - started)


async def _handle_partition(
    stage: Stage, sub: Subscription, partition: Partition, records: list[Record]
) -> tuple[list[Emit], int | None]:
    """Handle one partition's records in order; returns the emits and the next offset to commit."""
    emits: list[Emit] = []
    next_offset: int | None = None
    for record in records:
        try:
            emits += await _handle_record(stage, record)
        except _Deferred as deferred:
            sub.pause_until(partition, record.offset, deferred.due)
            break
        next_offset = record.offset + 1
    return emits, next_offset


async def _handle_record(stage: Stage, record: Record) -> Sequence[Emit]:
    env = record.envelope
    due = _seconds_until(env.not_before)
    if due > 0:
        raise _Deferred(time.monotonic() + due)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(
        stage=stage.name, transfer_id=env.transfer_id, topic=record.topic, partition=record.partition,
        offset=record.offset, attempt=env.attempt, target=env.target,
    )
    started = time.perf_counter()
    outcome = "ok"
    try:
        if X_DECRYPT_ERROR in env.extra:  # tampered or unknown key: never handed to the stage
            raise DecryptionError(env.extra[X_DECRYPT_ERROR])
        return await stage.handle(record)
    except TransientError as exc:
        outcome = "transient"
        # The infrastructure the stage needs is down: keep the record, retry it (in order) shortly.
        log.warning("record deferred: dependency unavailable", error=str(exc))
        raise _Deferred(time.monotonic() + TRANSIENT_BACKOFF_S[1]) from exc
    except Exception as exc:
        outcome = "poison"
        log.exception("record could not be handled; sent to the poison topic", error_type=type(exc).__name__)
        return poison(stage.name, record, exc)
    finally:
        elapsed = time.perf_counter() - started
        HANDLE_SECONDS.labels(stage.name).observe(elapsed)
        RECORDS.labels(stage.name, record.topic, outcome).inc()
        log.debug("record handled", outcome=outcome, duration_ms=round(elapsed * 1000, 2))


def poison(stage: str, record: Record, exc: BaseException) -> list[Emit]:
    """The records that keep an unhandleable record visible: a copy on the poison topic, and an event."""
    reason = f"{type(exc).__name__}: {exc}"[:2000]
    env = record.envelope.evolve(extra={
        **record.envelope.extra, "origtopic": record.topic, "origpartition": str(record.partition),
        "origoffset": str(record.offset), "failedstage": stage, "reason": reason,
    })
    emits = [Emit(POISON, record.key, env)]
    # An event about an event could loop forever through the tracker; those only go to the poison topic.
    if record.topic != EVENTS:
        emits.append(event(record.envelope, "failed", stage, {"reason": reason, "topic": record.topic}))
    return emits


def _seconds_until(moment: datetime | None) -> float:
    if moment is None:
        return 0.0
    return (moment - datetime.now(UTC)).total_seconds()


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass
