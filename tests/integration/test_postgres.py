"""The ledger on a real PostgreSQL (the production database): the tracker's ledger tests, the operator queries,
the audit trail and its tampering, and the sealed ledger columns, run again against one throwaway cluster from
the Debian binaries (started once for the session)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from services.core.crypto import Keyring, new_key, parse_keys
from services.tracker import sealed
from services.tracker.ledger import Ledger, metadata
from tests.support.postgres import PostgresCluster, start_cluster
from tests.unit.delivery.test_journal import (  # the attempt journal's race, on PostgreSQL's row locks
    test_a_killed_process_attempt_is_resolved_after_the_target_settles_a_live_one_waits_the_bound,  # noqa: F401
    test_a_ledger_from_before_incarnations_gets_the_column_and_its_rows_wait_the_whole_bound,  # noqa: F401
    test_copies_claiming_at_once_never_both_make_an_attempt_of_one_chain,  # noqa: F401
    test_each_attempt_records_the_incarnation_that_makes_it,  # noqa: F401
)
from tests.unit.ops.test_ledger_queries import *  # noqa: F403 - the same tests, on PostgreSQL
from tests.unit.ops.test_ledger_queries import ev as query_event
from tests.unit.security.test_audit import *  # noqa: F403 - the same tests, on PostgreSQL
from tests.unit.tracker.test_ledger import *  # noqa: F403 - the same tests, on PostgreSQL


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    yield from start_cluster()


@pytest.fixture
async def ledger(postgres: PostgresCluster) -> AsyncIterator[Ledger]:  # overrides tests/unit/conftest.py's SQLite one
    ledger = Ledger(postgres.new_database())
    await ledger.create_schema()
    try:
        yield ledger
    finally:
        await ledger.close()


async def test_it_really_is_postgres(ledger: Ledger) -> None:
    assert ledger.engine.dialect.name == "postgresql"


async def test_sealed_columns_round_trip_and_reseal_on_postgres(trail: Ledger) -> None:
    old, new = new_key("old"), new_key("new")
    sealed.install(Keyring(parse_keys(old, "t")))
    try:
        outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid",
                                                                   "diagnostics": "gender is 'ZORGLUB'"}]}
        await trail.apply(query_event("t-1", "accepted", "ingress", 0, targets=["a"], size=1))
        await trail.apply(query_event("t-1", "rejected", "validator", 1, outcome=outcome))
        both = Keyring(parse_keys(f"{new},{old}", "t"))
        sealed.install(both)
        async with trail.engine.begin() as conn:
            assert set(await sealed.kids_in_use(conn, metadata)) == {"old"}
            assert await sealed.reseal(conn, metadata, both) >= 3
            assert set(await sealed.kids_in_use(conn, metadata)) == {"new"}
        sealed.install(Keyring(parse_keys(new, "t")))
        view = await trail.get("t-1")
        assert view is not None and "ZORGLUB" in str(view.outcome)
    finally:
        sealed.install(None)
