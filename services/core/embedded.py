"""The embedded bus: a durable single-node log on SQLite (WAL) with Kafka's semantics, for the processes of one machine.

`relais run` uses it when no Kafka is configured, so the whole broker runs with nothing but Python.
It keeps the contract of `services.core.bus`: topics with partitions, keys and headers; consumer
groups with committed offsets; `publish` returns once the records are on disk (fsync'd, group
committed with whatever else was being written); `complete` writes a stage's outputs and its new
offsets in one SQLite transaction. A `kill -9` of any process therefore loses nothing and
duplicates nothing inside the log.

Several processes share the file (`relais run` starts one per core). A consumer group's partitions
are leased to its live members by number, partition p of every topic of the group together (see
`embedded_groups.heartbeat`: a lane's records and its retries stay in one process): a new member gets its share, a
member that dies (its process gone, or frozen for LEASE_S) leaves its partitions to the
others within a heartbeat, and a member that lost a partition cannot commit it any more (`Fenced`).
A process that commits records rings the members that hold their topics (`embedded_doorbell`: a UNIX
datagram each), so an idle member in another process reads them at once; a lost ring is caught by the
member's own look at SQLite's `data_version` every BELL_POLL_S (IDLE_POLL_S where it has no bell, or where
records came unannounced lately: a writer that does not ring, as an older Relais during an upgrade). Past a
few hundred transfers per second, or across machines, use Kafka.

`publish` writes to the log's inbox (`embedded_inbox`), a file only publishers write, and returns once
the records are on disk there; this process then moves them into the log at once, and every process
sweeps what a dead publisher left. So a 202 waits for its own fsync, never behind a stage's commit.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import Gauge

from services.core.bus import Partition
from services.core.crypto import Keyring, open_envelope, seal_envelope
from services.core.embedded_doorbell import Bell, Ringer
from services.core.embedded_groups import HOST, LEASE_S, Fenced, TopicPartition
from services.core.embedded_inbox import Inbox, inbox_path
from services.core.embedded_log import EmbeddedLog, Row
from services.core.envelope import Emit, Envelope, EnvelopeError, Record
from services.core.errors import BusUnavailable
from services.core.logging import get_logger
from services.core.settings import Settings
from services.core.tasks import cancel_and_wait, wait_until_set
from services.core.topics import declared_topics

log = get_logger(__name__)

PIPELINE_STAGES = ("validator", "router", "delivery", "tracker")  # their groups hold records back from retention
HEARTBEAT_S = 1.0
IDLE_POLL_S = 0.05  # an idle member without a doorbell looks at the log this often ...
BELL_POLL_S = 0.25  # ... and one with a doorbell this often (what a lost ring costs at most) ...
UNRUNG_S = 30.0  # ... unless records came without a ring within this long (a writer that does not ring: an older
# Relais during an upgrade, or one whose rings cannot reach us): then as often as without a doorbell
PRUNE_EVERY_S = 60.0
PROBE_AFTER_S = 2.0  # readiness: with no successful write for this long, write a probe
PENDING_BATCH = 500  # records read at a time by `pending` (a member taking partitions over reads their backlog)
MOVE_ROWS = 500  # inbox rows moved into the log per transaction ...
MOVE_BYTES = 16 * 1024 * 1024  # ... and about this much of their values: a burst published at once lands at once
SWEEP_S = 1.0  # every process looks for inbox rows a dead publisher left this often ...
SWEEP_AGE_S = 2.0  # ... and moves those waiting longer than this (the publisher moves its own at once)
STOP_MOVE_S = 5.0  # a stopping publisher moves what it put for at most this long (else the others sweep it)

STORAGE_UNWRITABLE = Gauge("relais_storage_unwritable", "1 while this process cannot write the embedded log, "
                           "labelled with why (disk-full, read-only, locked, cannot-open, io-error)",
                           ["store", "reason"])

__all__ = ["EmbeddedBus", "EmbeddedSubscription", "Fenced"]


def _encode_headers(headers: list[tuple[str, bytes]]) -> str:
    return orjson.dumps([[k, base64.b64encode(v).decode()] for k, v in headers]).decode()


def _decode_headers(text: str) -> list[tuple[str, bytes]]:
    return [(k, base64.b64decode(v)) for k, v in orjson.loads(text)]


class EmbeddedBus:
    """Relais's bus on the embedded SQLite log."""

    def __init__(self, settings: Settings, path: Path | None = None) -> None:
        self.settings = settings
        self.log = EmbeddedLog(path or settings.embedded_log_path)
        self.inbox = Inbox(inbox_path(self.log.path))
        self._topics = {s.name for s in declared_topics(settings)}  # what `start` declares in the log
        self.keyring = Keyring.from_settings(settings)  # None: record values are written in clear
        self._members: dict[str, asyncio.Event] = {}  # this bus's subscriptions: member -> its wake-up
        self._ringer = Ringer(self.log.path, lambda: self.log.read(self.log.holders))
        self._started = False
        self._pruner: asyncio.Task[None] | None = None
        self._mover: asyncio.Task[None] | None = None
        self._ringing: asyncio.Task[None] | None = None
        self._move_now = asyncio.Event()
        self._published = False  # this process puts rows in the inbox: it moves them at once and forgets them
        self._moved_of: str | None = None  # the inbox file (id) whose position `_moved` is
        self._moved = 0
        self._reported: str | None = None

    async def start(self) -> None:
        """Open the log and declare every topic; raises BusUnavailable (with why) if it cannot be written."""
        if not self._started:
            specs = [(self.settings.topic(s.name), self.settings.topic_partitions)
                     for s in declared_topics(self.settings)]
            try:
                await self.log.write(self.log.ensure_topics, specs)
            finally:
                self._report()
            self._started = True
            self._pruner = asyncio.create_task(self._prune_forever(), name="embedded-log-retention")
            self._mover = asyncio.create_task(self._move_forever(), name="embedded-log-inbox")
            await self._ringer.refresh()  # who to ring from the first commit on (then every HOLDERS_TTL_S)
            self._ringing = asyncio.create_task(self._ringer.refresh_forever(), name="embedded-log-doorbell")

    async def stop(self) -> None:
        """Close the log; safe twice."""
        for task in (self._pruner, self._mover, self._ringing):
            if task is not None:
                await cancel_and_wait(task)
        self._pruner = self._mover = self._ringing = None
        if self._published:
            with contextlib.suppress(BusUnavailable, TimeoutError):
                await asyncio.wait_for(self.move_inbox(), STOP_MOVE_S)
        if self._started:
            self._started = False
        self._ringer.close()
        await asyncio.to_thread(self.log.close)
        await asyncio.to_thread(self.inbox.close)

    async def publish(self, emits: Sequence[Emit]) -> None:
        """Durable in the inbox (fsync'd, one fsync for everything put meanwhile) before returning; moved
        into the log right after, in the background. Refused while the log refuses writes: the inbox is a
        door, not a second log (what it holds waits for the log; it must not grow while the log is broken)."""
        if self.log.problem:
            await self._probe_log()
            if self.log.problem:
                raise BusUnavailable(f"{self.log.problem} (nothing was accepted; retried when the fault clears)")
        unknown = {e.topic for e in emits} - self._topics
        if unknown:  # refused here: in the inbox such a row could never be moved, and would hold up the rest
            raise BusUnavailable(f"unknown topic(s) {', '.join(sorted(unknown))} in the embedded log {self.log.path}")
        try:
            await self.inbox.write(self.inbox.put, [self._row(e) for e in emits])
        finally:
            self._report()
        self._published = True
        self._move_now.set()

    async def move_inbox(self, waiting_s: float | None = None) -> int:
        """Move the inbox's rows into the log (only if the first has waited `waiting_s`); returns how many."""
        put_before = None if waiting_s is None else time.time() - waiting_s
        moved = 0
        while True:
            inbox, rows = await self.inbox.read(self.inbox.after, self._moved, MOVE_ROWS, MOVE_BYTES, put_before)
            if inbox is None:
                return moved
            if inbox != self._moved_of:  # first look, or a new inbox file: start from the log's position
                self._moved_of, self._moved = inbox, await self.log.read(self.log.inbox_position, inbox)
                continue
            if not rows:
                return moved
            position = await self.write(self.log.take_inbox, inbox, rows)
            moved += sum(1 for seq, _ in rows if seq > self._moved)
            self._moved, put_before = position, None  # moving: move everything behind them too
            self.announce({row[0] for _, row in rows})
            if self._published:
                with contextlib.suppress(BusUnavailable):  # kept rows are harmless: the position skips them
                    await self.inbox.write(self.inbox.forget, inbox, position)

    async def _move_forever(self) -> None:
        while True:
            await wait_until_set(self._move_now, SWEEP_S)
            sweep = not self._move_now.is_set()
            self._move_now.clear()
            try:
                await self.move_inbox(SWEEP_AGE_S if sweep and not self._published else None)
            except BusUnavailable as exc:
                log.warning("embedded log inbox not moved yet; retried", error=str(exc))
                await asyncio.sleep(SWEEP_S)

    def announce(self, topics: Iterable[str]) -> None:
        """Records were just committed to these physical `topics`: wake this bus's members, ring the others."""
        for wake in self._members.values():
            wake.set()
        self._ringer.ring(topics, skip=self._members)

    async def write(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A group-committed write that keeps the storage metric current (for subscriptions)."""
        try:
            return await self.log.write(fn, *args)
        finally:
            self._report()

    async def storage_problem(self) -> str | None:
        """Why this process cannot write the log now, or None; writes a probe when nothing was written lately."""
        if time.monotonic() - self.log.last_write_ok > PROBE_AFTER_S or self.log.problem:
            await self._probe_log()
        if self.inbox.problem:
            with contextlib.suppress(BusUnavailable):
                await self.inbox.write(self.inbox.probe)
            self._report()
        return self.log.problem or self.inbox.problem

    async def _probe_log(self) -> None:
        """A tiny real write to the log: clears `log.problem` when it takes writes again."""
        with contextlib.suppress(BusUnavailable):
            await self.write(self.log.probe, f"{HOST}-{os.getpid()}")

    @property
    def problem_reason(self) -> str | None:
        """Why the log or its inbox cannot be written now (the metric's label), or None."""
        return self.log.problem_reason or self.inbox.problem_reason

    def _report(self) -> None:
        reason = self.problem_reason
        if reason == self._reported:
            return
        if self._reported is not None:
            STORAGE_UNWRITABLE.labels("embedded-log", self._reported).set(0)
        if reason is not None:
            STORAGE_UNWRITABLE.labels("embedded-log", reason).set(1)
            log.error("embedded log cannot be written; records wait and are retried", reason=reason,
                      error=self.log.problem or self.inbox.problem)
        else:
            log.info("embedded log writable again")
        self._reported = reason

    def _row(self, emit: Emit) -> Row:
        value, headers = seal_envelope(self.keyring, emit.envelope)
        return (self.settings.topic(emit.topic), emit.key, value, _encode_headers(headers))

    def subscribe(self, stage: str, topics: Sequence[str]) -> EmbeddedSubscription:
        """A new member of the stage's group; it shares the partitions with the group's other live members."""
        return EmbeddedSubscription(self, self.settings.group(stage), topics)

    async def lag(self, stage: str, topics: Sequence[str]) -> dict[Partition, int]:
        """Head minus committed offset per partition; acknowledged records still in the inbox are moved first,
        so a reader sees every record a publish has acknowledged (as on Kafka)."""
        with contextlib.suppress(BusUnavailable):
            await self.move_inbox()
        group = self.settings.group(stage)
        physical = [self.settings.topic(t) for t in topics]
        parts = await self.log.read(self.log.partitions, physical)
        committed = await self.log.read(self.log.committed, group)
        heads = await self.log.read(self.log.heads)
        return {Partition(self._logical(t), p): heads.get((t, p), 0) - committed.get((t, p), 0) for t, p in parts}

    async def prune(self) -> int:
        """Apply the retention settings: delete old records every group has committed; returns how many."""
        retention = {self.settings.topic(s.name): s.retention_ms / 1000 for s in declared_topics(self.settings)}
        stages = [self.settings.group(stage) for stage in PIPELINE_STAGES]
        return int(await self.write(self.log.prune, retention, stages))

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_EVERY_S)
            try:
                for _ in range(100):  # short transactions: publishers wait behind none of them long
                    if await self.prune() == 0:
                        break
                    await asyncio.sleep(0.1)
            except BusUnavailable as exc:
                log.warning("embedded log retention skipped; retried later", error=str(exc))

    def _logical(self, physical: str) -> str:
        prefix = self.settings.topic_prefix
        return physical[len(prefix):] if prefix and physical.startswith(prefix) else physical


class EmbeddedSubscription:
    """A consumer-group member on the embedded log: leased partitions, positions in memory, offsets on disk."""

    commit_interval_s = 0.0  # a commit is one local SQLite transaction; the log's writer groups them already

    def __init__(self, bus: EmbeddedBus, group: str, topics: Sequence[str]) -> None:
        self.bus = bus
        self.group = group
        self.topics = [bus.settings.topic(t) for t in topics]
        self.member = f"{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._positions: dict[TopicPartition, int] = {}
        self._epochs: dict[TopicPartition, int] = {}
        self._paused: dict[TopicPartition, float] = {}
        self._in_flight: dict[TopicPartition, int] = {}  # partitions of the last poll -> the epoch read under
        self._committed: dict[TopicPartition, int] = {}  # what this member committed (or found) per partition
        self._draining: set[TopicPartition] = set()  # surplus being handed over: not read, given back once idle
        # Set by the runner: called as a number starts draining, so records waiting inside the stage let go.
        self.on_release: Callable[[list[Partition]], None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._last_beat = 0.0
        self._surplus = 0
        self._version = -1
        self._beat_lock = asyncio.Lock()
        self._wake = asyncio.Event()  # set when records may have been appended to our topics
        self._bell: Bell | None = None
        self._unrung_until = 0.0  # records came without a ring lately: look as often as without a bell until then

    @property
    def _idle_poll_s(self) -> float:
        rung = self._bell is not None and time.monotonic() >= self._unrung_until
        return BELL_POLL_S if rung else IDLE_POLL_S

    async def start(self) -> None:
        """Join the group: take this member's share of the partitions, from the committed offsets."""
        self._bell = Bell.open(self.bus.log.path, self.member, self._wake)  # before holding anything
        self.bus._members[self.member] = self._wake
        try:
            await self._beat()
        except BaseException:
            self._forget_bell()
            raise
        self.bus.log.register(self.group, self.member)
        self._heartbeat = asyncio.create_task(self._beat_forever(), name=f"heartbeat-{self.group}")

    async def stop(self) -> None:
        """Leave the group: hand the partitions back at once (best effort; a dead member's expire anyway)."""
        self.bus.log.unregister(self.group, self.member)
        self._forget_bell()
        if self._heartbeat is not None:
            await cancel_and_wait(self._heartbeat)
            self._heartbeat = None
            with contextlib.suppress(BusUnavailable):
                await self.bus.write(self.bus.log.heartbeat, self.group, self.member, self.topics, (), True)
        self._positions, self._epochs, self._in_flight, self._committed = {}, {}, {}, {}
        self._draining = set()

    def _forget_bell(self) -> None:
        self.bus._members.pop(self.member, None)
        if self._bell is not None:
            self._bell.close()
            self._bell = None

    async def _beat(self, release: Sequence[TopicPartition] = ()) -> None:
        # One at a time: each answer is applied before the next heartbeat is written, so our view of
        # what we hold follows the log's order (a periodic beat cannot undo a release).
        async with self._beat_lock:
            held, surplus = await self.bus.write(self.bus.log.heartbeat, self.group, self.member, self.topics,
                                                 release)
            self._last_beat = time.monotonic()
            for tp in list(self._positions):
                if held.get(tp, (None,))[0] != self._epochs.get(tp):
                    self._drop(tp)  # released, or taken over by another member
            for tp, (epoch, committed) in held.items():
                if tp not in self._positions:
                    self._positions[tp], self._epochs[tp], self._committed[tp] = committed, epoch, committed
                    self._wake.set()  # its backlog: writers may not ring us for it yet
            self._surplus = surplus
            if surplus <= 0:
                self._draining.clear()

    async def _give_back_surplus(self) -> None:
        """Hand partition numbers above our share to the other members, each whole and at a record boundary.

        A number with records in hand (handed out, not yet committed) in any of its topics is drained first:
        none of its partitions is read any more, and they are given back together once their last record is
        committed. Handing one over earlier would fence this member's commit of those records and cut its
        other lanes short (issue 16); handing over part of a number would split a lane between two processes
        (issue 15).
        """
        if self._surplus <= 0:
            return
        numbers: dict[int, list[TopicPartition]] = {}
        for tp in self._positions:
            numbers.setdefault(tp[1], []).append(tp)
        draining = {tp[1] for tp in self._draining}
        if len(draining) < self._surplus:
            others = sorted((n for n in numbers if n not in draining),
                            key=lambda n: (not all(self._idle(tp) for tp in numbers[n]), n))
            for n in others[:self._surplus - len(draining)]:
                self._draining |= set(numbers[n])
                draining.add(n)
                if self.on_release is not None:  # records waiting inside the stage let go: idle sooner
                    self.on_release([Partition(self.bus._logical(t), p) for t, p in numbers[n]])
        spare = sorted(n for n in draining if n in numbers and all(self._idle(tp) for tp in numbers[n]))
        if not spare:
            return
        released = [tp for n in spare for tp in numbers[n]]
        for tp in released:
            self._drop(tp)
        self._surplus = max(0, self._surplus - len(spare))
        await self._beat(released)

    def _idle(self, tp: TopicPartition) -> bool:
        """Nothing of the partition in hand: everything handed out is committed (or was rewound)."""
        position = self._positions.get(tp)
        return position is not None and self._committed.get(tp, -1) >= position

    def _drop(self, tp: TopicPartition) -> None:
        self._positions.pop(tp, None)
        self._epochs.pop(tp, None)
        self._paused.pop(tp, None)
        self._committed.pop(tp, None)
        self._draining.discard(tp)

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self._beat()
            except BusUnavailable as exc:
                if time.monotonic() - self._last_beat > LEASE_S:
                    # Others may consider us dead and take our partitions: start again from what is committed.
                    for tp in list(self._positions):
                        self._drop(tp)
                log.warning("embedded log heartbeat failed; no new records until it can write", group=self.group,
                            error=str(exc))

    def _writable(self) -> bool:
        # If the attempt cannot be recorded, it must not be made: hand out nothing while the log refuses writes.
        return self.bus.log.problem is None

    async def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        """Records past each held partition's position; waits up to `timeout_s` for new ones."""
        log_ = self.bus.log
        deadline = time.monotonic() + timeout_s
        self._in_flight = {}
        await self._give_back_surplus()
        looked = False  # the last wait ended on our own look at the log, not on a ring
        while True:
            now = time.monotonic()
            self._paused = {tp: due for tp, due in self._paused.items() if due > now}
            readable = {tp: pos for tp, pos in self._positions.items()
                        if tp not in self._paused and tp not in self._draining}
            epochs = dict(self._epochs)
            self._wake.clear()
            rows: list[tuple[str, int, int, bytes | None, bytes, str]] = []
            if readable and self._writable():
                self._version, rows = await log_.read(log_.records, readable, max_records)
            if rows and looked:
                self._unrung_until = time.monotonic() + UNRUNG_S
            if rows or now >= deadline:
                break
            looked = False
            wake = min([deadline, *self._paused.values()])
            while time.monotonic() < wake:
                if await wait_until_set(self._wake, min(self._idle_poll_s, max(0.0, wake - time.monotonic()))):
                    break
                if await log_.read(log_.data_version) != self._version:
                    looked = True
                    break
        records = []
        for topic, p, offset, key, value, headers in rows:
            tp = (topic, p)
            if self._epochs.get(tp) != epochs.get(tp):
                continue  # lost while reading: the new holder handles it
            self._positions[tp] = offset + 1
            self._in_flight[tp] = epochs[tp]
            envelope = _envelope(headers, value, self.bus.keyring)
            records.append(Record(self.bus._logical(topic), p, offset, key, envelope))
        return records

    async def complete(self, emits: Sequence[Emit], offsets: Mapping[Partition, int]) -> None:
        """Outputs and offsets in one SQLite transaction; `Fenced` if a partition was taken over meanwhile."""
        bus = self.bus
        group_offsets: dict[tuple[str, str, int], tuple[int, int]] = {}
        for p, o in offsets.items():
            tp = (bus.settings.topic(p.topic), p.partition)
            epoch = self._in_flight.get(tp, self._epochs.get(tp))
            if epoch is None:
                raise Fenced(f"{self.group} no longer owns {tp[0]}[{tp[1]}]")
            group_offsets[(self.group, *tp)] = (o, epoch)
        try:
            rows = [bus._row(e) for e in emits]
            await bus.write(bus.log.append, rows, self.member, group_offsets)
            for (_, topic, partition), (offset, _) in group_offsets.items():
                if (topic, partition) in self._positions:
                    self._committed[(topic, partition)] = offset
        finally:
            for _, topic, partition in group_offsets:  # a runner may complete a poll's partitions one by one
                self._in_flight.pop((topic, partition), None)
        if emits:
            bus.announce({row[0] for row in rows})

    async def pending(self, partitions: Sequence[Partition]) -> list[Record]:
        """The records of held `partitions` past the group's committed offsets; read only (nothing handed out)."""
        log_ = self.bus.log
        positions = {tp: self._committed[tp] for tp in ((self.bus.settings.topic(p.topic), p.partition)
                                                        for p in partitions) if tp in self._committed}
        records: list[Record] = []
        while positions:
            _, rows = await log_.read(log_.records, positions, PENDING_BATCH)
            if not rows:
                break
            for topic, p, offset, key, value, headers in rows:
                positions[(topic, p)] = offset + 1
                records.append(Record(self.bus._logical(topic), p, offset, key,
                                      _envelope(headers, value, self.bus.keyring)))
        return records

    def pause_until(self, partition: Partition, offset: int, due: float) -> None:
        """Rewind the partition to `offset` and skip it until `due`."""
        tp = (self.bus.settings.topic(partition.topic), partition.partition)
        if tp in self._positions:
            self._positions[tp] = offset
            self._paused[tp] = due

    def assignment(self) -> set[Partition]:
        """The partitions this member holds now."""
        return {Partition(self.bus._logical(t), p) for t, p in self._positions}


def _envelope(headers: str, value: bytes, keyring: Keyring | None = None) -> Envelope:
    try:
        return open_envelope(keyring, Envelope.from_headers(_decode_headers(headers), value))
    except EnvelopeError as exc:
        return Envelope(type="fr.relais.invalid", source="/relais/unknown", transfer_id="unknown", data=value,
                        extra={"envelopeerror": str(exc)})
