"""Key rotation made complete: re-encrypt what is still live under the current key, so an old key can go.

`relais keys rotate` (run with the new key listed first, the old ones still listed):

* the ledger: values that may quote health data (services.tracker.sealed) are sealed again under the
  current key — and sealed for the first time when encryption was turned on after they were written;
* the embedded log: every record sealed with another key is decrypted and sealed again under the
  current one, in place (retry tiers, dead letters of every stage, events — the whole file; a record
  poisoned because it never opened stays exactly as it arrived). It needs the log to itself: stop
  `relais run` first (the log's lock says so if you forget);
* the local blob store: every blob sealed with another key is re-encrypted (atomic rename per blob);
* Kafka: records cannot be rewritten in place (and re-publishing a copy would deliver twice). Records not
  yet handled are sealed again with the current key each time a stage handles or parks them, so after
  the longest retry delay (plus a target's Retry-After, capped at 1 h) none is left under the old key;
  this command and `relais keys status` count those still waiting (read past each stage's committed
  offsets, never committing). Delivery dead letters replay from the blob store, which this command
  re-encrypts; stage dead letters replay from the poison topic, so a key sealing some of them stays
  until they are replayed, discarded or expired (the count says so).
  Events sealed with a removed key can no longer feed `relais ledger rebuild`: keep the old key until
  RELAIS_DLQ_RETENTION_DAYS has passed if you need that.

At start, a process refuses to run when live data (embedded log records, blobs, ledger values, records
waiting on Kafka) is sealed with a key that is no longer configured (`check_keys_at_start`), naming the
key and what to do, instead of dead-lettering records one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from services.core.blobstore import LocalBlobStore
from services.core.bus import Bus
from services.core.crypto import X_DECRYPT_ERROR, X_ENC_KID, Keyring, new_key, open_envelope, seal_envelope
from services.core.embedded import EmbeddedBus, _decode_headers, _encode_headers
from services.core.envelope import EXTRA_PREFIX, Envelope, EnvelopeError
from services.core.errors import BusUnavailable, ConfigurationError
from services.core.kafka import KafkaBus
from services.core.logging import get_logger
from services.core.settings import Settings
from services.core.topics import POISON, stage_inputs
from services.tracker import sealed
from services.tracker.auditkey import new_audit_key
from services.tracker.ledger import Ledger, metadata

log = get_logger(__name__)

KID_HEADER = EXTRA_PREFIX + X_ENC_KID
DECRYPT_ERROR_HEADER = EXTRA_PREFIX + X_DECRYPT_ERROR
BATCH = 500
CURRENT, UNREADABLE = "current", "unreadable"


@dataclass
class LiveKeys:
    """Which key ids seal live data, and how much of it."""

    records: dict[str, int] = field(default_factory=dict)
    blobs: dict[str, int] = field(default_factory=dict)
    ledger: dict[str, int] = field(default_factory=dict)
    kafka: dict[str, int] = field(default_factory=dict)  # records on Kafka not yet consumed by their stage

    def retired(self, keyring: Keyring | None) -> dict[str, str]:
        """Key ids in use that the keyring no longer holds -> where they are used."""
        known = set(keyring.keys) if keyring is not None else set()
        out: dict[str, list[str]] = {}
        for what, counts in (("records in the embedded log", self.records), ("blobs", self.blobs),
                             ("ledger values", self.ledger), ("records waiting on Kafka", self.kafka)):
            for kid, n in counts.items():
                if kid not in known:
                    out.setdefault(kid, []).append(f"{n} {what}")
        return {kid: ", ".join(where) for kid, where in out.items()}


def _record_kids(conn: sqlite3.Connection) -> dict[str, int]:
    counts: dict[str, int] = {}
    for (headers,) in conn.execute("SELECT headers FROM records WHERE headers LIKE ?", (f"%{KID_HEADER}%",)):
        pairs = dict(_decode_headers(headers))
        kid = pairs.get(KID_HEADER)
        if kid is not None and DECRYPT_ERROR_HEADER not in pairs:  # one that never opened is not live data
            counts[kid.decode()] = counts.get(kid.decode(), 0) + 1
    return counts


async def live_keys(bus: Bus, settings: Settings, *, at_start: bool = False, ledger: Ledger | None = None) -> LiveKeys:
    """Key ids sealing records of the embedded log (when that is the bus), Kafka, blobs of the local store and
    the ledger (`ledger`: the process's, else one opened for the check)."""
    found = LiveKeys()
    if isinstance(bus, EmbeddedBus):
        with contextlib.suppress(BusUnavailable):  # what waits in the inbox is counted in the log
            await bus.move_inbox()
        found.records = await bus.log.read(_record_kids)
    if isinstance(bus, KafkaBus) and not (at_start and Keyring.from_settings(settings) is None):
        # (At start without encryption the scan is skipped: it costs a read of every stage's backlog.)
        try:
            found.kafka = await _kafka_kids(bus, settings)
        except BusUnavailable as exc:
            if not at_start:
                raise
            # A long backlog after an outage must not stop the start: the records stay readable by
            # any process that still lists their key, and `relais keys status` can tell later.
            log.warning("could not check which keys seal the records waiting on Kafka", error=str(exc))
    if not settings.blob_s3_endpoint:
        found.blobs = LocalBlobStore(settings.blob_dir).key_ids()
    found.ledger = await _ledger_kids(ledger or Ledger(settings.database_url), owned=ledger is None)
    return found


async def _kafka_kids(bus: KafkaBus, settings: Settings) -> dict[str, int]:
    counts: dict[str, int] = {}
    scans = [bus.pending_header_values(stage, topics, KID_HEADER, timeout_s=30)
             for stage, topics in stage_inputs(settings).items()]
    # Stage dead letters wait on the poison topic until an operator replays them: all of it is live, except
    # records that never opened (kept exactly as they arrived).
    scans.append(bus.pending_header_values("keys-scan-poison", [POISON], KID_HEADER, timeout_s=30,
                                           unless=DECRYPT_ERROR_HEADER))
    per_stage = await asyncio.gather(*scans)
    for found in per_stage:
        for kid, n in found.items():
            counts[kid] = counts.get(kid, 0) + n
    return counts


async def _ledger_kids(ledger: Ledger, *, owned: bool) -> dict[str, int]:
    try:
        await ledger.create_schema()
        async with ledger.engine.connect() as conn:
            return await sealed.kids_in_use(conn, metadata)
    finally:
        if owned:
            await ledger.close()


async def check_keys_at_start(bus: Bus | None, settings: Settings, ledger: Ledger | None = None) -> None:
    """Warn when encryption at rest is off; refuse to start when live data is sealed with a key that is no
    longer configured (`bus`: the process's bus once started, None for an ingress-only process; `ledger`: the
    process's)."""
    keyring = Keyring.from_settings(settings)
    if keyring is None:
        log.warning("encryption at rest is OFF: Bundles are stored in clear in the log and the blob store; set "
                    "RELAIS_ENCRYPTION_KEYS_FILE (or RELAIS_ENCRYPTION_KEYS) to encrypt them")
    if bus is None:
        return
    retired = (await live_keys(bus, settings, at_start=True, ledger=ledger)).retired(keyring)
    if retired:
        detail = "; ".join(f"key {kid!r}: {where}" for kid, where in sorted(retired.items()))
        raise ConfigurationError(
            f"live data is still sealed with encryption key(s) no longer configured ({detail}). Put the old "
            "key back in RELAIS_ENCRYPTION_KEYS(_FILE) after the new one, run 'relais keys rotate' (with the "
            "broker stopped when it uses the embedded log), then remove the old key")


@dataclass
class Rotated:
    """What a rotation did."""

    records: int = 0
    records_total: int = 0
    ledger: int = 0
    unreadable: int = 0
    blobs: int = 0
    blobs_total: int = 0
    kafka_waiting: int = 0


def _on_own_connection(path: Path, fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(conn, *args)` on a connection of its own: the rotation commits batch by batch itself."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        return fn(conn, *args)
    finally:
        conn.close()


def _reseal_records(conn: sqlite3.Connection, keyring: Keyring,
                    progress: Callable[[int, int], None]) -> tuple[int, int, int]:
    rows = conn.execute("SELECT topic, partition, offset FROM records WHERE headers LIKE ?",
                        (f"%{KID_HEADER}%",)).fetchall()
    done = unreadable = 0
    for start in range(0, len(rows), BATCH):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for topic, partition, offset in rows[start:start + BATCH]:
                value, headers = conn.execute("SELECT value, headers FROM records WHERE topic=? AND partition=? "
                                              "AND offset=?", (topic, partition, offset)).fetchone()
                fresh = _reseal_record(keyring, value, headers)
                if isinstance(fresh, str):
                    unreadable += fresh == UNREADABLE
                    continue
                conn.execute("UPDATE records SET value=?, headers=? WHERE topic=? AND partition=? AND offset=?",
                             (*fresh, topic, partition, offset))
                done += 1
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        progress(min(start + BATCH, len(rows)), len(rows))
    return done, len(rows), unreadable


def _reseal_record(keyring: Keyring, value: bytes, headers: str) -> tuple[bytes, str] | str:
    """New (value, headers) under the current key; else CURRENT (nothing to do) or UNREADABLE."""
    pairs = _decode_headers(headers)
    if dict(pairs).get(KID_HEADER, b"").decode() == keyring.current:
        return CURRENT
    if DECRYPT_ERROR_HEADER in dict(pairs):
        return UNREADABLE  # poisoned because it never opened: kept exactly as it arrived, for forensics
    try:
        opened = open_envelope(keyring, Envelope.from_headers(pairs, value))
    except EnvelopeError:
        return UNREADABLE
    if X_DECRYPT_ERROR in opened.extra:
        return UNREADABLE
    sealed, new_headers = seal_envelope(keyring, opened)
    return sealed, _encode_headers(new_headers)


async def rotate(settings: Settings, out: TextIO = sys.stdout) -> Rotated:
    """Re-encrypt the embedded log's records and the local blobs under the current key, with progress."""
    keyring = Keyring.from_settings(settings)
    if keyring is None:
        raise ConfigurationError("encryption at rest is off (RELAIS_ENCRYPTION_KEYS / RELAIS_ENCRYPTION_KEYS_FILE): "
                                 "nothing to rotate")
    result = Rotated()

    def progress(what: str) -> Callable[[int, int], None]:
        def show(n: int, total: int) -> None:
            if n == total or n % BATCH == 0:
                print(f"  {what}: {n}/{total} checked", file=out, flush=True)
        return show

    print(f"relais keys rotate: sealing live data with key {keyring.current!r}", file=out, flush=True)
    if not settings.kafka_bootstrap:
        inboxed = EmbeddedBus(settings)  # what waits in the inbox is resealed in the log
        try:
            await inboxed.start()
            await inboxed.move_inbox()
        finally:
            await inboxed.stop()
        result.records, result.records_total, result.unreadable = await asyncio.to_thread(
            _on_own_connection, settings.embedded_log_path, _reseal_records, keyring,
            progress("embedded log records"))
    ledger = Ledger(settings.database_url)
    try:
        await ledger.create_schema()
        async with ledger.engine.begin() as conn:
            result.ledger = await sealed.reseal(conn, metadata, keyring, lambda column, n: print(
                f"  ledger {column}: {n} value(s) checked", file=out, flush=True))
    finally:
        await ledger.close()
    if settings.blob_s3_endpoint:
        print("  blobs: the S3 blob store is not rotated by this command yet; keep the old key until "
              "RELAIS_DLQ_RETENTION_DAYS has passed", file=out, flush=True)
    else:
        store = LocalBlobStore(settings.blob_dir)
        result.blobs, result.blobs_total = store.reseal_all(keyring, progress("blobs"))
    print(f"relais keys rotate: {result.records} of {result.records_total} sealed record(s), {result.blobs} of "
          f"{result.blobs_total} blob(s) and {result.ledger} ledger value(s) re-encrypted"
          + (f"; {result.unreadable} record(s) could not be opened and were left as they are" if result.unreadable
             else "") + ". Keys no longer used can now be removed.", file=out, flush=True)
    if settings.kafka_bootstrap:
        bus = KafkaBus(settings)
        waiting = await _kafka_kids(bus, settings)
        old = {kid: n for kid, n in waiting.items() if kid != keyring.current}
        result.kafka_waiting = sum(old.values())
        print(f"relais keys rotate: on Kafka, {result.kafka_waiting} record(s) not yet handled are still sealed "
              f"with an older key ({old or 'none'}); stages re-seal records under the current key as they handle "
              "or park them (at most the longest retry delay, capped at 1 h): run 'relais keys status' until it "
              "says none, then remove the old key.", file=out, flush=True)
    return result


USAGE = """usage: relais keys rotate | status | new KID | new-audit-key

  rotate         re-encrypt live data (embedded log records, local blobs, ledger values) under the current
                 key (RELAIS_ENCRYPTION_KEY_ID, else the first listed), with progress; on Kafka, count the
                 records still waiting under an old key; then old keys can be removed
  status         which key ids seal live data, and which of them are no longer configured
  new KID        print a new encryption key entry 'KID:base64' (list it first to make it current)
  new-audit-key  print a new audit-trail key (base64) for RELAIS_AUDIT_KEY / RELAIS_AUDIT_KEY_FILE
"""


def main(argv: list[str]) -> int:
    """`relais keys ...`: 0 done, 1 live data under a retired key (status), 2 usage or configuration error."""
    if argv[:1] == ["new"] and len(argv) == 2:
        print(new_key(argv[1]))
        return 0
    if argv == ["new-audit-key"]:
        print(new_audit_key())
        return 0
    if argv in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if argv not in (["rotate"], ["status"]):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        settings = Settings()
        if argv == ["rotate"]:
            asyncio.run(rotate(settings))
            return 0
        return asyncio.run(_status(settings))
    except ValidationError as exc:
        print(f"relais keys: invalid configuration:\n{exc}", file=sys.stderr)
    except ConfigurationError as exc:
        print(f"relais keys: {exc}", file=sys.stderr)
    return 2


async def _status(settings: Settings) -> int:
    keyring = Keyring.from_settings(settings)
    bus: Bus = KafkaBus(settings) if settings.kafka_bootstrap else EmbeddedBus(settings)
    if isinstance(bus, EmbeddedBus):
        await bus.start()
    try:
        found = await live_keys(bus, settings)
    finally:
        await bus.stop()
    print(f"current key: {keyring.current if keyring else '(encryption off)'}")
    print(f"by key: embedded log records {found.records}, records waiting on Kafka {found.kafka}, "
          f"blobs {found.blobs}, ledger values {found.ledger}")
    retired = found.retired(keyring)
    for kid, where in sorted(retired.items()):
        print(f"NOT CONFIGURED: key {kid!r} still seals {where}: put it back and run 'relais keys rotate'")
    return 1 if retired else 0
