"""The audit trail: an append-only, MAC-chained log of who sent what, who received it, who looked at it.

Three feeds write it:

* the tracker, from `transfers.events`: a transfer accepted (producer, how it authenticated, source
  FINESS, targets, size, SHA-256 of the Bundle), delivered / dead-lettered per target, rejected,
  failed, replayed and discarded (with the operator) — idempotent on the event id;
* the operator API, directly: target paused/resumed, a Bundle or full answer viewed, the audit
  trail itself read, exported or verified;
* refusals: failed authentications (401/403) at ingress and on `/ops`, rate-limited (`Refusals`).

Why it can be trusted by someone who does not trust the database's administrator:

* each row's `hash` is HMAC-SHA-256, under a key held outside the database (services.tracker.auditkey),
  over the previous row's MAC and the row's canonical content: a changed, removed or inserted row breaks
  the chain, and recomputing it needs the key;
* the chain starts at a genesis row (seq 0) that verification requires, so removing the oldest rows
  shows; retention (`purge`) removes a prefix and appends an `audit.purged` row, itself chained, that
  says which prefix went and the MAC the remaining chain resumes from;
* the head (seq + MAC) is written every RELAIS_AUDIT_ANCHOR_S by the tracker where the database cannot
  rewrite it: the structured log (`audit chain head`) and the compacted `audit.head` topic. Verify
  compares the chain against the newest anchor, so removing the newest rows shows too (rows written
  since the last anchor are the window an attacker could still remove unseen). Verification and
  anchors live in services.tracker.auditchain; this module writes, reads and purges the trail.

Ledgers written before the MAC chain (plain SHA-256, no genesis row) are migrated at the first start
with a key: the old chain is verified first and, if it holds, re-chained under the key behind a genesis
row that records the migration; if it does not hold, start is refused with what to do.

Writers serialise on the one-row `audit_head` table (an UPDATE takes the lock first, on SQLite and
PostgreSQL alike). Rows hold ids, FINESS numbers, sizes and hashes — never a Bundle or personal data.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import time as clock
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from services.core.clock import aware
from services.core.errors import ConfigurationError
from services.core.logging import get_logger
from services.core.settings import Settings
from services.core.shielded import shielded
from services.tracker import prepared
from services.tracker.auditkey import AuditKey, load_audit_key
from services.tracker.dbfaults import unavailable
from services.tracker.ledger import Ledger, LedgerEvent, metadata

log = get_logger(__name__)

ZERO = "0" * 64
FORMAT = "hmac-sha256/1"
GENESIS_KIND = "audit.genesis"
PURGED_KIND = "audit.purged"

audit_log = sa.Table(
    "audit_log", metadata,
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=False),
    sa.Column("time", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("kind", sa.String(64), nullable=False, index=True),
    sa.Column("actor_type", sa.String(16), nullable=False),  # producer | operator | system | unknown
    sa.Column("actor", sa.String(128), nullable=True, index=True),
    sa.Column("transfer_id", sa.String(64), nullable=True, index=True),
    sa.Column("target", sa.String(64), nullable=True),
    sa.Column("finess", sa.String(512), nullable=True),
    sa.Column("outcome", sa.String(16), nullable=False),  # success | failure
    sa.Column("detail", sa.JSON, nullable=True),
    sa.Column("event_id", sa.String(64), nullable=True, unique=True),  # the CloudEvents id when fed by events
    sa.Column("prev_hash", sa.String(64), nullable=False),  # the previous row's MAC
    sa.Column("hash", sa.String(64), nullable=False),  # this row's MAC
)

audit_head = sa.Table(
    "audit_head", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)

# Event kinds worth proving later, and whether each is a success.
AUDITED_EVENTS = {"accepted": "success", "rejected": "failure", "delivered": "success",
                  "delivered_unconfirmed": "success", "dead_lettered": "failure", "failed": "failure",
                  "replayed": "success", "discarded": "success"}
# Detail keys copied from an event (never an OperationOutcome's free text, never a response body).
_KEPT = ("targets", "size", "entries", "sha256", "auth", "cert", "http_status", "attempts", "reason", "note",
         "replay", "errors", "warnings")


# --- the key of each ledger ------------------------------------------------------------------


@dataclass
class _Trail:
    source: AuditKey | Settings
    loaded: AuditKey | None = None
    checked: bool = False  # the genesis row was found (or made) and names this key

    @property
    def key(self) -> AuditKey:
        """Loaded on first use, so a process that never writes the trail never creates a key file."""
        if self.loaded is None:
            self.loaded = self.source if isinstance(self.source, AuditKey) else load_audit_key(self.source)
        return self.loaded


_TRAILS: weakref.WeakKeyDictionary[Ledger, _Trail] = weakref.WeakKeyDictionary()


def bind(ledger: Ledger, key: AuditKey | Settings) -> None:
    """Give `ledger`'s audit trail its MAC key (once per ledger object; from settings, or given)."""
    if ledger not in _TRAILS:
        trail = _TRAILS[ledger] = _Trail(key)
        ledger.identifier_key = lambda: trail.key.search_key()  # the identifier search keys use the same secret


