"""The embedded bus: a durable single-node log on SQLite (WAL) with Kafka's semantics, for one process.

`relais run` uses it when no Kafka is configured, so the whole broker runs with nothing but Python.
It keeps the contract of `services.core.bus`: topics with partitions, keys and headers; consumer
groups with committed offsets; `publish` returns once the records are on disk (fsync'd); `complete`
writes a stage's outputs and its new offsets in one SQLite transaction. A `kill -9` at any point
therefore loses nothing and duplicates nothing inside the log.

Its limits, by design: one process owns the file (every stage of that process shares one bus), and
one member per consumer group. Past a few hundred transfers per second, or as soon as you need more
than one process per stage, use Kafka (see README, "Embedded or Kafka").
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import sqlite3
import time
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from services.core.bus import Partition
from services.core.crypto import Keyring, open_envelope, seal_envelope
from services.core.envelope import Emit, Envelope, EnvelopeError, Record
from services.core.errors import BusUnavailable, ConfigurationError
from services.core.settings import Settings
from services.core.topics import declared_topics

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, offset INTEGER NOT NULL,
    key BLOB, value BLOB, headers TEXT NOT NULL, appended REAL NOT NULL,
    PRIMARY KEY (topic, partition, offset)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS heads (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_offsets (
    grp TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,
    PRIMARY KEY (grp, topic, partition)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS topics (name TEXT PRIMARY KEY, partitions INTEGER NOT NULL);
"""


def partition_for(key: bytes | None, partitions: int, counter: int) -> int:
    """Same key, same partition (so order per key holds); keyless records spread round-robin."""
    if key is None:
        return counter % partitions
    return zlib.crc32(key) % partitions


def _encode_headers(headers: list[tuple[str, bytes]]) -> str:
    return orjson.dumps([[k, base64.b64encode(v).decode()] for k, v in headers]).decode()


def _decode_headers(text: str) -> list[tuple[str, bytes]]:
    return [(k, base64.b64decode(v)) for k, v in orjson.loads(text)]


