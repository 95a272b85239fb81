"""The embedded log's records table as releases before 2026-12 laid it out: a WITHOUT ROWID table clustered by
position (today's is a rowid table; `services.core.embedded_log.lay_out_records` moves an older log's records)."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

EARLIER_RECORDS = """CREATE TABLE records (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, offset INTEGER NOT NULL,
    key BLOB, value BLOB, headers TEXT NOT NULL, appended REAL NOT NULL,
    PRIMARY KEY (topic, partition, offset)
) WITHOUT ROWID"""


def lay_out_as_before_2026_12(path: Path) -> None:
    """Rewrite a stopped log's records table, records kept, as releases before 2026-12 laid it out."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("ALTER TABLE records RENAME TO newer")
        db.execute(EARLIER_RECORDS)
        db.execute("INSERT INTO records SELECT * FROM newer")
        db.execute("DROP TABLE newer")
        db.commit()