def key_of(ledger: Ledger) -> AuditKey:
    """The MAC key of `ledger`'s audit trail (ConfigurationError when it has none or it cannot be read)."""
    return _trail(ledger).key


def _trail(ledger: Ledger) -> _Trail:
    trail = _TRAILS.get(ledger)
    if trail is None:
        raise ConfigurationError("the audit trail of this ledger has no key: call audit.bind(ledger, settings) "
                                 "where the ledger is built")
    return trail


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One row of the audit trail."""

    seq: int
    time: datetime
    kind: str
    actor_type: str
    actor: str | None
    transfer_id: str | None
    target: str | None
    finess: list[str]
    outcome: str
    detail: dict[str, Any]
    prev_hash: str
    hash: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"seq": self.seq, "time": self.time.isoformat(), "kind": self.kind, "actor_type": self.actor_type,
                "actor": self.actor, "transfer_id": self.transfer_id, "target": self.target, "finess": self.finess,
                "outcome": self.outcome, "detail": self.detail, "prev_hash": self.prev_hash, "hash": self.hash}


def _content(seq: int, time: datetime, kind: str, actor_type: str, actor: str | None, transfer_id: str | None,
             target: str | None, finess: str | None, outcome: str, detail: dict[str, Any] | None) -> bytes:
    """A row's canonical content (JSON, sorted keys; time in UTC, microseconds)."""
    return orjson.dumps([seq, aware(time).astimezone(UTC).isoformat(timespec="microseconds"), kind, actor_type,
                         actor, transfer_id, target, finess, outcome, detail or {}], option=orjson.OPT_SORT_KEYS)


def row_mac(key: AuditKey, prev: str, seq: int, time: datetime, kind: str, actor_type: str, actor: str | None,
            transfer_id: str | None, target: str | None, finess: str | None, outcome: str,
            detail: dict[str, Any] | None) -> str:
    """The chained MAC of one row: HMAC-SHA-256(key, previous MAC | canonical content)."""
    return key.mac(prev.encode() + _content(seq, time, kind, actor_type, actor, transfer_id, target, finess,
                                            outcome, detail))


def legacy_row_hash(prev: str, seq: int, time: datetime, kind: str, actor_type: str, actor: str | None,
                    transfer_id: str | None, target: str | None, finess: str | None, outcome: str,
                    detail: dict[str, Any] | None) -> str:
    """The plain SHA-256 chain of ledgers written before the MAC chain (read only, to migrate them)."""
    return hashlib.sha256(prev.encode() + _content(seq, time, kind, actor_type, actor, transfer_id, target, finess,
                                                   outcome, detail)).hexdigest()


def mac_of(key: AuditKey, prev: str, r: Any) -> str:
    """The MAC a stored row (a mapping of its columns) should carry after `prev`."""
    return row_mac(key, prev, r["seq"], r["time"], r["kind"], r["actor_type"], r["actor"], r["transfer_id"],
                   r["target"], r["finess"], r["outcome"], r["detail"])


async def create_schema(ledger: Ledger) -> None:
    """The tables (Ledger.create_schema makes them too: they share its metadata)."""
    await ledger.create_schema()


async def open_trail(ledger: Ledger, settings: Settings) -> None:
    """Bind the key, create the genesis row or migrate an old plain-SHA trail, check the key is the trail's.

    Called at start by the processes that write the trail, so a wrong key or an altered old trail stops
    them with a clear message instead of failing record after record.
    """
    await create_schema(ledger)
    bind(ledger, settings)
    key_of(ledger)  # a missing or unreadable key stops the process now
    await _write(ledger, None)
    await ledger.rekey_identifiers()  # search keys of a ledger from before they were keyed (once)