class EmbeddedLog:
    """The SQLite file and the one thread that touches it (sqlite3 objects stay on their thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relais-embedded-log")
        self._conn: sqlite3.Connection | None = None
        self._lock: BinaryIO | None = None
        self._round_robin = 0
        # Topic → partitions; this process owns the file, so topics change only through ensure_topics.
        self._topics: dict[str, int] | None = None
        self.appended = asyncio.Event()  # wakes idle consumers of this process

    async def call(self, fn: Any, *args: Any) -> Any:
        """Run `fn(conn, *args)` on the log's thread."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._with_conn, fn, args)
        except sqlite3.Error as exc:
            raise BusUnavailable(f"embedded log {self.path}: {exc}") from exc

    def _with_conn(self, fn: Any, args: tuple[Any, ...]) -> Any:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_file()
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # a 202 means on disk, as acks=all means replicated
            conn.executescript(SCHEMA)
            self._conn = conn
        return fn(self._conn, *args)

    def _lock_file(self) -> None:
        # Two processes on one log would both own every partition and deliver everything twice.
        lock = open(self.path.with_name(self.path.name + ".lock"), "a+b")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise ConfigurationError(
                f"the embedded log {self.path} is already used by another Relais process; stop it, or give "
                "this one its own RELAIS_EMBEDDED_LOG_PATH (or use Kafka to run several processes)") from None
        self._lock = lock

    def close(self) -> None:
        """Close the file (on its own thread) and stop the thread."""
        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if self._lock is not None:
                self._lock.close()  # releases the flock
                self._lock = None
        self._executor.submit(shut).result()
        self._executor.shutdown(wait=True)

    # --- operations, run on the log's thread -------------------------------------------------
    def ensure_topics(self, conn: sqlite3.Connection, specs: list[tuple[str, int]]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        for name, partitions in specs:
            conn.execute("INSERT OR IGNORE INTO topics(name, partitions) VALUES (?, ?)", (name, partitions))
        conn.execute("COMMIT")
        self._topics = None  # re-read on the next append: a kept file may declare other partition counts

    def _topic_partitions(self, conn: sqlite3.Connection) -> dict[str, int]:
        if self._topics is None:
            self._topics = dict(conn.execute("SELECT name, partitions FROM topics"))
        return self._topics

    def append(self, conn: sqlite3.Connection, emits: Sequence[tuple[str, bytes | None, bytes, str]],
               offsets: Mapping[tuple[str, str, int], int] | None = None) -> None:
        """Append records and (optionally) commit group offsets, in one transaction."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            partitions = self._topic_partitions(conn)
            now = time.time()
            for topic, key, value, headers in emits:
                if topic not in partitions:
                    raise sqlite3.OperationalError(f"unknown topic {topic}")
                self._round_robin += 1
                p = partition_for(key, partitions[topic], self._round_robin)
                row = conn.execute("SELECT next_offset FROM heads WHERE topic=? AND partition=?", (topic, p)).fetchone()
                offset = row[0] if row else 0
                conn.execute("INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (topic, p, offset, key, value, headers, now))
                conn.execute("INSERT INTO heads VALUES (?, ?, ?) ON CONFLICT(topic, partition) "
                             "DO UPDATE SET next_offset=excluded.next_offset", (topic, p, offset + 1))
            for (group, topic, p), next_offset in (offsets or {}).items():
                conn.execute("INSERT INTO group_offsets VALUES (?, ?, ?, ?) ON CONFLICT(grp, topic, partition) "
                             "DO UPDATE SET next_offset=excluded.next_offset", (group, topic, p, next_offset))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def partitions(self, conn: sqlite3.Connection, topics: Sequence[str]) -> list[tuple[str, int]]:
        placeholders = ",".join("?" * len(topics))  # only "?" marks: the names are bound parameters
        rows = conn.execute(f"SELECT name, partitions FROM topics WHERE name IN ({placeholders})",  # noqa: S608
                            list(topics)).fetchall()
        return [(name, p) for name, n in rows for p in range(n)]

    def committed(self, conn: sqlite3.Connection, group: str) -> dict[tuple[str, int], int]:
        rows = conn.execute("SELECT topic, partition, next_offset FROM group_offsets WHERE grp=?", (group,))
        return {(t, p): o for t, p, o in rows}

    def heads(self, conn: sqlite3.Connection) -> dict[tuple[str, int], int]:
        return {(t, p): o for t, p, o in conn.execute("SELECT topic, partition, next_offset FROM heads")}

    def read(self, conn: sqlite3.Connection, positions: Mapping[tuple[str, int], int],
             max_records: int) -> list[tuple[str, int, int, bytes | None, bytes, str]]:
        out: list[tuple[str, int, int, bytes | None, bytes, str]] = []
        for (topic, p), position in positions.items():
            if len(out) >= max_records:
                break
            out += conn.execute(
                "SELECT topic, partition, offset, key, value, headers FROM records "
                "WHERE topic=? AND partition=? AND offset>=? ORDER BY offset LIMIT ?",
                (topic, p, position, max_records - len(out))).fetchall()
        return out


class EmbeddedBus:
    """Relais's bus on the embedded SQLite log."""

    def __init__(self, settings: Settings, path: Path | None = None) -> None:
        self.settings = settings
        self.log = EmbeddedLog(path or settings.embedded_log_path)
        self.keyring = Keyring.from_settings(settings)  # None: record values are written in clear
        self._started = False

    async def start(self) -> None:
        """Open the log and declare every topic."""
        if not self._started:
            specs = [(self.settings.topic(s.name), self.settings.topic_partitions)
                     for s in declared_topics(self.settings)]
            await self.log.call(self.log.ensure_topics, specs)
            self._started = True

    async def stop(self) -> None:
        """Close the log; safe twice."""
        if self._started:
            self._started = False
            await asyncio.to_thread(self.log.close)

    async def publish(self, emits: Sequence[Emit]) -> None:
        """Append and fsync before returning."""
        await self.log.call(self.log.append, [self._row(e) for e in emits])
        self.log.appended.set()

    def _row(self, emit: Emit) -> tuple[str, bytes | None, bytes, str]:
        value, headers = seal_envelope(self.keyring, emit.envelope)
        return (self.settings.topic(emit.topic), emit.key, value, _encode_headers(headers))

    def subscribe(self, stage: str, topics: Sequence[str]) -> EmbeddedSubscription:
        """The (only) member of the stage's group in this process."""
        return EmbeddedSubscription(self, self.settings.group(stage), topics)

    async def lag(self, stage: str, topics: Sequence[str]) -> dict[Partition, int]:
        """Head minus committed offset per partition."""
        group = self.settings.group(stage)
        physical = [self.settings.topic(t) for t in topics]
        parts = await self.log.call(self.log.partitions, physical)
        committed = await self.log.call(self.log.committed, group)
        heads = await self.log.call(self.log.heads)
        return {Partition(self._logical(t), p): heads.get((t, p), 0) - committed.get((t, p), 0) for t, p in parts}

    def _logical(self, physical: str) -> str:
        prefix = self.settings.topic_prefix
        return physical[len(prefix):] if prefix and physical.startswith(prefix) else physical


class EmbeddedSubscription:
    """A consumer-group member on the embedded log: positions in memory, offsets committed on disk."""

    def __init__(self, bus: EmbeddedBus, group: str, topics: Sequence[str]) -> None:
        self.bus = bus
        self.group = group
        self.topics = [bus.settings.topic(t) for t in topics]
        self._positions: dict[tuple[str, int], int] = {}
        self._paused: dict[tuple[str, int], float] = {}

    async def start(self) -> None:
        """Resume from the group's committed offsets (0 for a new group)."""
        log = self.bus.log
        committed = await log.call(log.committed, self.group)
        self._positions = {tp: committed.get(tp, 0) for tp in await log.call(log.partitions, self.topics)}

    async def stop(self) -> None:
        """Nothing to release: positions die with the member, offsets are on disk."""
        self._positions = {}

    async def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        """Records past each partition's position; waits up to `timeout_s` for new ones."""
        deadline = time.monotonic() + timeout_s
        while True:
            now = time.monotonic()
            self._paused = {tp: due for tp, due in self._paused.items() if due > now}
            readable = {tp: pos for tp, pos in self._positions.items() if tp not in self._paused}
            self.bus.log.appended.clear()
            rows = await self.bus.log.call(self.bus.log.read, readable, max_records) if readable else []
            if rows or now >= deadline:
                break
            wake = min([deadline, *self._paused.values()])
            try:
                await asyncio.wait_for(self.bus.log.appended.wait(), timeout=max(0.0, min(wake - now, 0.25)))
            except TimeoutError:
                pass
        records = []
        for topic, p, offset, key, value, headers in rows:
            self._positions[(topic, p)] = offset + 1
            envelope = _envelope(headers, value, self.bus.keyring)
            records.append(Record(self.bus._logical(topic), p, offset, key, envelope))
        return records

    async def complete(self, emits: Sequence[Emit], offsets: Mapping[Partition, int]) -> None:
        """Outputs and offsets in one SQLite transaction."""
        log = self.bus.log
        group_offsets = {(self.group, self.bus.settings.topic(p.topic), p.partition): o for p, o in offsets.items()}
        await log.call(log.append, [self.bus._row(e) for e in emits], group_offsets)
        if emits:
            log.appended.set()

    def pause_until(self, partition: Partition, offset: int, due: float) -> None:
        """Rewind the partition to `offset` and skip it until `due`."""
        tp = (self.bus.settings.topic(partition.topic), partition.partition)
        if tp in self._positions:
            self._positions[tp] = offset
            self._paused[tp] = due

    def assignment(self) -> set[Partition]:
        """Every partition of the subscribed topics: the only member owns them all."""
        return {Partition(self.bus._logical(t), p) for t, p in self._positions}


def _envelope(headers: str, value: bytes, keyring: Keyring | None = None) -> Envelope:
    try:
        return open_envelope(keyring, Envelope.from_headers(_decode_headers(headers), value))
    except EnvelopeError as exc:
        return Envelope(type="fr.relais.invalid", source="/relais/unknown", transfer_id="unknown", data=value,
                        extra={"envelopeerror": str(exc)})
