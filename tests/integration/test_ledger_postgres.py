"""The ledger on a real PostgreSQL (the production database): the tracker's ledger tests and the
operator queries, run again against a throwaway cluster from the Debian binaries."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from services.tracker.ledger import Ledger
from tests.support.postgres import PostgresCluster, start_cluster
from tests.unit.ops.test_ledger_queries import *  # noqa: F403 - the same tests, on PostgreSQL
from tests.unit.tracker.test_ledger import *  # noqa: F403 - the same tests, on PostgreSQL


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    yield from start_cluster()


@pytest.fixture
async def ledger(postgres: PostgresCluster) -> AsyncIterator[Ledger]:  # overrides the SQLite ledger
    ledger = Ledger(postgres.new_database())
    await ledger.create_schema()
    try:
        yield ledger
    finally:
        await ledger.close()


async def test_it_really_is_postgres(ledger: Ledger) -> None:
    assert ledger.engine.dialect.name == "postgresql"
