"""The audit trail's tampering tests and the sealed ledger columns, on PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from services.core.crypto import Keyring, new_key, parse_keys
from services.core.settings import Settings
from services.tracker import audit, sealed
from services.tracker.auditkey import new_audit_key
from services.tracker.ledger import Ledger, metadata
from tests.support.postgres import PostgresCluster, start_cluster
from tests.unit.ops.test_ledger_queries import ev
from tests.unit.security.test_audit_tamper import *  # noqa: F403 - the same tampering, on PostgreSQL
from tests.unit.security.test_audit_tamper import ROWS


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    yield from start_cluster()


@pytest.fixture
async def ledger(postgres: PostgresCluster) -> AsyncIterator[Ledger]:  # overrides the SQLite ledger
    url = postgres.new_database()
    ledger = Ledger(url)
    await audit.open_trail(ledger, Settings(database_url=url, audit_key=new_audit_key()))
    for n in range(1, ROWS + 1):
        await audit.record_operator(ledger, "alice", "pause", target=f"target-{n}")
    try:
        yield ledger
    finally:
        await ledger.close()


async def test_it_really_is_postgres(ledger: Ledger) -> None:
    assert ledger.engine.dialect.name == "postgresql"


async def test_sealed_columns_round_trip_and_reseal_on_postgres(ledger: Ledger) -> None:
    old, new = new_key("old"), new_key("new")
    sealed.install(Keyring(parse_keys(old, "t")))
    try:
        outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid",
                                                                   "diagnostics": "gender is 'ZORGLUB'"}]}
        await ledger.apply(ev("t-1", "accepted", "ingress", 0, targets=["a"], size=1))
        await ledger.apply(ev("t-1", "rejected", "validator", 1, outcome=outcome))
        both = Keyring(parse_keys(f"{new},{old}", "t"))
        sealed.install(both)
        async with ledger.engine.begin() as conn:
            assert set(await sealed.kids_in_use(conn, metadata)) == {"old"}
            assert await sealed.reseal(conn, metadata, both) >= 3
            assert set(await sealed.kids_in_use(conn, metadata)) == {"new"}
        sealed.install(Keyring(parse_keys(new, "t")))
        view = await ledger.get("t-1")
        assert view is not None and "ZORGLUB" in str(view.outcome)
    finally:
        sealed.install(None)
