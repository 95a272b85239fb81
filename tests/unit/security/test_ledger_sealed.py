"""With encryption at rest on, the ledger holds no personal value quoted by the validator or by a target."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.core.crypto import Keyring, new_key, parse_keys
from services.tracker import sealed
from services.tracker.ledger import Ledger, metadata
from tests.unit.ops.test_ledger_queries import ev

PLANTED_BY_VALIDATOR = "ZORGLUBINE-1957"
PLANTED_BY_TARGET = "DUPONTEL-MARCELLINE"
K1, K2 = new_key("k1"), new_key("k2")


@pytest.fixture
def keyring() -> Iterator[Keyring]:
    ring = Keyring(parse_keys(K1, "test"))
    sealed.install(ring)
    try:
        yield ring
    finally:
        sealed.install(None)  # other tests run in this process


def outcome(text: str) -> dict[str, object]:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "code-invalid", "diagnostics": f"gender is '{text}'"}]}


def scan(tmp_path: Path, *planted: str) -> list[str]:
    """Planted values found in any file of the ledger database (main file, WAL, journal)."""
    found = []
    for path in tmp_path.glob("ledger.db*"):
        data = path.read_bytes()
        found += [f"{p} in {path.name}" for p in planted if p.encode() in data]
    return found


async def test_quoted_values_are_sealed_in_the_ledger_and_read_back(tmp_path: Path, keyring: Keyring) -> None:
    ledger = Ledger(f"sqlite+aiosqlite:///{tmp_path}/ledger.db")
    await ledger.create_schema()
    try:
        await ledger.apply(ev("t-rej", "accepted", "ingress", 0, targets=["a"], size=10))
        await ledger.apply(ev("t-rej", "rejected", "validator", 1, outcome=outcome(PLANTED_BY_VALIDATOR)))
        await ledger.apply(ev("t-dead", "accepted", "ingress", 0, targets=["a"], size=10))
        await ledger.apply(ev("t-dead", "dead_lettered", "delivery", 2, target="a", attempt=1, http_status=422,
                              reason="HTTP 422", outcome=outcome(PLANTED_BY_TARGET)))
        rejected, dead = await ledger.get("t-rej"), await ledger.get("t-dead")
        assert rejected is not None and PLANTED_BY_VALIDATOR in str(rejected.outcome)  # readers see the text
        assert dead is not None and PLANTED_BY_TARGET in str(dead.deliveries[0].outcome)
    finally:
        await ledger.close()
    assert scan(tmp_path, PLANTED_BY_VALIDATOR, PLANTED_BY_TARGET) == []

    # A process without the key reads a clear "cannot open" outcome, never an exception or the ciphertext.
    sealed.install(None)
    ledger = Ledger(f"sqlite+aiosqlite:///{tmp_path}/ledger.db")
    try:
        view = await ledger.get("t-rej")
        assert view is not None and view.outcome is not None and view.outcome.get("sealed") is True
    finally:
        await ledger.close()


async def test_plain_values_written_before_encryption_are_sealed_by_rotation(tmp_path: Path, keyring: Keyring) -> None:
    sealed.install(None)
    ledger = Ledger(f"sqlite+aiosqlite:///{tmp_path}/ledger.db")
    await ledger.create_schema()
    try:
        await ledger.apply(ev("t-old", "accepted", "ingress", 0, targets=["a"], size=10))
        await ledger.apply(ev("t-old", "rejected", "validator", 1, outcome=outcome(PLANTED_BY_VALIDATOR)))
        new = Keyring(parse_keys(f"{K2},{K1}", "test"))
        sealed.install(new)
        async with ledger.engine.begin() as conn:
            assert await sealed.reseal(conn, metadata, new) >= 3  # outcome column and the events' details
            assert set(await sealed.kids_in_use(conn, metadata)) == {"k2"}
        view = await ledger.get("t-old")
        assert view is not None and PLANTED_BY_VALIDATOR in str(view.outcome)
    finally:
        await ledger.close()
