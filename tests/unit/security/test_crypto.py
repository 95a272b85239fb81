"""Encryption at rest: envelopes sealed and opened, rotation, tampering, key files reloaded without restart; what
a process checks about encryption keys when it starts; with encryption on, the ledger holds no personal value
quoted by the validator or by a target."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from services.core import crypto
from services.core.blobstore import BlobIntegrityError, BlobRef, LocalBlobStore
from services.core.crypto import X_DECRYPT_ERROR, X_ENC_DEK, X_ENC_KID, DecryptionError, Keyring, parse_keys
from services.core.embedded import EmbeddedBus
from services.core.envelope import Envelope
from services.core.errors import ConfigurationError
from services.core.settings import Settings
from services.keyrotation import check_keys_at_start, rotate
from services.tracker import sealed
from services.tracker.ledger import Ledger, metadata
from tests.unit.ops.test_ledger_queries import ev

K1 = crypto.new_key("k1")
K2 = crypto.new_key("k2")
OLD, NEW = crypto.new_key("old"), crypto.new_key("new")
PLANTED_BY_VALIDATOR = "ZORGLUBINE-1957"
PLANTED_BY_TARGET = "DUPONTEL-MARCELLINE"
BUNDLE = b'{"resourceType":"Bundle","entry":[{"resource":{"name":[{"family":"DUPONTEL"}]}}]}'


def ring(*entries: str, current: str | None = None) -> Keyring:
    return Keyring(parse_keys(",".join(entries), "test"), current)


def env(data: bytes = BUNDLE) -> Envelope:
    return Envelope(type="fr.relais.transfer.received", source="/t", transfer_id="t-1", data=data, producer="p")


def test_seal_open_round_trip_and_headers() -> None:
    keys = ring(K1)
    value, headers = crypto.seal_envelope(keys, env())
    names = dict(headers)
    assert names["ce_enckid"] == b"k1" and "ce_encdek" in names
    assert b"DUPONTEL" not in value and value != BUNDLE
    back = crypto.open_envelope(keys, Envelope.from_headers(headers, value))
    assert back.data == BUNDLE
    assert X_ENC_KID not in back.extra and X_ENC_DEK not in back.extra and X_DECRYPT_ERROR not in back.extra


def test_each_record_gets_its_own_data_key() -> None:
    keys = ring(K1)
    (v1, h1), (v2, h2) = crypto.seal_envelope(keys, env()), crypto.seal_envelope(keys, env())
    assert v1 != v2 and dict(h1)["ce_encdek"] != dict(h2)["ce_encdek"]


def test_off_without_keys() -> None:
    value, headers = crypto.seal_envelope(None, env())
    assert value == BUNDLE and "ce_enckid" not in dict(headers)
    assert Keyring.from_settings(Settings()) is None


def test_old_key_still_decrypts_after_rotation() -> None:
    value, headers = crypto.seal_envelope(ring(K1), env())
    rotated = ring(K2, K1)  # k2 now encrypts; k1 kept to read what is still in the topics
    assert rotated.current == "k2"
    assert crypto.open_envelope(rotated, Envelope.from_headers(headers, value)).data == BUNDLE
    new_value, new_headers = crypto.seal_envelope(rotated, env())
    assert dict(new_headers)["ce_enckid"] == b"k2"
    assert crypto.open_envelope(ring(K2), Envelope.from_headers(new_headers, new_value)).data == BUNDLE


@pytest.mark.parametrize("damage", ["flip-value", "truncate", "swap-record", "wrong-dek", "unknown-key", "no-key"])
def test_tampered_record_is_marked_not_opened(damage: str) -> None:
    keys = ring(K1)
    value, headers = crypto.seal_envelope(keys, env())
    h = dict(headers)
    reader: Keyring | None = keys
    if damage == "flip-value":
        value = value[:20] + bytes([value[20] ^ 1]) + value[21:]
    elif damage == "truncate":
        value = value[:10]
    elif damage == "swap-record":  # the same ciphertext under another record's id must not open
        h["ce_id"] = b"another-event"
    elif damage == "wrong-dek":
        _, oh = crypto.seal_envelope(keys, env())
        h["ce_encdek"] = dict(oh)["ce_encdek"]
    elif damage == "unknown-key":
        reader = ring(K2)
    else:
        reader = None
    out = crypto.open_envelope(reader, Envelope.from_headers(list(h.items()), value))
    assert X_DECRYPT_ERROR in out.extra
    assert out.data == value  # kept sealed, never the plaintext
    # Published again (to the poison topic) exactly as read, not sealed twice.
    again, again_headers = crypto.seal_envelope(keys, out)
    assert again == value and dict(again_headers)["ce_enckid"] == b"k1"


def test_bad_key_material_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="32"):
        parse_keys("k1:" + base64.b64encode(b"short").decode(), "test")
    with pytest.raises(ConfigurationError):
        parse_keys("no-colon", "test")
    with pytest.raises(ConfigurationError, match="not among"):
        Keyring.from_settings(Settings(encryption_keys=K1, encryption_key_id="k9"))


def test_keys_file_rotates_without_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# relais keys\n{K1}\n")
    keys = Keyring.from_settings(Settings(encryption_keys_file=path))
    assert keys is not None and keys.current == "k1"
    path.write_text(f"{K2}\n{K1}\n")
    os.utime(path, (time.time() + 10, time.time() + 10))
    monkeypatch.setattr(crypto, "RELOAD_EVERY_S", 0.0)
    keys._next_check = 0.0
    value, headers = crypto.seal_envelope(keys, env())
    assert dict(headers)["ce_enckid"] == b"k2"
    path.write_text("garbage")  # a bad edit keeps the previous keys
    os.utime(path, (time.time() + 20, time.time() + 20))
    keys._next_check = 0.0
    assert crypto.open_envelope(keys, Envelope.from_headers(headers, value)).data == BUNDLE


def test_blob_round_trip_rotation_and_tampering(tmp_path: Path) -> None:
    import asyncio

    async def go() -> None:
        store = LocalBlobStore(tmp_path, ring(K1))
        ref = await store.put(BUNDLE)
        stored = (tmp_path / ref.name[:2] / ref.name).read_bytes()
        assert b"DUPONTEL" not in stored and crypto.is_sealed_blob(stored)
        assert await LocalBlobStore(tmp_path, ring(K2, K1)).get(ref) == BUNDLE
        with pytest.raises(BlobIntegrityError):
            await LocalBlobStore(tmp_path, None).get(ref)
        path = tmp_path / ref.name[:2] / ref.name
        path.write_bytes(stored[:-1] + bytes([stored[-1] ^ 1]))
        with pytest.raises(BlobIntegrityError, match="authenticate"):
            await store.get(ref)
        # A plaintext blob written before encryption was turned on still reads.
        plain = await LocalBlobStore(tmp_path / "p").put(b"old")
        assert await LocalBlobStore(tmp_path / "p", ring(K1)).get(BlobRef(plain.uri, plain.sha256, 3)) == b"old"

    asyncio.run(go())


def test_open_rejects_garbage_blob() -> None:
    with pytest.raises(DecryptionError):
        ring(K1).open_blob(b"RLE1\x00", b"x")


def key_settings(tmp_path: Path, keys: str | None) -> Settings:
    return Settings(encryption_keys=keys, blob_dir=tmp_path / "blobs", embedded_log_path=tmp_path / "log.db",
                    database_url=f"sqlite+aiosqlite:///{tmp_path}/ledger.db")


async def test_encryption_off_is_said_at_start_naming_the_setting(tmp_path: Path) -> None:
    with capture_logs() as logs:
        await check_keys_at_start(None, key_settings(tmp_path, None))
    assert any(e["log_level"] == "warning" and "RELAIS_ENCRYPTION_KEYS_FILE" in e["event"] for e in logs), logs
    with capture_logs() as logs:
        await check_keys_at_start(None, key_settings(tmp_path, NEW))
    assert not [e for e in logs if e["log_level"] == "warning"]


async def test_a_removed_key_still_sealing_blobs_stops_the_start_until_rotated(tmp_path: Path) -> None:
    await LocalBlobStore(tmp_path / "blobs", Keyring(parse_keys(OLD, "t"))).put(b"live dead letter")
    bus = EmbeddedBus(key_settings(tmp_path, NEW))
    await bus.start()
    try:
        with pytest.raises(ConfigurationError, match=r"key\(s\) no longer configured \(key 'old': 1 blobs\).*"
                                                     r"relais keys rotate"):
            await check_keys_at_start(bus, key_settings(tmp_path, NEW))
    finally:
        await bus.stop()
    done = await rotate(key_settings(tmp_path, f"{NEW},{OLD}"))
    assert (done.blobs, done.blobs_total) == (1, 1)
    bus = EmbeddedBus(key_settings(tmp_path, NEW))
    await bus.start()
    try:
        await check_keys_at_start(bus, key_settings(tmp_path, NEW))
    finally:
        await bus.stop()


@pytest.fixture
def keyring() -> Iterator[Keyring]:
    keys = ring(K1)
    sealed.install(keys)
    try:
        yield keys
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
        new = ring(K2, K1)
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
