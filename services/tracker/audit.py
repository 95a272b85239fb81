"""The audit trail: an append-only, hash-chained log of who sent what, who received it, who looked at it.

Two feeds write it:

* the tracker, from `transfers.events`: a transfer accepted (producer, how it authenticated, source
  FINESS, targets, size, SHA-256 of the Bundle), delivered / dead-lettered per target, rejected,
  failed, replayed and discarded (with the operator) — idempotent on the event id;
* the operator API, directly: target paused/resumed, a Bundle or full answer viewed, the audit
  trail itself read or exported.

Each row's `hash` is SHA-256 over the previous row's hash and the row's canonical content, so a
changed, removed or inserted row breaks the chain (`verify_chain`). Writers serialise on the one-row
`audit_head` table (an UPDATE takes the lock first, on SQLite and PostgreSQL alike). Rows hold ids,
FINESS numbers, sizes and hashes — never a Bundle or personal data. `purge` removes rows past
RELAIS_AUDIT_RETENTION_DAYS from the start of the chain only and keeps the chain verifiable.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError

from services.core.envelope import Emit, Record
from services.core.errors import TransientError
from services.tracker.ledger import Ledger, LedgerEvent, metadata

GENESIS = "0" * 64

audit_log = sa.Table(
    "audit_log", metadata,
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=False),
    sa.Column("time", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("kind", sa.String(64), nullable=False, index=True),
    sa.Column("actor_type", sa.String(16), nullable=False),  # producer | operator | system
    sa.Column("actor", sa.String(128), nullable=True, index=True),
    sa.Column("transfer_id", sa.String(64), nullable=True, index=True),
    sa.Column("target", sa.String(64), nullable=True),
    sa.Column("finess", sa.String(512), nullable=True),
    sa.Column("outcome", sa.String(16), nullable=False),  # success | failure
    sa.Column("detail", sa.JSON, nullable=True),
    sa.Column("event_id", sa.String(64), nullable=True, unique=True),  # the CloudEvents id when fed by events
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
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


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def row_hash(prev_hash: str, seq: int, time: datetime, kind: str, actor_type: str, actor: str | None,
             transfer_id: str | None, target: str | None, finess: str | None, outcome: str,
             detail: dict[str, Any] | None) -> str:
    """The chained hash of one row (canonical JSON; time in UTC, microseconds)."""
    content = orjson.dumps([seq, _aware(time).astimezone(UTC).isoformat(timespec="microseconds"), kind, actor_type,
                            actor, transfer_id, target, finess, outcome, detail or {}], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(prev_hash.encode() + content).hexdigest()


async def create_schema(ledger: Ledger) -> None:
    """The tables (Ledger.create_schema makes them too: they share its metadata) and the chain's head row."""
    await ledger.create_schema()
    async with ledger.engine.begin() as conn:
        if (await conn.execute(sa.select(audit_head.c.id))).first() is None:
            try:
                async with conn.begin_nested():
                    await conn.execute(audit_head.insert().values(id=1, seq=0, hash=GENESIS))
            except IntegrityError:
                pass  # another process created it first


async def append(ledger: Ledger, kind: str, *, actor_type: str, actor: str | None, outcome: str = "success",
                 transfer_id: str | None = None, target: str | None = None, finess: Sequence[str] = (),
                 detail: dict[str, Any] | None = None, event_id: str | None = None,
                 time: datetime | None = None) -> bool:
    """Append one row at the end of the chain; False when `event_id` was already recorded."""
    moment = (time or datetime.now(UTC)).astimezone(UTC)
    finess_text = ",".join(sorted({str(f) for f in finess})) or None
    clean = orjson.loads(orjson.dumps(detail or {}, default=str))
    try:
        async with ledger.engine.begin() as conn:
            bumped = await conn.execute(audit_head.update().where(audit_head.c.id == 1)
                                        .values(seq=audit_head.c.seq + 1))  # takes the writers' lock first
            if not bumped.rowcount:
                await conn.execute(audit_head.insert().values(id=1, seq=1, hash=GENESIS))
            seq, prev = (await conn.execute(sa.select(audit_head.c.seq, audit_head.c.hash)
                                            .where(audit_head.c.id == 1))).one()
            digest = row_hash(prev, seq, moment, kind, actor_type, actor, transfer_id, target, finess_text, outcome,
                              clean)
            await conn.execute(audit_log.insert().values(
                seq=seq, time=moment, kind=kind, actor_type=actor_type, actor=actor, transfer_id=transfer_id,
                target=target, finess=finess_text, outcome=outcome, detail=clean, event_id=event_id,
                prev_hash=prev, hash=digest))
            await conn.execute(audit_head.update().where(audit_head.c.id == 1).values(hash=digest))
        return True
    except IntegrityError as exc:
        if event_id is not None and await _has_event(ledger, event_id):
            return False  # already recorded: at-least-once input, exactly-once trail
        raise TransientError(f"audit trail write raced another writer; retrying: {exc}") from exc
    except (OperationalError, OSError) as exc:
        raise TransientError(f"audit trail database unavailable: {exc}") from exc


