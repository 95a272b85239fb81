"""Fixtures of the unit tests: a fresh SQLite ledger per test (tests/integration/test_postgres.py runs the ledger
and audit tests again with a PostgreSQL one in its place)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.tracker.ledger import Ledger


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    ledger = Ledger(f"sqlite+aiosqlite:///{tmp_path}/ledger.db")
    await ledger.create_schema()
    try:
        yield ledger
    finally:
        await ledger.close()

