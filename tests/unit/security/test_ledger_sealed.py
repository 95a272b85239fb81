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


INS = "1850599123456"  # an INS (NIR) a DUI exports: thirteen digits, a few billion plausible values


async def test_identifier_search_keys_cannot_be_recomputed_from_an_ins_without_the_key(tmp_path: Path) -> None:
    """A plain SHA-256 of an INS is reversed by trying every plausible number; a copy of the database alone (a
    backup) must not tell who was transferred. The search keys are keyed with a secret kept off the database."""
    import hashlib

    import sqlalchemy as sa

    from services.core.identifiers import identifier_digests
    from services.core.settings import Settings
    from services.tracker import audit, queries
    from services.tracker.ledger import transfer_identifiers

    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/ledger.db")
    ledger = Ledger(settings.database_url)
    await audit.open_trail(ledger, settings)
    patient = {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.250.1.213.1.4.8", "value": INS}]}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": patient}]}
    try:
        await ledger.apply(ev("t-ins", "accepted", "ingress", 0, targets=["a"], size=10))
        await ledger.apply(ev("t-ins", "validated", "validator", 1, identifiers=identifier_digests(bundle)))
        async with ledger.engine.connect() as conn:
            stored = set((await conn.execute(sa.select(transfer_identifiers.c.digest))).scalars())
        guesses = {hashlib.sha256(f"{prefix}{INS}".encode()).hexdigest() for prefix in ("", "relais-identifier/1|")}
        assert stored and not stored & guesses, "a search key is the plain hash of the INS"
        assert [t.id for t in await queries.find_by_identifier(ledger, INS)] == ["t-ins"]
    finally:
        await ledger.close()

    # The same database with another key (a thief's guess) finds nothing.
    other = Ledger(settings.database_url)
    audit.bind(other, audit.AuditKey(b"x" * 32, "test"))
    try:
        assert await queries.find_by_identifier(other, INS) == []
    finally:
        await other.close()


async def test_a_ledger_from_before_keyed_search_keys_is_rekeyed_once_at_start(tmp_path: Path) -> None:
    import sqlalchemy as sa

    from services.core.identifiers import digest
    from services.core.settings import Settings
    from services.tracker import audit, queries
    from services.tracker.ledger import transfer_identifiers

    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/ledger.db")
    old = Ledger(settings.database_url)
    await old.create_schema()
    await old.apply(ev("t-old", "accepted", "ingress", 0, targets=["a"], size=10))
    async with old.engine.begin() as conn:  # as the previous version filed them: plain SHA-256
        await conn.execute(transfer_identifiers.insert(), [{"digest": digest(INS), "transfer_id": "t-old"},
                                                          {"digest": digest("SEJ-1"), "transfer_id": "t-old"}])
    await old.close()

    ledger = Ledger(settings.database_url)
    try:
        await audit.open_trail(ledger, settings)
        await audit.open_trail(ledger, settings)  # a second start changes nothing
        async with ledger.engine.connect() as conn:
            stored = list((await conn.execute(sa.select(transfer_identifiers.c.digest))).scalars())
        assert len(stored) == 2 and digest(INS) not in stored and all(len(d) == 43 for d in stored)
        assert [t.id for t in await queries.find_by_identifier(ledger, INS)] == ["t-old"]
        assert [t.id for t in await queries.find_by_identifier(ledger, "SEJ-1")] == ["t-old"]
    finally:
        await ledger.close()
