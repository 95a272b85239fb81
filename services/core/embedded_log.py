"""The embedded log's SQLite file: topics, partitions, group offsets and leases, and the SQL over them.

A `GroupCommitFile` (services.core.embedded_store): writes are group-committed by one writer thread,
reads run beside them, checkpoints on a thread of their own. Several processes on one machine share
the file (SQLite WAL). Publishers do not write here directly: their records go to the inbox
(services.core.embedded_inbox), a file only they write, and are moved here by `take_inbox`, so a DUI's
202 never waits behind a stage's commit (issue 16).

Across processes, consumer-group membership is a lease per (group, topic, partition): see
`services.core.embedded_groups`. A member's commit checks in the same transaction that it still
holds each partition under the epoch it read it with, so a stale holder cannot commit (`Fenced`).
"""

from __future__ import annotations

import sqlite3
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from services.core import embedded_groups as groups
from services.core.embedded_groups import RENEW_S, TopicPartition
from services.core.embedded_store import GroupCommitFile
from services.core.errors import BusUnavailable
from services.core.logging import get_logger

log = get_logger(__name__)

SCHEMA = """
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
CREATE TABLE IF NOT EXISTS inbox_moved (inbox TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
"""

# Records are in a rowid table, found by a unique index on their position. Rows are appended at the table's end,
# so a commit's records (whatever their partitions) are neighbours on disk, and a member reading them after
# another process's commit (its page cache is then cold) touches a few pages. Logs written before 2026-12 keep
# them in a WITHOUT ROWID table clustered by position: there a 10 kB record lies ~1 kB in its partition's leaf
# and the rest in overflow pages: a member's read of 6 fresh ones from 6 partitions took 2.4x as long (482 vs
# 197 us), their commit 0.76 vs 0.60 ms (tests/bench/logread.py). `lay_out_records` moves such a log's records
# once. Column order is unchanged: a process of an earlier release writing beside this one (`INSERT INTO records
# VALUES (7 values)`) still can.
RECORDS_TABLE = """CREATE TABLE IF NOT EXISTS records (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, offset INTEGER NOT NULL,
    key BLOB, value BLOB, headers TEXT NOT NULL, appended REAL NOT NULL
)"""
RECORDS_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS records_position ON records (topic, partition, offset)"

MAX_POLL_BYTES = 2 * 1024 * 1024  # per poll: a stage's commit then writes a few MB at most

Row = tuple[str, bytes | None, bytes, str]  # physical topic, key, sealed value, encoded headers


def lay_out_records(conn: sqlite3.Connection, move: bool = True) -> None:
    """Create the records table; in a log written before 2026-12, move its records to today's layout first.

    Once per log, in one transaction under the file's write lock (the writers of every process wait meanwhile;
    a crash leaves the earlier layout whole). When it fails (the disk lacks room for the copy, say), or `move` is
    False, the log goes on in its earlier layout, which works as before; the next process to start tries again.
    """
    if not _clustered(conn):
        conn.execute(RECORDS_TABLE)
        conn.execute(RECORDS_INDEX)
        return
    if not move:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        if _clustered(conn):  # not moved meanwhile by another process
            (count,) = conn.execute("SELECT count(*) FROM records").fetchone()
            log.warning("moving the embedded log's records to the faster layout (once; writers wait meanwhile)",
                        path=str(conn.execute("PRAGMA database_list").fetchone()[2]), records=count)
            started = time.monotonic()
            conn.execute("ALTER TABLE records RENAME TO records_by_position")  # the earlier layout
            conn.execute(RECORDS_TABLE)
            conn.execute("INSERT INTO records SELECT * FROM records_by_position ORDER BY appended")
            conn.execute("DROP TABLE records_by_position")
            conn.execute(RECORDS_INDEX)
            log.warning("embedded log records moved", records=count, seconds=round(time.monotonic() - started, 1))
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        log.warning("embedded log records not moved to the faster layout; the log goes on as it was and the next "
                    "process to start tries again (free disk space if it was full)", error=str(exc))


def _clustered(conn: sqlite3.Connection) -> bool:
    """Whether the records are in the layout of logs written before 2026-12 (a WITHOUT ROWID table)."""
    row = conn.execute("SELECT sql FROM sqlite_master WHERE type='table' AND name='records'").fetchone()
    return row is not None and "WITHOUT ROWID" in row[0].upper()


def partition_for(key: bytes | None, partitions: int, counter: int) -> int:
    """Same key, same partition (so order per key holds); keyless records spread round-robin."""
    if key is None:
        return counter % partitions
    return zlib.crc32(key) % partitions


class EmbeddedLog(GroupCommitFile):
    """The log file; `write` jobs are group-committed, `read` calls run beside them."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, SCHEMA, "embedded log", lay_out=self._lay_out_records)
        self._members: set[tuple[str, str]] = set()  # (group, member) of this process, renewed by its own thread
        self._renewer: threading.Thread | None = None
        self._round_robin = 0
        self._read_turn = 0
        self._topics: dict[str, int] | None = None
        self._moved_once = False  # an earlier layout's records: moved (or tried) by this process's first writer

    def _lay_out_records(self, conn: sqlite3.Connection) -> None:
        # Tried once per process: a writer connection is opened again after each storage fault, and a move that
        # failed for want of disk space would otherwise copy the whole log again at each, holding the write lock.
        lay_out_records(conn, move=not self._moved_once)
        self._moved_once = True

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
        while not self.closed:
            time.sleep(RENEW_S)
            with self._start_lock:
                members = list(self._members)
            if members:
                self.enqueue(groups.renew, members)

    def after_reset(self) -> None:
        self._topics = None

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

    def take_inbox(self, conn: sqlite3.Connection, inbox: str, rows: Sequence[tuple[int, Row]]) -> int:
        """Append an inbox's rows past the position this log has moved it to; returns the new position.

        `rows` are consecutive from some position at or before this log's (any process may move, from a
        snapshot of its own); the position moves in the same transaction as the records, so each inbox
        row is appended exactly once.
        """
        position = self.inbox_position(conn, inbox)
        fresh = [row for seq, row in rows if seq > position]
        if not fresh:
            return position
        self.append(conn, fresh)
        position = rows[-1][0]
        conn.execute("INSERT INTO inbox_moved VALUES (?, ?) ON CONFLICT(inbox) DO UPDATE SET seq=excluded.seq",
                     (inbox, position))
        return position

    def inbox_position(self, conn: sqlite3.Connection, inbox: str) -> int:
        """The last row of `inbox` moved into the log (0: none)."""
        row = conn.execute("SELECT seq FROM inbox_moved WHERE inbox=?", (inbox,)).fetchone()
        return int(row[0]) if row else 0

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

    def holders(self, conn: sqlite3.Connection) -> dict[str, set[str]]:
        """Physical topic -> the members holding any of its partitions (whom a writer rings: embedded_doorbell)."""
        out: dict[str, set[str]] = {}
        for topic, holder in conn.execute("SELECT DISTINCT topic, holder FROM leases WHERE holder IS NOT NULL"):
            out.setdefault(topic, set()).add(holder)
        return out

    def data_version(self, conn: sqlite3.Connection) -> int:
        """Changes whenever any connection, in any process, commits: what an idle member's own look compares."""
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