@dataclass(frozen=True, slots=True)
class _Row:
    kind: str
    actor_type: str
    actor: str | None
    outcome: str
    transfer_id: str | None
    target: str | None
    finess: str | None
    detail: dict[str, Any]
    event_id: str | None
    time: datetime


async def _write(ledger: Ledger, row: _Row | None) -> int:
    """Append `row` at the end of the chain (None: only make sure the chain is ready); 1 when appended."""
    return await _write_rows(ledger, [row] if row is not None else [])


async def _write_rows(ledger: Ledger, rows: Sequence[_Row]) -> int:
    """Append `rows`, in order, at the end of the chain in one transaction, leaving out those whose event is
    already recorded (none: make sure the chain is ready); how many were appended."""
    trail = _trail(ledger)
    appended = await ledger.write(functools.partial(_append_rows, trail=trail, rows=rows))
    trail.checked = True
    return appended


def _append_rows(conn: sa.Connection, trail: _Trail, rows: Sequence[_Row]) -> int:
    """`_write_rows` on a connection in a transaction (the tracker's poll runs it beside its projection)."""
    key = trail.key
    head = prepared.prepared(conn, "audit-head-lock", lambda: audit_head.update().where(audit_head.c.id == 1)
                             .values(seq=audit_head.c.seq).returning(audit_head.c.seq, audit_head.c.hash))
    found = head.all(conn, {})  # the writers' lock first
    if not found:
        _establish(conn, key)
    if not trail.checked:
        _check_genesis(conn, key)
    if not found or not trail.checked:  # made, or migrated, just now
        found = [dict(conn.execute(sa.select(audit_head.c.seq, audit_head.c.hash)
                                   .where(audit_head.c.id == 1)).mappings().one())]
    ids = [row.event_id for row in rows if row.event_id is not None]
    if ids:  # at-least-once input, exactly-once trail: an event already recorded is not recorded again
        known = {r["event_id"] for r in prepared.select_in(conn, [audit_log.c.event_id], audit_log.c.event_id, ids)}
        rows = [row for row in rows if row.event_id not in known]
    if not rows:
        return 0
    seq, prev = int(found[0]["seq"]), str(found[0]["hash"])
    values = []
    for row in rows:
        seq += 1
        digest = row_mac(key, prev, seq, row.time, row.kind, row.actor_type, row.actor, row.transfer_id,
                         row.target, row.finess, row.outcome, row.detail)
        values.append({"seq": seq, "time": row.time, "kind": row.kind, "actor_type": row.actor_type,
                       "actor": row.actor, "transfer_id": row.transfer_id, "target": row.target,
                       "finess": row.finess, "outcome": row.outcome, "detail": row.detail,
                       "event_id": row.event_id, "prev_hash": prev, "hash": digest})
        prev = digest
    prepared.insert(conn, audit_log, values)
    prepared.update(conn, audit_head, ("id",), ("seq", "hash"), [{"id": 1, "seq": seq, "hash": prev}])
    return len(rows)


def _establish(conn: sa.Connection, key: AuditKey) -> None:
    """No head row: a new trail gets its genesis row; rows without a head get the head back from the last row."""
    last = conn.execute(sa.select(audit_log.c.seq, audit_log.c.hash).order_by(audit_log.c.seq.desc()).limit(1)).first()
    if last is not None:
        # The head table lost its row (it is only a lock and a cache): never start a fresh chain over old rows.
        conn.execute(audit_head.insert().values(id=1, seq=last[0], hash=last[1]))
        return
    try:
        with conn.begin_nested():
            digest = _insert_genesis(conn, key, {})
            conn.execute(audit_head.insert().values(id=1, seq=0, hash=digest))
    except IntegrityError:
        pass  # another process made it first; its genesis row is the trail's


def _insert_genesis(conn: sa.Connection, key: AuditKey, extra: dict[str, Any]) -> str:
    moment = datetime.now(UTC)
    detail = {"format": FORMAT, "key_check": key.check, **extra}
    digest = row_mac(key, ZERO, 0, moment, GENESIS_KIND, "system", "relais", None, None, None, "success", detail)
    conn.execute(audit_log.insert().values(
        seq=0, time=moment, kind=GENESIS_KIND, actor_type="system", actor="relais", outcome="success",
        detail=detail, prev_hash=ZERO, hash=digest))
    return digest


