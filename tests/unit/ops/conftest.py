"""Fixtures of the ops tests: a fresh SQLite ledger per test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.tracker.ledger import Ledger


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    ledger = Ledger(f"sqlite+aiosqlite:///{tmp_path}/l.db")
    await ledger.create_schema()
    try:
        yield ledger
    finally:
        await ledger.close()
