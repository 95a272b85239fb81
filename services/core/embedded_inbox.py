"""The embedded log's inbox: where a publisher's records are made durable before its 202, moved into the log after.

A DUI's 202 waits for its records to be on disk. In the log itself that meant waiting for the log's
write lock behind a worker's commit — and a worker at nice +5 on a busy machine can hold it for tens of
milliseconds while its thread waits for a core (issue 16: a 202 p99 of 200–470 ms). The inbox is a
file of its own (`<log>.inbox.db`, SQLite WAL, fsync'd commits) that only publishers write: ingress,
and operators' commands (a DLQ replay). A publish returns once its rows are committed here.

The rows are then moved into the log by `EmbeddedLog.take_inbox`: one log transaction appends the rows
past the inbox's position and records the new position, so each row is appended exactly once even
when two processes move at once or one dies halfway. The publishing process moves its rows at once (in
the background), and deletes what the log has taken; every other process sweeps rows older than a few
seconds (a publisher killed before it moved them). The order of the rows is the order of their
commits, so a key's records keep their order into the log.

Each inbox file has a random id (kept in its `meta` table): an inbox replaced by a new file starts from
position 0 in the log rather than being mistaken for rows already moved.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from services.core.embedded_log import Row
from services.core.embedded_store import GroupCommitFile

SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL, key BLOB, value BLOB NOT NULL, headers TEXT NOT NULL, put REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('id', lower(hex(randomblob(16))));
"""

def inbox_path(log_path: Path) -> Path:
    """`relais.db` -> `relais.inbox.db`, beside the log (same disk, same backups)."""
    return log_path.with_name(f"{log_path.stem}.inbox{log_path.suffix or '.db'}")


class Inbox(GroupCommitFile):
    """The inbox file: `put` rows (group-committed), read them `after` a position, `forget` moved ones."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, SCHEMA, "embedded log inbox")

    # --- writes (on the writer thread, inside a group commit) -----------------------------------
    def put(self, conn: sqlite3.Connection, rows: Sequence[Row]) -> None:
        now = time.time()
        conn.executemany("INSERT INTO inbox(topic, key, value, headers, put) VALUES (?, ?, ?, ?, ?)",
                         [(*row, now) for row in rows])

    def forget(self, conn: sqlite3.Connection, inbox: str, position: int) -> None:
        """Delete the rows the log has taken (up to `position` of this inbox file)."""
        if self.identity(conn) == inbox:
            conn.execute("DELETE FROM inbox WHERE seq<=?", (position,))

    def probe(self, conn: sqlite3.Connection) -> None:
        """A tiny real write: proves the file (and its disk) take writes now."""
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('probe', ?)", (repr(time.time()),))

    # --- reads (on the reader thread) ---------------------------------------------------------
    def identity(self, conn: sqlite3.Connection) -> str | None:
        """This inbox file's id; None before its first write created it."""
        try:
            row = conn.execute("SELECT value FROM meta WHERE name='id'").fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return None
            raise
        return str(row[0]) if row else None

    def after(self, conn: sqlite3.Connection, position: int, limit: int, max_bytes: int,
              put_before: float | None = None) -> tuple[str | None, list[tuple[int, Row]]]:
        """(inbox id, up to `limit` rows, about `max_bytes` of values, past `position`, in order); with
        `put_before` (epoch seconds), nothing unless the first row waiting was put before it."""
        conn.execute("BEGIN")  # one snapshot: the id and the rows of the same file
        try:
            inbox = self.identity(conn)
            if inbox is None:
                return None, []
            if put_before is not None:
                first = conn.execute("SELECT put FROM inbox WHERE seq>? ORDER BY seq LIMIT 1", (position,)).fetchone()
                if first is None or first[0] >= put_before:
                    return inbox, []
            out: list[tuple[int, Row]] = []
            size = 0
            for seq, topic, key, value, headers in conn.execute(
                    "SELECT seq, topic, key, value, headers FROM inbox WHERE seq>? ORDER BY seq LIMIT ?",
                    (position, limit)).fetchall():
                out.append((seq, (topic, key, value, headers)))
                size += len(value)
                if size >= max_bytes:
                    break
            return inbox, out
        finally:
            conn.execute("COMMIT")