def _check_genesis(conn: sa.Connection, key: AuditKey) -> None:
    genesis = conn.execute(sa.select(audit_log).where(audit_log.c.seq == 0)).mappings().first()
    if genesis is None:
        _migrate_legacy(conn, key)
        return
    detail = dict(genesis["detail"] or {})
    if genesis["kind"] == GENESIS_KIND and detail.get("key_check") != key.check:
        raise ConfigurationError(
            f"the audit key of this process ({key.origin}, check {key.check}) is not the key this audit trail was "
            f"started with (check {detail.get('key_check')}): give every process the same RELAIS_AUDIT_KEY_FILE")


def _migrate_legacy(conn: sa.Connection, key: AuditKey) -> None:
    """Re-chain a plain-SHA-256 trail under the key, behind a genesis row; refuse if the old chain is broken."""
    rows = conn.execute(sa.select(audit_log).order_by(audit_log.c.seq)).mappings().all()
    if not rows:
        return
    if mac_of(key, rows[0]["prev_hash"], rows[0]) == rows[0]["hash"]:
        # A keyed chain whose genesis row was deleted: not ours to repair; verify names seq 0.
        log.error("the audit trail's genesis row is missing; GET /ops/audit/verify reports it")
        return
    prev: str | None = None
    for r in rows:
        if (prev is not None and r["prev_hash"] != prev) or legacy_row_hash(
                r["prev_hash"], r["seq"], r["time"], r["kind"], r["actor_type"], r["actor"], r["transfer_id"],
                r["target"], r["finess"], r["outcome"], r["detail"]) != r["hash"]:
            raise ConfigurationError(
                f"the audit trail in this ledger uses the old plain SHA-256 chain and it does not verify at seq "
                f"{r['seq']}: it was altered, so it cannot be migrated to the keyed chain. Keep a copy of the "
                "audit_log table as evidence, then rename it (ALTER TABLE audit_log RENAME TO audit_log_legacy) "
                "and delete the audit_head row; Relais then starts a new trail")
        prev = r["hash"]
    first = rows[0]["seq"]
    migrated: dict[str, Any] = {"migrated": {"from": "sha256-chain", "rows": len(rows), "legacy_head": prev}}
    if first > 1:
        migrated["purged_through"] = first - 1  # the old trail's retention had removed its oldest rows
    mac = _insert_genesis(conn, key, migrated)
    for r in rows:
        digest = mac_of(key, mac, r)
        conn.execute(audit_log.update().where(audit_log.c.seq == r["seq"]).values(prev_hash=mac, hash=digest))
        mac = digest
    conn.execute(audit_head.update().where(audit_head.c.id == 1).values(seq=rows[-1]["seq"], hash=mac))
    log.warning("audit trail migrated from the plain SHA-256 chain to the keyed MAC chain", rows=len(rows))


