"""The embedded log's SQLite file: one writer thread that group-commits, one reader thread, the SQL.

Several processes on one machine share the file (SQLite WAL). Inside a process:

* **Writes are group-committed.** Every write (a publish, a stage's outputs + offsets, a lease
  heartbeat) is a job on one queue; the writer thread takes every job waiting, runs each in its own
  SAVEPOINT inside one `BEGIN IMMEDIATE` transaction, and COMMITs (one fsync) before answering any
  of them. A job refused on its own (a fenced member) rolls back alone; a storage error fails the
  whole batch and resets the connection, so the next batch starts clean (no "transaction within a
  transaction" after a disk was full or read-only).
* **Reads** run on their own thread and connection, so a poll never waits behind an fsync.
* **Checkpoints** (copying the WAL back into the database file) run on a thread of their own, never
  inside a commit. SQLite's default runs one inside the COMMIT that crosses 1,000 WAL pages — about
  every 25 Bundles here — while the cross-process write lock is held: that put a 20–40 ms (up to 300 ms)
  checkpoint in front of a DUI's 202 at p99 (issue 16). A PASSIVE checkpoint beside the writers waits
  for none of them.

Across processes, consumer-group membership is a lease per (group, topic, partition): see
`services.core.embedded_groups`. A member's commit checks in the same transaction that it still
holds each partition under the epoch it read it with, so a stale holder cannot commit (`Fenced`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import fcntl
import os
import queue
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from services.core import embedded_groups as groups
from services.core.embedded_groups import RENEW_S, TopicPartition
from services.core.errors import BusUnavailable

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
CREATE TABLE IF NOT EXISTS members (
    grp TEXT NOT NULL, member TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (grp, member)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (
    grp TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL, holder TEXT, epoch INTEGER NOT NULL,
    PRIMARY KEY (grp, topic, partition)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS probes (process TEXT PRIMARY KEY, at REAL NOT NULL);
"""

MAX_JOBS_PER_COMMIT = 500
CHECKPOINT_EVERY_S = 0.25  # while this process writes: the WAL grows by a few MB between checkpoints
RESTART_PAGES = 4096  # 16 MB of WAL (4 KB pages): copy the rest under the write lock, so the WAL starts again
MAX_POLL_BYTES = 2 * 1024 * 1024  # per poll: a stage's commit then writes a few MB at most

Row = tuple[str, bytes | None, bytes, str]  # physical topic, key, sealed value, encoded headers


def partition_for(key: bytes | None, partitions: int, counter: int) -> int:
    """Same key, same partition (so order per key holds); keyless records spread round-robin."""
    if key is None:
        return counter % partitions
    return zlib.crc32(key) % partitions


def storage_reason(exc: BaseException) -> str:
    """A short, stable word for why the log cannot be written (the metric's label)."""
    text = str(exc).lower()
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "full" in text:
        return "disk-full"
    if "readonly" in text or "read-only" in text or (isinstance(exc, OSError) and exc.errno in (errno.EROFS,
                                                                                              errno.EACCES,
                                                                                              errno.EPERM)):
        return "read-only"
    if "locked" in text or "busy" in text:
        return "locked"
    if "unable to open" in text:
        return "cannot-open"
    return "io-error"


