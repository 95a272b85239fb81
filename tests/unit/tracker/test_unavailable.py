"""A ledger database that cannot be used is a transient fault (the record waits), on a real SQLite file gone bad."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from services.core.envelope import Envelope, Record
from services.core.errors import TransientError
from services.core.topics import EVENTS
from services.tracker import audit
from services.tracker.auditchain import AuditingTracker
from services.tracker.auditkey import AuditKey
from services.tracker.ledger import Ledger, LedgerEvent
from services.tracker.stage import TrackerStage
from tests.support.processes import free_port

KEY = AuditKey(b"k" * 32, "test")


def accepted(event_id: str) -> LedgerEvent:
    return LedgerEvent(id=event_id, transfer_id="t-1", kind="accepted", stage="ingress", time=datetime.now(UTC),
                       producer="dui-a", detail={"targets": ["a"], "size": 10})


def record() -> Record:
    data = orjson.dumps({"kind": "accepted", "stage": "ingress", "targets": ["a"]})
    env = Envelope(type="fr.relais.event.accepted", source="/test", transfer_id="t-2", data=data)
    return Record(EVENTS, 0, 0, b"t-2", env)


def _a_directory(path: Path) -> None:
    path.mkdir()  # SQLite: "unable to open database file"


def _not_a_database(path: Path) -> None:
    path.write_bytes(b"this is not an SQLite database " * 512)  # SQLite: "file is not a database"


@pytest.fixture(params=[_a_directory, _not_a_database, None], ids=["directory", "garbage", "postgres-down"])
async def broken(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Ledger]:
    """A ledger that worked (schema, audit trail, one event), then its file was replaced; or a PostgreSQL
    ledger whose server is not there (nothing listens on its port)."""
    if request.param is None:
        down = Ledger(f"postgresql+asyncpg://relais@127.0.0.1:{free_port()}/relais")
        audit.bind(down, KEY)
        yield down
        await down.close()
        return
    url = f"sqlite+aiosqlite:///{tmp_path}/ledger.db"
    first = Ledger(url)
    audit.bind(first, KEY)
    await first.create_schema()
    await audit.record_operator(first, "alice", "setup")  # the genesis row and one more
    await first.apply(accepted("ev-0"))
    await first.close()
    for name in ("ledger.db", "ledger.db-wal", "ledger.db-shm"):
        path = tmp_path / name
        if path.exists():
            path.unlink()
    request.param(tmp_path / "ledger.db")
    ledger = Ledger(url)
    audit.bind(ledger, KEY)
    try:
        yield ledger
    finally:
        await ledger.close()
        shutil.rmtree(tmp_path / "ledger.db", ignore_errors=True)


CALLS: dict[str, Callable[[Ledger], Awaitable[Any]]] = {
    "apply_many": lambda ledger: ledger.apply_many([accepted("ev-1"), accepted("ev-2")]),
    "apply": lambda ledger: ledger.apply(accepted("ev-1")),
    "get": lambda ledger: ledger.get("t-1"),
    "warnings": lambda ledger: ledger.warnings("t-1"),
    "count_by_status": lambda ledger: ledger.count_by_status(),
    "record_events": lambda ledger: audit.record_events(ledger, [accepted("ev-1")]),
    "record_event": lambda ledger: audit.record_event(ledger, accepted("ev-1")),
    "record_operator": lambda ledger: audit.record_operator(ledger, "alice", "pause", target="a"),
    "tracker.handle": lambda ledger: TrackerStage(ledger).handle(record()),
    "auditing tracker.handle": lambda ledger: AuditingTracker(TrackerStage(ledger), ledger).handle(record()),
}


@pytest.mark.parametrize("call", list(CALLS), ids=list(CALLS))
async def test_an_unusable_database_is_a_transient_error_that_says_so(broken: Ledger, call: str) -> None:
    with pytest.raises(TransientError, match="database unavailable") as caught:
        await CALLS[call](broken)
    assert "retried" in str(caught.value)  # says what happens next


async def test_a_poll_the_database_refuses_is_left_to_the_records_own_fates(broken: Ledger) -> None:
    stage = AuditingTracker(TrackerStage(broken), broken)
    await stage.prepare([record()])  # no raise: `handle` meets the fault record by record
    with pytest.raises(TransientError):
        await stage.handle(record())