def _plain_json(value: Any) -> Any:
    """`value` as plain JSON the chain can hash; integers past 64 bits (orjson's limit) become text."""
    if isinstance(value, dict):
        return {str(k): _plain_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_json(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str | float):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else str(value)
    return str(value)


async def append(ledger: Ledger, kind: str, *, actor_type: str, actor: str | None, outcome: str = "success",
                 transfer_id: str | None = None, target: str | None = None, finess: Sequence[str] = (),
                 detail: dict[str, Any] | None = None, event_id: str | None = None,
                 time: datetime | None = None) -> bool:
    """Append one row at the end of the chain; False when `event_id` was already recorded."""
    return await _append_once(ledger, _row(kind, actor_type, actor, outcome, transfer_id, target, finess, detail,
                                           event_id, time))


async def _append_once(ledger: Ledger, row: _Row) -> bool:
    """Append `row`; False when its event id was already recorded (at-least-once input, exactly-once trail)."""
    with unavailable("audit trail"):
        return await _write(ledger, row) == 1


async def record_events(ledger: Ledger, evs: Sequence[LedgerEvent]) -> None:
    """Append the rows a poll's events deserve in one transaction (one lock, one commit for the poll); the
    events already recorded (a poll read again) are left out."""
    rows = [row for ev in evs if (row := _event_row(ev)) is not None]
    if not rows:
        return
    with unavailable("audit trail"):
        await _write_rows(ledger, rows)


async def project_and_record(ledger: Ledger, evs: Sequence[LedgerEvent]) -> None:
    """A poll's events into the ledger and their rows into the audit trail, in one transaction: one commit,
    and no window in which a crash leaves an event projected but not audited. Both leave out what they have."""
    trail = _trail(ledger)
    rows = {ev.id: row for ev in evs if (row := _event_row(ev)) is not None}

    def append(conn: sa.Connection, batch: Sequence[LedgerEvent]) -> None:
        _append_rows(conn, trail, [rows[ev.id] for ev in batch if ev.id in rows])

    await ledger.apply_many(evs, also=append if rows else None)
    if rows:
        trail.checked = True  # `_append_rows` checked the genesis row, in a transaction that committed


async def record_event(ledger: Ledger, ev: LedgerEvent) -> bool:
    """Append the audit row an event deserves (if any); idempotent on the event id."""
    row = _event_row(ev)
    return False if row is None else await _append_once(ledger, row)


def _event_row(ev: LedgerEvent) -> _Row | None:
    """The audit row an event deserves, or None."""
    outcome = AUDITED_EVENTS.get(ev.kind)
    if outcome is None:
        return None
    detail = dict(ev.detail or {})
    operator = detail.get("operator")
    kept = {k: detail[k] for k in _KEPT if detail.get(k) is not None}
    if ev.kind == "rejected":
        kept["errors"] = sum(1 for i in (detail.get("outcome") or {}).get("issue", [])
                             if isinstance(i, dict) and i.get("severity") in ("error", "fatal"))
    actor_type, actor = ("operator", str(operator)) if operator else (
        ("producer", ev.producer) if ev.kind == "accepted" else ("system", ev.stage))
    if ev.producer:
        kept["producer"] = ev.producer
    if ev.attempt:
        kept["attempt"] = ev.attempt
    finess = detail.get("finess") or []
    return _row(ev.kind, actor_type, actor, outcome, ev.transfer_id, ev.target,
                [finess] if isinstance(finess, str) else list(finess), kept, ev.id, ev.time)


def _row(kind: str, actor_type: str, actor: str | None, outcome: str, transfer_id: str | None, target: str | None,
         finess: Sequence[str], detail: dict[str, Any] | None, event_id: str | None, time: datetime | None) -> _Row:
    """A row as stored: time in UTC, FINESS numbers sorted and joined, detail plain JSON."""
    moment = (time or datetime.now(UTC)).astimezone(UTC)
    finess_text = ",".join(sorted({str(f) for f in finess})) or None
    return _Row(kind, actor_type, actor, outcome, transfer_id, target, finess_text, _plain_json(detail or {}),
                event_id, moment)


async def record_operator(ledger: Ledger, operator: str, action: str, *, transfer_id: str | None = None,
                          target: str | None = None, detail: dict[str, Any] | None = None) -> None:
    """An operator's action or read (pause, resume, payload viewed, audit exported ...)."""
    await append(ledger, f"operator.{action}", actor_type="operator", actor=operator, transfer_id=transfer_id,
                 target=target, detail=detail)


class Refusals:
    """Failed authentications into the trail, at most one row per (surface, client, reason) per interval.

    A client hammering with a bad token must not fill the database: the first refusal is recorded, the
    next ones within `every_s` are counted and the count goes into the following row. Writing happens in
    the background, so a slow or failing database never delays (or fails) the refusal itself.
    """

    MAX_KEYS = 10_000
    MAX_ROWS = 100  # per interval, all clients together: many addresses must not flood the database either

    def __init__(self, ledger: Ledger, every_s: float) -> None:
        self.ledger = ledger
        self.every_s = every_s
        self._last: dict[tuple[str, str, str], tuple[float, int]] = {}
        self._window = (0.0, 0)  # start of the current interval, rows written in it
        self._dropped = 0  # refusals not recorded because of MAX_ROWS, told in the next row
        self._tasks: set[asyncio.Task[None]] = set()

    def note(self, surface: str, status: int, reason: str, *, client: str | None, actor: str | None = None,
             path: str | None = None, now: float | None = None) -> bool:
        """Record this refusal unless one like it was recorded within the interval; True when recorded."""
        moment = clock.monotonic() if now is None else now
        slot = (surface, client or "", reason[:80])
        last, suppressed = self._last.get(slot, (None, 0))
        if last is not None and moment - last < self.every_s:
            self._last[slot] = (last, suppressed + 1)
            return False
        start, rows = self._window
        if moment - start >= self.every_s:
            start, rows = moment, 0
        if rows >= self.MAX_ROWS:
            self._dropped += 1
            return False
        self._window = (start, rows + 1)
        if len(self._last) >= self.MAX_KEYS:
            self._last.clear()  # a flood of distinct clients: forget, rather than grow without bound
        self._last[slot] = (moment, 0)
        detail: dict[str, Any] = {"surface": surface, "http_status": status, "reason": reason[:300],
                                  "client": client, "path": path}
        if suppressed:
            detail["suppressed_since_last"] = suppressed
        if self._dropped:
            detail["dropped_over_limit"], self._dropped = self._dropped, 0
        task = asyncio.get_running_loop().create_task(self._write(actor, detail))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _write(self, actor: str | None, detail: dict[str, Any]) -> None:
        try:
            await append(self.ledger, "auth.refused", actor_type="unknown" if actor is None else "producer",
                         actor=actor, outcome="failure", detail=detail)
        except Exception as exc:  # noqa: BLE001 - the refusal stands; the log says the trail missed it
            log.error("failed authentication not recorded in the audit trail", error=str(exc),
                      surface=detail["surface"], http_status=detail["http_status"])

    async def drain(self) -> None:
        """Wait for the rows being written (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


# --- reading --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Which rows an operator asks for."""

    kind: str | None = None
    actor: str | None = None
    transfer_id: str | None = None
    target: str | None = None
    finess: str | None = None
    since: datetime | None = None
    until: datetime | None = None


def encode_cursor(seq: int) -> str:
    """An opaque cursor for the next page."""
    return base64.urlsafe_b64encode(f"a{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The sequence a cursor points below; ValueError when it is not ours."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not text.startswith("a"):
            raise ValueError
        return int(text[1:])
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"cursor {cursor!r} is not one this API issued") from exc


async def entries(ledger: Ledger, flt: AuditFilter | None = None, *, cursor: str | None = None,
                  limit: int = 100, ascending: bool = False) -> tuple[list[AuditEntry], str | None]:
    """Rows matching `flt`, newest first (or oldest first), with the cursor of the next page."""
    f = flt or AuditFilter()
    query = sa.select(audit_log)
    for column, value in ((audit_log.c.kind, f.kind), (audit_log.c.actor, f.actor),
                          (audit_log.c.transfer_id, f.transfer_id), (audit_log.c.target, f.target)):
        if value:
            query = query.where(column == value)
    if f.finess:
        query = query.where(("," + audit_log.c.finess + ",").like(f"%,{f.finess},%"))
    if f.since:
        query = query.where(audit_log.c.time >= f.since)
    if f.until:
        query = query.where(audit_log.c.time < f.until)
    if cursor:
        seq = decode_cursor(cursor)
        query = query.where(audit_log.c.seq > seq if ascending else audit_log.c.seq < seq)
    query = query.order_by(audit_log.c.seq.asc() if ascending else audit_log.c.seq.desc()).limit(limit + 1)
    async with ledger.engine.connect() as conn:
        rows = (await conn.execute(query)).mappings().all()
    items = [_entry(r) for r in rows[:limit]]
    return items, encode_cursor(items[-1].seq) if len(rows) > limit else None


def _entry(r: Any) -> AuditEntry:
    return AuditEntry(r["seq"], aware(r["time"]), r["kind"], r["actor_type"], r["actor"], r["transfer_id"],
                      r["target"], [f for f in (r["finess"] or "").split(",") if f], r["outcome"],
                      dict(r["detail"] or {}), r["prev_hash"], r["hash"])


@shielded
async def purge(ledger: Ledger, older_than: timedelta, *, now: datetime | None = None) -> int:
    """Remove the oldest rows past `older_than` (retention), keeping the genesis row, and record it.

    Only a prefix goes (rows 1..P, P the newest row older than the cutoff, earlier purge rows included),
    and an `audit.purged` row, chained like any other, says so with the MAC of row P: the chain resumes
    from it, and a prefix removed any other way is still reported by verify.
    """
    cutoff = (now or datetime.now(UTC)) - older_than
    async with ledger.engine.begin() as conn:
        through = (await conn.execute(sa.select(sa.func.max(audit_log.c.seq))
                                      .where((audit_log.c.time < cutoff) & (audit_log.c.seq > 0)))).scalar()
        if not through:
            return 0
        resume = (await conn.execute(sa.select(audit_log.c.hash).where(audit_log.c.seq == through))).scalar_one()
        gone = (await conn.execute(audit_log.delete().where((audit_log.c.seq > 0)
                                                            & (audit_log.c.seq <= through)))).rowcount or 0
    await append(ledger, PURGED_KIND, actor_type="system", actor="retention",
                 detail={"through_seq": int(through), "resume_mac": resume, "rows": gone,
                         "older_than_days": older_than.total_seconds() / 86400})
    return gone
