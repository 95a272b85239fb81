"""A SQLite file written by group commit: one writer thread, one reader thread, one checkpointer thread.

The embedded log and its inbox (`embedded_log`, `embedded_inbox`) are each one such file. Several
processes on one machine share a file (SQLite WAL). Inside a process:

* **Writes are group-committed.** Every write is a job on one queue; the writer thread takes every job
  waiting, runs each in its own SAVEPOINT inside one `BEGIN IMMEDIATE` transaction, and COMMITs (one
  fsync) before answering any of them. A job refused on its own (a fenced member) rolls back alone; a
  storage error fails the whole batch and resets the connection, so the next batch starts clean (no
  "transaction within a transaction" after a disk was full or read-only).
* **Writers of all processes queue on a kernel lock** (`WriteLock`), not on SQLite's busy handler,
  which polls with sleeps of up to 100 ms.
* **Reads** run on their own thread and connection, so a read never waits behind an fsync.
* **Checkpoints** (copying the WAL back into the database file) run on a thread of their own, never
  inside a commit. SQLite's default runs one inside the COMMIT that crosses 1,000 WAL pages — about
  every 25 Bundles in the log — while the write lock is held: that put a 20–40 ms (up to 300 ms)
  checkpoint in front of a DUI's 202 at p99 (issue 16).
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.core.errors import BusUnavailable

MAX_JOBS_PER_COMMIT = 500
CHECKPOINT_EVERY_S = 0.25  # while this process writes: the WAL grows by a few MB between checkpoints
RESTART_PAGES = 4096  # 16 MB of WAL (4 KB pages): copy the rest under the write lock, so the WAL starts again

Job = tuple[Callable[..., Any], tuple[Any, ...], concurrent.futures.Future[Any]]


def storage_reason(exc: BaseException) -> str:
    """A short, stable word for why the file cannot be written (the metric's label)."""
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
    """The cross-process writers' queue of one file: `flock` on `<file>.write-lock`, held for a whole
    transaction. Each thread that writes opens its own (flock is per open file)."""

    def __init__(self, path: Path) -> None:
        self._path = path.with_name(path.name + ".write-lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is None:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class GroupCommitFile:
    """One SQLite file: `write` jobs are group-committed, `read` calls run beside them.

    `schema` is applied by the writer's connection when it opens, then `lay_out(conn)` (what a script cannot say:
    moving an earlier release's tables), under the write lock; `what` names the file in errors.
    """

    def __init__(self, path: Path, schema: str, what: str,
                 lay_out: Callable[[sqlite3.Connection], None] | None = None) -> None:
        self.path = path
        self._schema = schema
        self._lay_out = lay_out
        self._what = what
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._writer_conn: sqlite3.Connection | None = None
        self._reader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"relais-{what}-read")
        self._reader_conn: sqlite3.Connection | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        self._lock = WriteLock(path)  # the writer thread's
        self._checkpointer: threading.Thread | None = None
        self._written = threading.Event()  # set by each commit: the checkpointer has something to copy back
        self._stopping = threading.Event()
        self.checkpoints = 0  # checkpoints run by this process
        self.problem: str | None = None  # why the last write failed; None once a write succeeds
        self.problem_reason: str | None = None
        self.last_write_ok = 0.0  # monotonic time of the last successful commit
        self.commits = 0  # transactions committed (each one fsync); jobs / commits = the group size
        self.jobs = 0

    # --- for callers (on the event loop) ------------------------------------------------------
    async def write(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(conn, *args)` inside the next group commit; returns once it is on disk."""
        if self._closed:
            raise BusUnavailable(f"{self._what} {self.path} is closed (this process is stopping)")
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._ensure_writer()
        self._jobs.put((fn, args, future))
        return await asyncio.wrap_future(future)

    async def read(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(conn, *args)` on the reader thread (a consistent snapshot per statement)."""
        if self._closed:
            raise BusUnavailable(f"{self._what} {self.path} is closed (this process is stopping)")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._reader, self._read, fn, args)
        except sqlite3.Error as exc:
            raise BusUnavailable(f"{self._what} {self.path}: {exc}") from exc

    def enqueue(self, fn: Callable[..., Any], *args: Any) -> None:
        """A write nobody waits for (from any thread): its outcome is only seen in `problem`."""
        if not self._closed:
            self._ensure_writer()
            self._jobs.put((fn, args, concurrent.futures.Future()))

    def close(self) -> None:
        """Finish queued writes, close the connections and stop the threads; safe twice."""
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

    @property
    def closed(self) -> bool:
        return self._closed

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

    def _read(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        if self._reader_conn is None:
            self._reader_conn = self._connect()
        try:
            return fn(self._reader_conn, *args)
        except sqlite3.Error:
            self._reader_conn.close()
            self._reader_conn = None
            raise

    def _ensure_writer(self) -> None:
        with self._start_lock:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name=f"relais-{self._what}-write",
                                                daemon=True)
                self._writer.start()
                self._checkpointer = threading.Thread(target=self._checkpoint_loop,
                                                      name=f"relais-{self._what}-checkpoint", daemon=True)
                self._checkpointer.start()

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

    def _commit(self, batch: list[Job]) -> None:
        answers: list[tuple[concurrent.futures.Future[Any], Any, BaseException | None]] = []
        conn = self._writer_conn
        try:
            if conn is None:
                conn = self._connect()  # creates the file's directory, where the lock's file goes
            self._lock.acquire()
            if conn is not self._writer_conn:
                self._lay_out_tables(conn)  # a new connection is kept once its tables are laid out
                self._writer_conn = conn
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
            self.problem, self.problem_reason = f"{self._what} {self.path}: {exc}", storage_reason(exc)
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

    def _lay_out_tables(self, conn: sqlite3.Connection) -> None:
        """`schema`, then `lay_out`, on a new writer connection (under the write lock); closes it if they fail."""
        try:
            conn.executescript(self._schema)
            if self._lay_out is not None:
                self._lay_out(conn)
        except BaseException:
            conn.close()
            raise

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
        self.after_reset()

    def after_reset(self) -> None:
        """What a subclass caches from the file is re-read after a failed write."""

    def _checkpoint_loop(self) -> None:
        """Copy the WAL back into the database at most every CHECKPOINT_EVERY_S while this process writes.

        Every writing process runs one; SQLite lets one checkpoint run at a time (the others return busy at
        once). A PASSIVE checkpoint beside the writers copies all but what they wrote meanwhile, so under a
        steady stream the WAL would never start again from its beginning (SQLite restarts it only when a
        write begins with nothing left to copy). Once it holds RESTART_PAGES, the checkpointer queues
        for the write lock like any writer and copies the few pages left while it holds it: the next
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
                    lock.acquire()
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