async def _has_event(ledger: Ledger, event_id: str) -> bool:
    async with ledger.engine.connect() as conn:
        return (await conn.execute(sa.select(audit_log.c.seq).where(audit_log.c.event_id == event_id))).first() \
            is not None


async def record_event(ledger: Ledger, ev: LedgerEvent) -> bool:
    """Append the audit row an event deserves (if any); idempotent on the event id."""
    outcome = AUDITED_EVENTS.get(ev.kind)
    if outcome is None:
        return False
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
    return await append(ledger, ev.kind, actor_type=actor_type, actor=actor, outcome=outcome,
                        transfer_id=ev.transfer_id, target=ev.target,
                        finess=[finess] if isinstance(finess, str) else list(finess),
                        detail=kept, event_id=ev.id, time=ev.time)


async def record_operator(ledger: Ledger, operator: str, action: str, *, transfer_id: str | None = None,
                          target: str | None = None, detail: dict[str, Any] | None = None) -> None:
    """An operator's action or read (pause, resume, payload viewed, audit exported ...)."""
    await append(ledger, f"operator.{action}", actor_type="operator", actor=operator, transfer_id=transfer_id,
                 target=target, detail=detail)


class AuditingTracker:
    """The tracker stage, also feeding the audit trail from each event (wraps services.tracker.stage)."""

    def __init__(self, inner: Any, ledger: Ledger) -> None:
        self.inner = inner
        self.ledger = ledger
        self.name: str = inner.name
        self.topics: Sequence[str] = inner.topics

    async def prepare(self, records: Sequence[Record]) -> None:
        """The ledger projection of a whole poll at once (see TrackerStage.prepare)."""
        await self.inner.prepare(records)

    async def handle(self, record: Record) -> Sequence[Emit]:
        """Project the event into the ledger, then into the audit trail (both idempotent)."""
        from services.tracker.stage import to_ledger_event

        emits: Sequence[Emit] = await self.inner.handle(record)
        await record_event(self.ledger, to_ledger_event(record))
        return emits


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
    return AuditEntry(r["seq"], _aware(r["time"]), r["kind"], r["actor_type"], r["actor"], r["transfer_id"],
                      r["target"], [f for f in (r["finess"] or "").split(",") if f], r["outcome"],
                      dict(r["detail"] or {}), r["prev_hash"], r["hash"])


async def verify_chain(ledger: Ledger) -> tuple[bool, int | None]:
    """(True, None) when every row hashes to what it says and links to its predecessor; else the first bad seq."""
    prev: str | None = None
    async with ledger.engine.connect() as conn:
        result = await conn.stream(sa.select(audit_log).order_by(audit_log.c.seq))
        async for r in result.mappings():
            if prev is not None and r["prev_hash"] != prev:
                return False, r["seq"]
            expected = row_hash(r["prev_hash"], r["seq"], r["time"], r["kind"], r["actor_type"], r["actor"],
                                r["transfer_id"], r["target"], r["finess"], r["outcome"], r["detail"])
            if expected != r["hash"]:
                return False, r["seq"]
            prev = r["hash"]
        head = (await conn.execute(sa.select(audit_head.c.hash))).first()
    if prev is not None and head is not None and head[0] != prev:
        return False, None
    return True, None


async def purge(ledger: Ledger, older_than: timedelta, *, now: datetime | None = None) -> int:
    """Remove rows older than `older_than` (retention); the oldest kept row's prev_hash anchors the chain."""
    cutoff = (now or datetime.now(UTC)) - older_than
    async with ledger.engine.begin() as conn:
        result = await conn.execute(audit_log.delete().where(audit_log.c.time < cutoff))
    return result.rowcount or 0
