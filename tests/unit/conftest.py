"""Fixtures of the unit tests: a fresh SQLite ledger per test, and one with its audit trail open."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.core.settings import Settings
from services.tracker import audit
from services.tracker.ledger import Ledger


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    ledger = Ledger(f"sqlite+aiosqlite:///{tmp_path}/ledger.db")
    await ledger.create_schema()
    try:
        yield ledger
    finally:
        await ledger.close()


@pytest.fixture
async def audited_ledger(ledger: Ledger) -> Ledger:
    """`ledger` with its audit trail open: the genesis row written, the key created beside the ledger file."""
    await audit.open_trail(ledger, Settings(database_url=ledger.url))
    return ledger