class WriteLock:
    """The cross-process writers' queue: the kernel's locks, not SQLite's busy handler (which polls with
    sleeps of up to 100 ms).

    Two lock files beside the log: `.write-lock`, held for the whole transaction, and `.urgent-lock`,
    which a publisher (a DUI waiting for its 202) holds while it waits for the first; stage commits (and
    the checkpointer) pass through the urgent lock before queueing, so a 202 waits behind one of them at
    most. Each thread that writes has its own (flock is per open file).
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._write_fd: int | None = None
        self._urgent_fd: int | None = None

    def acquire(self, urgent: bool) -> None:
        if self._write_fd is None or self._urgent_fd is None:
            stem = self._path.name
            self._urgent_fd = os.open(self._path.with_name(stem + ".urgent-lock"), os.O_RDWR | os.O_CREAT, 0o600)
            self._write_fd = os.open(self._path.with_name(stem + ".write-lock"), os.O_RDWR | os.O_CREAT, 0o600)
        if urgent:
            fcntl.flock(self._urgent_fd, fcntl.LOCK_EX)
            try:
                fcntl.flock(self._write_fd, fcntl.LOCK_EX)
            finally:
                fcntl.flock(self._urgent_fd, fcntl.LOCK_UN)
        else:
            fcntl.flock(self._urgent_fd, fcntl.LOCK_SH)  # waits while a publisher is queued
            fcntl.flock(self._urgent_fd, fcntl.LOCK_UN)
            fcntl.flock(self._write_fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._write_fd is not None:
            fcntl.flock(self._write_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        for fd in (self._write_fd, self._urgent_fd):
            if fd is not None:
                os.close(fd)
        self._write_fd = self._urgent_fd = None


class EmbeddedLog:
    """The SQLite file; `write` jobs are group-committed, `read` calls run beside them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], concurrent.futures.Future[Any]]
                                      | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._writer_conn: sqlite3.Connection | None = None
        self._reader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="relais-log-read")
        self._reader_conn: sqlite3.Connection | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        self._members: set[tuple[str, str]] = set()  # (group, member) of this process, renewed by its own thread
        self._renewer: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._written = threading.Event()  # set by each commit: the checkpointer has something to copy back
        self._stopping = threading.Event()
        self.checkpoints = 0  # PASSIVE checkpoints run by this process
        self._lock = WriteLock(path)  # the writer thread's
        self._round_robin = 0
        self._read_turn = 0
        self._topics: dict[str, int] | None = None
        self.problem: str | None = None  # why the last write failed; None once a write succeeds
        self.problem_reason: str | None = None
        self.last_write_ok = 0.0  # monotonic time of the last successful commit
        self.commits = 0  # transactions committed (each one fsync); jobs / commits = the group size
        self.jobs = 0

    # --- threads -------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=30, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # a 202 means on disk, as acks=all means replicated
            conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer thread does it, outside the commits
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    async def write(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(conn, *args)` inside the next group commit; returns once it is on disk."""
        if self._closed:
            raise BusUnavailable(f"embedded log {self.path} is closed (this process is stopping)")
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._ensure_writer()
        self._jobs.put((fn, args, future))
        return await asyncio.wrap_future(future)

    async def read(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(conn, *args)` on the reader thread (a consistent snapshot per statement)."""
        if self._closed:
            raise BusUnavailable(f"embedded log {self.path} is closed (this process is stopping)")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._reader, self._read, fn, args)
        except sqlite3.Error as exc:
            raise BusUnavailable(f"embedded log {self.path}: {exc}") from exc

    def _read(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        if self._reader_conn is None:
            self._reader_conn = self._connect()
        try:
            return fn(self._reader_conn, *args)
        except sqlite3.Error:
            self._reader_conn.close()
            self._reader_conn = None
            raise

    def register(self, group: str, member: str) -> None:
        """Keep this member alive from a thread of its own: a CPU-bound batch on the event loop is not death."""
        with self._start_lock:
            self._members.add((group, member))
            if self._renewer is None:
                self._renewer = threading.Thread(target=self._renew_loop, name="relais-log-renew", daemon=True)
                self._renewer.start()

    def unregister(self, group: str, member: str) -> None:
        """Stop renewing a member (it left the group)."""
        with self._start_lock:
            self._members.discard((group, member))

    def _renew_loop(self) -> None:
        while not self._closed:
            time.sleep(RENEW_S)
            with self._start_lock:
                members = list(self._members)
            if members and not self._closed:
                self._ensure_writer()
                self._jobs.put((groups.renew, (members,), concurrent.futures.Future()))

    def _ensure_writer(self) -> None:
        with self._start_lock:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="relais-log-write", daemon=True)
                self._writer.start()
                self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="relais-log-checkpoint",
                                                      daemon=True)
                self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        """Copy the WAL back into the database at most every CHECKPOINT_EVERY_S while this process writes.

        Every writing process runs one; SQLite lets one checkpoint run at a time (the others return busy at
        once). A PASSIVE checkpoint beside the writers copies all but what they wrote meanwhile, so under a
        steady stream the WAL would never start again from its beginning (SQLite restarts it only when a
        write begins with nothing left to copy). Once it holds RESTART_PAGES, the checkpointer queues
        for the write lock like a stage commit and copies the few pages left while it holds it: the next
        write restarts the WAL. That costs the writers a short wait once per RESTART_PAGES.
        """
        conn: sqlite3.Connection | None = None
        lock = WriteLock(self.path)
        while not self._stopping.is_set():
            self._written.wait()
            if self._stopping.is_set():
                break
            self._written.clear()
            try:
                if conn is None:
                    conn = self._connect()
                _, pages, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                if pages >= RESTART_PAGES:
                    lock.acquire(urgent=False)
                    try:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    finally:
                        lock.release()
                self.checkpoints += 1
            except sqlite3.Error:  # the writers see the same fault and report it; try again after the next commit
                if conn is not None:
                    conn.close()
                    conn = None
            self._stopping.wait(CHECKPOINT_EVERY_S)
        if conn is not None:
            conn.close()
        lock.close()

    def _write_loop(self) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                break
            batch = [first] if first[2].set_running_or_notify_cancel() else []  # a cancelled caller: skip
            while len(batch) < MAX_JOBS_PER_COMMIT:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._jobs.put(None)  # finish this batch, then stop
                    break
                if job[2].set_running_or_notify_cancel():
                    batch.append(job)
            if batch:
                self._commit(batch)
        if self._writer_conn is not None:
            self._writer_conn.close()
            self._writer_conn = None
        self._lock.close()

    def _commit(self, batch: list[tuple[Callable[..., Any], tuple[Any, ...], concurrent.futures.Future[Any]]]) -> None:
        answers: list[tuple[concurrent.futures.Future[Any], Any, BaseException | None]] = []
        conn = self._writer_conn
        try:
            if conn is None:
                conn = self._writer_conn = self._connect()
                conn.executescript(SCHEMA)
            self._lock.acquire(urgent=any(fn == self.append and len(args) == 1 for fn, args, _ in batch))
            conn.execute("BEGIN IMMEDIATE")
            for fn, args, future in batch:
                conn.execute("SAVEPOINT job")
                try:
                    result = fn(conn, *args)
                except sqlite3.Error:
                    raise  # the storage itself: the whole batch fails below
                except Exception as exc:  # noqa: BLE001 - this job's own refusal (fenced, unknown topic)
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    answers.append((future, None, exc))
                else:
                    conn.execute("RELEASE job")
                    answers.append((future, result, None))
            conn.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            self._lock.release()
            self._reset()
            self.problem, self.problem_reason = f"embedded log {self.path}: {exc}", storage_reason(exc)
            failure = BusUnavailable(f"{self.problem} (nothing was written; retried when the fault clears)")
            for _, _, future in batch:
                future.set_exception(failure)
            return
        self._lock.release()
        self.problem = self.problem_reason = None
        self.last_write_ok = time.monotonic()
        self.commits += 1
        self.jobs += len(batch)
        self._written.set()
        for future, result, error in answers:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

    def _reset(self) -> None:
        """After a failed statement or COMMIT: roll back what is open, or drop the connection altogether."""
        conn = self._writer_conn
        if conn is None:
            return
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        if conn.in_transaction:
            conn.close()
            self._writer_conn = None
        self._topics = None

    def close(self) -> None:
        """Finish queued writes, close both connections and stop the threads; safe twice."""
        if self._writer is not None:
            self._jobs.put(None)
            self._writer.join()
            self._writer = None

        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        if self._checkpointer is not None:
            self._written.set()  # wake it to see `_stopping`
            self._checkpointer.join()
            self._checkpointer = None

        def shut() -> None:
            if self._reader_conn is not None:
                self._reader_conn.close()
                self._reader_conn = None
        self._reader.submit(shut).result()
        self._reader.shutdown(wait=True)

    # --- writes (on the writer thread, inside a group commit) -----------------------------------
    def ensure_topics(self, conn: sqlite3.Connection, specs: Sequence[tuple[str, int]]) -> None:
        for name, partitions in specs:
            conn.execute("INSERT OR IGNORE INTO topics(name, partitions) VALUES (?, ?)", (name, partitions))
        self._topics = None  # re-read: a kept file may declare other partition counts

    def _topic_partitions(self, conn: sqlite3.Connection) -> dict[str, int]:
        if self._topics is None:
            self._topics = dict(conn.execute("SELECT name, partitions FROM topics"))
        return self._topics

    def append(self, conn: sqlite3.Connection, rows: Sequence[Row], member: str | None = None,
               offsets: Mapping[tuple[str, str, int], tuple[int, int]] | None = None) -> None:
        """Append records and commit group offsets (`(group, topic, p) -> (next offset, lease epoch)`).

        With offsets, `member` must still hold each partition under that epoch, or nothing is written.
        """
        for (group, topic, p), (_, epoch) in (offsets or {}).items():
            groups.check_fence(conn, group, topic, p, member, epoch)
        partitions = self._topic_partitions(conn)
        now = time.time()
        heads: dict[TopicPartition, int] = {}  # next offset of each partition written to by this job
        for topic, key, value, headers in rows:
            if topic not in partitions:
                raise BusUnavailable(f"unknown topic {topic} in the embedded log {self.path}")
            self._round_robin += 1
            p = partition_for(key, partitions[topic], self._round_robin)
            if (topic, p) not in heads:
                head = conn.execute("SELECT next_offset FROM heads WHERE topic=? AND partition=?",
                                    (topic, p)).fetchone()
                heads[(topic, p)] = head[0] if head else 0
            offset = heads[(topic, p)]
            conn.execute("INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (topic, p, offset, key, value, headers, now))
            heads[(topic, p)] = offset + 1
        conn.executemany("INSERT INTO heads VALUES (?, ?, ?) ON CONFLICT(topic, partition) "
                         "DO UPDATE SET next_offset=excluded.next_offset", [(t, p, o) for (t, p), o in heads.items()])
        for (group, topic, p), (next_offset, _) in (offsets or {}).items():
            conn.execute("INSERT INTO group_offsets VALUES (?, ?, ?, ?) ON CONFLICT(grp, topic, partition) "
                         "DO UPDATE SET next_offset=excluded.next_offset", (group, topic, p, next_offset))

    def heartbeat(self, conn: sqlite3.Connection, group: str, member: str, topics: Sequence[str],
                  release: Sequence[TopicPartition] = (), leaving: bool = False,
                  ) -> tuple[dict[TopicPartition, tuple[int, int]], int]:
        """See `embedded_groups.heartbeat`."""
        return groups.heartbeat(conn, self._topic_partitions(conn), group, member, topics, release, leaving)

    def probe(self, conn: sqlite3.Connection, process: str) -> None:
        """A tiny real write: proves the file (and its disk) take writes now."""
        conn.execute("INSERT INTO probes VALUES (?, ?) ON CONFLICT(process) DO UPDATE SET at=excluded.at",
                     (process, time.time()))

    def prune(self, conn: sqlite3.Connection, retention_s: Mapping[str, float], stage_groups: Sequence[str],
              limit: int = 5000) -> int:
        """Delete records older than their topic's retention that every group reading them has committed.

        The groups that hold records back are the stages' (`stage_groups`, even while their processes
        are down) and any other group while it has a member (a ledger rebuild, a reader); a topic no
        such group reads (the dead-letter topics) is pruned by age alone, as Kafka would.
        """
        now, deleted = time.time(), 0
        present = {g for (g,) in conn.execute("SELECT DISTINCT grp FROM members")} | set(stage_groups)
        for topic, partitions in self._topic_partitions(conn).items():
            if topic not in retention_s:
                continue
            for p in range(partitions):
                groups = {g for (g,) in conn.execute(
                    "SELECT grp FROM leases WHERE topic=? AND partition=? UNION "
                    "SELECT grp FROM group_offsets WHERE topic=? AND partition=?", (topic, p, topic, p))} & present
                committed = dict(conn.execute(
                    "SELECT grp, next_offset FROM group_offsets WHERE topic=? AND partition=?", (topic, p)).fetchall())
                head = conn.execute("SELECT next_offset FROM heads WHERE topic=? AND partition=?",
                                    (topic, p)).fetchone()
                floor = min((committed.get(g, 0) for g in groups), default=head[0] if head else 0)
                cursor = conn.execute(
                    "DELETE FROM records WHERE topic=? AND partition=? AND offset IN (SELECT offset FROM records "
                    "WHERE topic=? AND partition=? AND offset<? AND appended<? ORDER BY offset LIMIT ?)",
                    (topic, p, topic, p, floor, now - retention_s[topic], limit - deleted))
                deleted += cursor.rowcount
                if deleted >= limit:
                    return deleted
        return deleted

    # --- reads (on the reader thread) ---------------------------------------------------------
    def partitions(self, conn: sqlite3.Connection, topics: Sequence[str]) -> list[TopicPartition]:
        placeholders = ",".join("?" * len(topics))  # only "?" marks: the names are bound parameters
        rows = conn.execute(f"SELECT name, partitions FROM topics WHERE name IN ({placeholders})",  # noqa: S608
                            list(topics)).fetchall()
        return [(name, p) for name, n in rows for p in range(n)]

    def committed(self, conn: sqlite3.Connection, group: str) -> dict[TopicPartition, int]:
        rows = conn.execute("SELECT topic, partition, next_offset FROM group_offsets WHERE grp=?", (group,))
        return {(t, p): o for t, p, o in rows}

    def heads(self, conn: sqlite3.Connection) -> dict[TopicPartition, int]:
        return {(t, p): o for t, p, o in conn.execute("SELECT topic, partition, next_offset FROM heads")}

    def data_version(self, conn: sqlite3.Connection) -> int:
        """Changes whenever any connection, in any process, commits: the cross-process wake-up."""
        return int(conn.execute("PRAGMA data_version").fetchone()[0])

    def records(self, conn: sqlite3.Connection, positions: Mapping[TopicPartition, int],
                max_records: int) -> tuple[int, list[tuple[str, int, int, bytes | None, bytes, str]]]:
        """Records past each position: at most `max_records` and about MAX_POLL_BYTES of values, so one
        stage's commit stays short (a 202 waits behind it); partitions take turns to go first."""
        version = self.data_version(conn)
        out: list[tuple[str, int, int, bytes | None, bytes, str]] = []
        size = 0
        # Only the partitions whose head is past the position: one small read instead of a query per partition
        # (every commit in any process wakes every idle member; most of its partitions have nothing new). A record
        # appended after this read changes `version`, so the member looks again.
        heads = self.heads(conn)
        turn = [(tp, position) for tp, position in positions.items() if heads.get(tp, 0) > position]
        if turn:
            self._read_turn = (self._read_turn + 1) % len(turn)
            turn = turn[self._read_turn:] + turn[:self._read_turn]
        for (topic, p), position in turn:
            if len(out) >= max_records or size >= MAX_POLL_BYTES:
                break
            for row in conn.execute(
                    "SELECT topic, partition, offset, key, value, headers FROM records "
                    "WHERE topic=? AND partition=? AND offset>=? ORDER BY offset LIMIT ?",
                    (topic, p, position, max_records - len(out))).fetchall():  # all: no statement left open
                out.append(row)
                size += len(row[4])
                if size >= MAX_POLL_BYTES:
                    break
        return version, out
