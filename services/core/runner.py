"""The one loop every stage runs in: consume, handle, publish and commit atomically, stop gracefully.

A stage only writes `handle()`. The runner owns everything else: one lane per partition, commits as
records complete (grouped while a commit is in flight), per-record log context
and timing, delayed records (`not_before`), the fate of exceptions, and commits. Its promise is the
bus's: an input offset is committed only together with the outputs it produced, so a crash at any
point means the record is handled again, never lost.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Coroutine, Hashable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from services.core.bus import Bus, Partition, Subscription
from services.core.crypto import X_DECRYPT_ERROR, DecryptionError
from services.core.envelope import Emit, Record, event
from services.core.errors import LetGo, TransientError
from services.core.fate import Fate
from services.core.logging import get_logger
from services.core.metrics import BATCH_COMMIT_SECONDS, HANDLE_SECONDS, RECORDS
from services.core.settings import Settings
from services.core.tasks import wait_until_set
from services.core.topics import EVENTS, POISON

log = get_logger(__name__)

POLL_TIMEOUT_S = 0.5
TRANSIENT_BACKOFF_S = (0.5, 1, 2, 5, 10, 30)
SETTLE_LANES_S = 30.0  # how long a failed pump waits for its lanes' records in hand before cancelling them
HAND_BACK_S = 8.0  # how long a rebalance waits for the records in hand of the partitions it takes (Kafka: < 10 s)
HANDLED_FACTOR = 10  # handled records held for an earlier one of their partition, per record to handle


class Stage(Protocol):
    """What a pipeline stage provides; the runner does the rest.

    `name` names the consumer group and the log context; `topics` are the logical topics it reads.
    `handle` turns one record into the records to publish (to other topics, including events). It
    raises `TransientError` when the infrastructure it needs is down (the record is retried later,
    in order) and any other exception when the record itself cannot be handled (it goes to the
    poison topic, and the transfer is marked failed, so it never disappears silently).

    A stage may also define `def lane(record) -> Hashable`: records of one partition in different
    lanes are handled concurrently, each lane in order (default: one lane per partition); and
    `async def committed(records)`: called (best effort) once the records' outputs and offsets are
    committed, e.g. to close what it recorded about side effects outside the bus; and
    `async def prepare(records)`: called with a whole poll before its records are handled, to do the
    stage's I/O for the poll at once (the tracker projects a poll's events in one transaction); and
    `def stopping()`: called when the runner stops polling, so records waiting inside `handle` (not
    working) give up at once, e.g. by raising `TransientError` (they are read again later); and
    `async def assigned(gained, lost, pending)`: called when this member's partitions changed, before any
    record of a gained partition is handled, with `pending(partitions)` reading the records of those
    partitions the group has not committed yet (delivery: the records a lane has waiting in retry tiers); and
    `def crowding(excess)`: called before each poll while the records in hand are past half their bound (by
    `excess`), so that records waiting inside `handle` move out to wait durably (delivery: the longest-waiting
    for a target's slot go to a retry tier) and their partitions commit: else records waiting, each within
    its own bound, could together stop the poll for all (issue 15). Records it moved out stay in hand until
    their partition commits past them: the stage counts those, not to move out more than `excess`.
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
            await _Pump(stage, sub, settings, stop).run()
        except TransientError as exc:
            delay = TRANSIENT_BACKOFF_S[min(failures, len(TRANSIENT_BACKOFF_S) - 1)]
            failures += 1
            log.warning("stage interrupted; rejoining", stage=stage.name, error=str(exc), retry_in_s=delay)
            await _sleep_unless(stop, delay)
        finally:
            await sub.stop()
    log.info("stage stopped", stage=stage.name)


@dataclass
class _Slot:
    """A record in hand: its generation (bumped when its partition is rewound) and, once handled, its outputs."""

    record: Record
    generation: int
    emits: Sequence[Emit] | None = None
    started: bool = False
    behind: bool = False  # queued behind an earlier record of its lane when it came (not counted as to start)


@dataclass
class _PartitionState:
    """One partition's records in hand, by offset (in offset order), and the lanes handling them."""

    slots: dict[int, _Slot] = field(default_factory=dict)
    lanes: dict[Hashable, deque[tuple[int, Record]]] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    generation: int = 0
    # After a deferral the bus re-delivers the partition from this offset: anything else is stale.
    rewound_to: int | None = None


class _Pump:
    """Polls, hands records to lanes, and commits completed records as they complete.

    Partitions are independent (that is what keys are for), and so are the lanes of a partition
    when the stage names them (`lane(record)`, e.g. delivery: one lane per target + person):
    each lane handles its records in order, one slow record holds only its own lane. A partition is
    committed up to its first record not yet handled, so committed offsets are contiguous and a
    record's outputs are published with its offset. A committer takes whatever has become
    committable — a record, or a run of them gathered while the previous commit was in flight — in
    one `complete`. At most `batch_size` records wait to start; records being handled, handled but
    waiting for an earlier one of their partition to be committed, and — when the stage names lanes —
    records queued behind an earlier one of their own lane count apart (up to HANDLED_FACTOR times more),
    so a slow lane (a slow target's person with several Bundles) does not stop the others from fetching.
    A stage whose
    records may wait inside `handle` (delivery: for their target's concurrency slot) bounds that
    waiting itself, per what they wait for, so one slow target never stops the poll for the others.
    """

    def __init__(self, stage: Stage, sub: Subscription, settings: Settings, stop: asyncio.Event) -> None:
        self.stage, self.sub, self.stop = stage, sub, stop
        self.lane_of: Callable[[Record], Hashable] = getattr(stage, "lane", lambda _: None)
        self.named_lanes = hasattr(stage, "lane")
        self.prepare: Callable[[list[Record]], Awaitable[None]] | None = getattr(stage, "prepare", None)
        self.assigned: Callable[..., Awaitable[None]] | None = getattr(stage, "assigned", None)
        self.crowding: Callable[[int], None] | None = getattr(stage, "crowding", None)
        self.known: set[Partition] = set()  # the assignment the stage was last told of
        self.committing: set[Partition] = set()  # partitions of the commit in flight
        if hasattr(sub, "on_revoke"):
            sub.on_revoke = self._hand_back
        if hasattr(sub, "on_release"):
            sub.on_release = self._let_go
        self.capacity = settings.batch_size
        self.in_hand = 0     # polled, not yet committed or dropped
        self.unhandled = 0   # of those, not yet started by their lane
        self.room = asyncio.Event()
        self.partitions: dict[Partition, _PartitionState] = {}
        self.done: list[tuple[Record, Sequence[Emit]]] = []  # committable, in offset order per partition
        self.has_done = asyncio.Event()
        self.commit_interval_s = sub.commit_interval_s
        self.flush = asyncio.Event()  # set when stopping: the committer no longer keeps to its interval
        self.closing = False
        self.halting = False  # the pump failed (e.g. fenced): lanes take no further record
        self.pauses: list[tuple[Partition, int, float]] = []  # applied by the poll loop, between polls
        self.failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.hooks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        poller = asyncio.create_task(self._poll_loop(), name=f"{self.stage.name}-poll")
        committer = self._spawn(self._commit_loop(), f"{self.stage.name}-commit")
        try:
            await asyncio.wait([poller, self.failed], return_when=asyncio.FIRST_COMPLETED)
            if self.failed.done():
                await self._settle_lanes()
                self.failed.result()  # raises what broke a lane or the committer
            poller.result()
            # Stopping: lanes finish the record in hand, the rest is left uncommitted (read again later);
            # a stage whose records may be waiting inside `handle` lets them go now (`stopping()`).
            stopping = getattr(self.stage, "stopping", None)
            if stopping is not None:
                stopping()
            await asyncio.gather(*self._lane_tasks())
            self.closing = True
            self.has_done.set()
            self.flush.set()
            await committer
            await asyncio.gather(*self.hooks)
        finally:
            tasks = [poller, committer, *self._lane_tasks()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if not self.failed.done():
                self.failed.cancel()

    async def _settle_lanes(self) -> None:
        """Before rejoining: lanes stop at a record boundary (their outputs are not committed), never mid-record.

        A record cut short could leave a side effect half-recorded (a POST without its journaled answer);
        finished, its outputs are simply dropped and the partition's next holder handles it again, knowing.
        """
        self.halting = True
        lanes = self._lane_tasks()
        if lanes:
            await asyncio.wait(lanes, timeout=SETTLE_LANES_S)

    def _lane_tasks(self) -> list[asyncio.Task[None]]:
        return [t for state in self.partitions.values() for t in state.tasks]

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._check)
        return task

    def _check(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None and not self.failed.done():
            self.failed.set_exception(task.exception())  # type: ignore[arg-type]

    # --- polling -------------------------------------------------------------------------
    async def _poll_loop(self) -> None:
        while not self.stop.is_set():
            self._apply_pauses()
            self._relieve()
            room = min(self.capacity - self.unhandled, self.capacity * HANDLED_FACTOR - self.in_hand)
            if room <= 0:
                self.room.clear()
                await wait_until_set(self.room, POLL_TIMEOUT_S)
                continue
            records = await self.sub.poll(room, POLL_TIMEOUT_S)
            if self.assigned is not None:
                await self._follow_assignment(self.assigned)
            if records and self.prepare is not None:
                await self.prepare(records)
            for record in records:
                self._dispatch(record)

    def _relieve(self) -> None:
        """Past half the records it may hold in hand, the stage moves records waiting inside `handle` out (before
        the poll has to stop at the bound itself)."""
        half = self.capacity * HANDLED_FACTOR // 2
        if self.crowding is not None and self.in_hand > half:
            self.crowding(self.in_hand - half)

    async def _hand_back(self, partitions: set[Partition]) -> None:
        """The bus takes `partitions` away (a Kafka rebalance): their records in hand finish and commit here first.

        So the next holder starts where this one stopped, at a record boundary, and never handles a lane while
        this process still does (its order, issue 15). Past HAND_BACK_S (a target slower than the rebalance
        timeout) the rest is rewound: its outputs are dropped and the next holder handles it again; the
        attempt journal keeps a POST from being made twice meanwhile.
        """
        self._let_go(partitions)
        deadline = time.monotonic() + HAND_BACK_S
        while self._holding(partitions) and not self.failed.done() and (left := deadline - time.monotonic()) > 0:
            self.room.clear()  # set by every commit (and rewind): look again then
            await wait_until_set(self.room, left)
        for partition in partitions:
            state = self.partitions.get(partition)
            if state is not None and state.slots:
                self._rewind(partition, state, min(state.slots), time.monotonic())

    def _let_go(self, partitions: Collection[Partition]) -> None:
        """Partitions are about to change hands: a stage whose records may wait inside `handle` lets theirs go."""
        releasing = getattr(self.stage, "releasing", None)
        if releasing is not None:
            releasing(partitions)

    def _holding(self, partitions: set[Partition]) -> bool:
        """Whether records of `partitions` are in hand: being handled, waiting for their lane, or being committed."""
        return (any(self.partitions[p].slots for p in partitions if p in self.partitions)
                or any(Partition(r.topic, r.partition) in partitions for r, _ in self.done)
                or bool(self.committing & partitions))

    async def _follow_assignment(self, assigned: Callable[..., Awaitable[None]]) -> None:
        """Tell the stage the partitions it gained and lost since the last poll, before it sees their records."""
        now = self.sub.assignment()
        if now != self.known:
            await assigned(now - self.known, self.known - now, self.sub.pending)
            self.known = now

    def _dispatch(self, record: Record) -> None:
        partition = Partition(record.topic, record.partition)
        state = self.partitions.setdefault(partition, _PartitionState())
        if state.rewound_to is not None:
            if record.offset > state.rewound_to:
                return  # fetched before the partition was rewound: it comes again, in order
            if record.offset == state.rewound_to:
                state.rewound_to = None
        if record.offset in state.slots:
            return  # already in hand
        key = self.lane_of(record)
        queue = state.lanes.get(key)
        # Behind an earlier record of its own lane, it could not start anyway: it is that lane's backlog.
        behind = self.named_lanes and queue is not None
        state.slots[record.offset] = _Slot(record, state.generation, behind=behind)
        self.in_hand += 1
        self.unhandled += 0 if behind else 1
        if queue is None:
            queue = state.lanes[key] = deque()
            task = self._spawn(self._lane_loop(partition, state, key, queue), f"{self.stage.name}-{partition}")
            state.tasks.add(task)
            task.add_done_callback(state.tasks.discard)
        queue.append((state.generation, record))

    def _apply_pauses(self) -> None:
        # Only between polls: a bus rewinding a partition while a poll is in flight could lose the rewind.
        pauses, self.pauses = self.pauses, []
        for partition, offset, due in pauses:
            self.sub.pause_until(partition, offset, due)

    def _release(self, count: int, unhandled: int = 0) -> None:
        self.in_hand -= count
        self.unhandled -= unhandled
        self.room.set()

    # --- handling, one task per lane ------------------------------------------------------------
    async def _lane_loop(self, partition: Partition, state: _PartitionState, key: Hashable,
                         queue: deque[tuple[int, Record]]) -> None:
        # The lane ends when it has nothing left; a later record for it starts a new one.
        while queue and not self.stop.is_set() and not self.halting:
            generation, record = queue.popleft()
            if not self._current(state, record, generation):
                continue  # its partition was rewound: it comes again
            slot = state.slots[record.offset]
            slot.started = True
            self._release(0, unhandled=0 if slot.behind else 1)
            try:
                emits = await _handle_record(self.stage, record)
            except _Deferred as deferred:
                if self._current(state, record, generation):
                    self._rewind(partition, state, record.offset, deferred.due)
                continue
            if self._current(state, record, generation):
                state.slots[record.offset].emits = emits
                self._advance(state)
        if state.lanes.get(key) is queue:
            del state.lanes[key]

    @staticmethod
    def _current(state: _PartitionState, record: Record, generation: int) -> bool:
        slot = state.slots.get(record.offset)
        return slot is not None and slot.generation == generation

    def _rewind(self, partition: Partition, state: _PartitionState, offset: int, due: float) -> None:
        """Come back to the partition at `offset` at `due`; what is in hand from there on is dropped."""
        dropped = [state.slots.pop(o) for o in list(state.slots) if o >= offset]
        self._release(len(dropped), unhandled=sum(1 for slot in dropped if not slot.started and not slot.behind))
        state.generation += 1
        state.rewound_to = offset if state.rewound_to is None else min(state.rewound_to, offset)
        self.pauses.append((partition, offset, due))

    def _advance(self, state: _PartitionState) -> None:
        """Move the partition's handled records, up to its first unhandled one, to the committer."""
        while state.slots:
            offset, slot = next(iter(state.slots.items()))
            if slot.emits is None:
                return
            del state.slots[offset]
            self.done.append((slot.record, slot.emits))
            self.has_done.set()

    # --- committing ------------------------------------------------------------------------
    async def _commit_loop(self) -> None:
        while True:
            if not self.done:
                if self.closing:
                    return
                self.has_done.clear()
                await self.has_done.wait()
                continue
            batch, self.done = self.done, []
            offsets: dict[Partition, int] = {}
            for record, _ in batch:
                partition = Partition(record.topic, record.partition)
                offsets[partition] = max(offsets.get(partition, 0), record.offset + 1)
            started = time.perf_counter()
            self.committing = set(offsets)
            try:
                await self.sub.complete([e for _, emits in batch for e in emits], offsets)
            finally:
                self.committing = set()
            BATCH_COMMIT_SECONDS.labels(self.stage.name).observe(time.perf_counter() - started)
            self._release(len(batch))
            hook = getattr(self.stage, "committed", None)
            if hook is not None:
                self.hooks = {t for t in self.hooks if not t.done()}
                self.hooks.add(asyncio.create_task(_after_commit(hook, [r for r, _ in batch])))
            # The records handled meanwhile go together in the next commit (stopping does not wait for it).
            rest = started + self.commit_interval_s - time.perf_counter()
            if rest > 0 and not self.closing:
                await wait_until_set(self.flush, rest)


async def _after_commit(hook: Callable[[Sequence[Record]], Awaitable[None]], records: Sequence[Record]) -> None:
    try:
        await hook(records)
    except Exception as exc:  # noqa: BLE001 - bookkeeping after a commit never undoes the commit
        log.warning("after-commit hook failed", error=str(exc))


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
    outcome = Fate.FORWARD
    try:
        if X_DECRYPT_ERROR in env.extra:  # tampered or unknown key: never handed to the stage
            raise DecryptionError(env.extra[X_DECRYPT_ERROR])
        return await stage.handle(record)
    except TransientError as exc:
        outcome = Fate.RETRY
        # The infrastructure the stage needs is down (or the record gives way): keep it, retry it (in order) shortly.
        if isinstance(exc, LetGo):
            log.info("record let go unattempted; read again", reason=str(exc))
        else:
            log.warning("record deferred: dependency unavailable", error=str(exc))
        raise _Deferred(time.monotonic() + TRANSIENT_BACKOFF_S[1]) from exc
    except Exception as exc:
        outcome = Fate.DEAD_LETTER
        log.exception("record could not be handled; sent to the poison topic", error_type=type(exc).__name__)
        return poison(stage.name, record, exc)
    finally:
        elapsed = time.perf_counter() - started
        HANDLE_SECONDS.labels(stage.name).observe(elapsed)
        RECORDS.labels(stage.name, record.topic, outcome.value).inc()
        # The one canonical line per record (bound context: stage, transfer, topic, partition, offset ...).
        log.info("record handled", outcome=outcome.value, duration_ms=round(elapsed * 1000, 2))


FAILED_EVENT_TYPE = "fr.relais.event.failed"


def poison(stage: str, record: Record, exc: BaseException) -> list[Emit]:
    """The records that keep an unhandleable record visible: a copy on the poison topic, and an event.

    The copy keeps the whole record (payload included), so `relais dlq replay` can read it back and
    send it to the topic it failed on; the `failed` event tells the ledger everything an operator
    needs to find it (stage, original topic/partition/offset, the copy's id) and says its fate.
    """
    reason = f"{type(exc).__name__}: {exc}"[:2000]
    env = record.envelope.evolve(extra={
        **record.envelope.extra, "origtopic": record.topic, "origpartition": str(record.partition),
        "origoffset": str(record.offset), "failedstage": stage, "reason": reason,
    })
    emits = [Emit(POISON, record.key, env)]
    # The tracker failing on an event is a dead letter too, told by a `failed` event; but one about a
    # `failed` event could loop forever through the tracker, so that one only goes to the poison topic.
    if record.topic != EVENTS or record.envelope.type != FAILED_EVENT_TYPE:
        emits.append(event(record.envelope, "failed", stage, {
            "reason": reason, "topic": record.topic, "partition": record.partition, "offset": record.offset,
            "fate": Fate.DEAD_LETTER.value, "poison_id": env.id,
            "key": (record.key or b"").decode(errors="replace"), "attempts": record.envelope.attempt,
        }))
    return emits


def _seconds_until(moment: datetime | None) -> float:
    if moment is None:
        return 0.0
    return (moment - datetime.now(UTC)).total_seconds()


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    await wait_until_set(stop, seconds)
