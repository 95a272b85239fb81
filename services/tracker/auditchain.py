"""The audit trail's proof: verification from the genesis row, and the head anchored outside the database.

`verify_chain` walks the MAC chain (services.tracker.audit) from its genesis row and compares it with
anchors — heads (seq + MAC) the tracker wrote where the ledger database cannot rewrite them: the
structured log (`audit chain head`) and the compacted `audit.head` topic (`HeadAnchors`, read back by
`latest_anchor`). It names the first missing or altered sequence and says why.
"""

from __future__ import annotations

import contextlib
import hmac
import time as clock
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa

from services.core.bus import Bus
from services.core.embedded import EmbeddedBus
from services.core.envelope import JSON, Emit, Envelope, Record, new_id
from services.core.errors import TransientError
from services.core.logging import get_logger
from services.core.topics import AUDIT_HEAD
from services.tracker.audit import (
    GENESIS_KIND,
    PURGED_KIND,
    ZERO,
    audit_head,
    audit_log,
    key_of,
    mac_of,
    project_and_record,
    record_event,
)
from services.tracker.auditkey import AuditKey
from services.tracker.ledger import Ledger
from services.tracker.stage import TrackerStage, events_of, to_ledger_event

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Anchor:
    """The chain's head as written outside the database: its sequence and MAC, signed with the audit key."""

    seq: int
    mac: str
    origin: str | None = None  # the genesis row's MAC: a trail wiped and restarted does not descend from it

    def signature(self, key: AuditKey) -> str:
        """HMAC of the anchor, so a forged (e.g. older, lower) anchor cannot be planted without the key."""
        return key.mac(f"relais-audit-anchor|{self.seq}|{self.mac}|{self.origin or ''}".encode())


class HeadAnchors:
    """Writes the head every `every_s`: a log line and a record on the compacted `audit.head` topic."""

    def __init__(self, ledger: Ledger, every_s: float) -> None:
        self.ledger = ledger
        self.every_s = every_s
        self._next = 0.0
        self._last: Anchor | None = None

    async def due(self, *, force: bool = False) -> Emit | None:
        """The anchor record to publish, when the interval passed and the head moved; else None."""
        if not force and clock.monotonic() < self._next:
            return None
        self._next = clock.monotonic() + self.every_s
        async with self.ledger.engine.connect() as conn:
            last = (await conn.execute(sa.select(audit_log.c.seq, audit_log.c.hash)
                                       .order_by(audit_log.c.seq.desc()).limit(1))).first()
            origin = (await conn.execute(sa.select(audit_log.c.hash).where(audit_log.c.seq == 0))).scalar()
        if last is None:
            return None
        anchor = Anchor(int(last[0]), str(last[1]), origin)
        if anchor == self._last and not force:
            return None
        if self._last is not None and (anchor.seq < self._last.seq or anchor.origin != self._last.origin):
            # Someone removed rows (or restarted the trail) since the last anchor: say so loudly, and keep
            # the higher anchor authoritative (verify takes the highest; this lower one is not written).
            log.error("audit trail went backwards since the last anchor: rows were removed; run GET "
                      "/ops/audit/verify", anchored_seq=self._last.seq, head_seq=anchor.seq)
            return None
        self._last = anchor
        key = key_of(self.ledger)
        log.info("audit chain head", audit_seq=anchor.seq, audit_mac=anchor.mac)
        value = orjson.dumps({"seq": anchor.seq, "mac": anchor.mac, "origin": anchor.origin,
                              "sig": anchor.signature(key),
                              "time": datetime.now(UTC).isoformat()})
        env = Envelope(type="fr.relais.audit.head", source="/relais/tracker", transfer_id="audit-head", data=value,
                       content_type=JSON)
        # One key per UTC day: compaction keeps the day's newest anchor, and never lets a later (possibly
        # truncated) head replace the anchors of earlier days.
        return Emit(AUDIT_HEAD, f"audit-head-{datetime.now(UTC).date().isoformat()}".encode(), env)


async def latest_anchor(bus: Bus, key: AuditKey, *, settle_s: float = 10.0) -> Anchor | None:
    """The highest authentic anchor on the `audit.head` topic (None when there is none yet).

    A throwaway consumer group reads the (small, compacted) topic from the start; on Kafka joining takes
    a few seconds, hence `settle_s`; the embedded log answers at once.
    """
    sub = bus.subscribe(f"audit-verify-{new_id()}", [AUDIT_HEAD])
    best: Anchor | None = None
    immediate = isinstance(bus, EmbeddedBus)  # every record is readable at the first poll
    await sub.start()
    try:
        deadline = clock.monotonic() + settle_s
        seen = False
        while clock.monotonic() < deadline:
            records = await sub.poll(500, 0.3)
            if not records and (seen or immediate):
                break
            seen = seen or bool(records)
            for record in records:
                found = parse_anchor(record.envelope.data, key)
                if found is not None and (best is None or found.seq > best.seq):
                    best = found
    finally:
        await sub.stop()
    return best


def parse_anchor(data: bytes, key: AuditKey) -> Anchor | None:
    """The anchor in a record value, if it is one and its signature holds."""
    with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        body = orjson.loads(data)
        anchor = Anchor(int(body["seq"]), str(body["mac"]), body.get("origin"))
        if hmac.compare_digest(anchor.signature(key), str(body["sig"])):
            return anchor
    return None


class AuditingTracker:
    """The tracker stage, also feeding the audit trail from each event (wraps services.tracker.stage)
    and anchoring the chain's head outside the database every RELAIS_AUDIT_ANCHOR_S."""

    def __init__(self, inner: TrackerStage, ledger: Ledger, anchor_every_s: float = 60.0) -> None:
        self.inner = inner
        self.ledger = ledger
        self.name: str = inner.name
        self.topics: Sequence[str] = inner.topics
        self.anchors = HeadAnchors(ledger, anchor_every_s)
        self._audited: set[str] = set()  # event ids `prepare` already wrote into the trail

    async def prepare(self, records: Sequence[Record]) -> None:
        """The ledger projection and the audit rows of a whole poll, in one transaction.

        `handle` then only confirms them; when the database fails, `handle` projects and records each event
        on its own, as it would without this (a malformed event meets its fate there too).
        """
        evs = events_of(records)
        try:
            await project_and_record(self.ledger, evs)
        except TransientError:
            return
        self.inner.confirm(evs)
        # Added to, never reset: with the runner's lanes, records of an earlier poll may still be in hand.
        self._audited |= {ev.id for ev in evs}

    async def handle(self, record: Record) -> Sequence[Emit]:
        """Project the event into the ledger, then into the audit trail (both idempotent)."""
        emits: Sequence[Emit] = await self.inner.handle(record)
        if record.envelope.id in self._audited:  # an event's id is its envelope's: no need to read it again
            self._audited.discard(record.envelope.id)
        else:
            await record_event(self.ledger, to_ledger_event(record))
        anchor = await self.anchors.due()
        return [*emits, anchor] if anchor is not None else emits


# --- verifying ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    """What verification found: valid, or the first missing or altered sequence and why."""

    valid: bool
    first_bad_seq: int | None = None
    reason: str | None = None
    rows: int = 0
    last_seq: int | None = None
    anchor_seq: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"valid": self.valid, "first_bad_seq": self.first_bad_seq, "reason": self.reason, "rows": self.rows,
                "last_seq": self.last_seq, "anchor_seq": self.anchor_seq}


@dataclass
class _Walk:
    key: AuditKey
    anchors: dict[int, str]
    origins: set[str | None]
    resume: tuple[int, str] | None  # (purged through seq, MAC the chain resumes from)
    expected: int = 0
    prev: str = ZERO
    rows: int = 0
    purge_rows: set[int] = field(default_factory=set)

    def step(self, r: Any) -> tuple[int, str] | None:
        """(first bad seq, why) when row `r` breaks the chain, else None."""
        seq = int(r["seq"])
        if self.expected == 0:
            if seq != 0 or r["kind"] != GENESIS_KIND:
                return 0, "the genesis row (seq 0) is missing: the oldest rows were removed"
            if r["prev_hash"] != ZERO or mac_of(self.key, ZERO, r) != r["hash"]:
                return 0, "the genesis row was altered (or the trail was written with another key)"
            if any(origin not in (None, r["hash"]) for origin in self.origins):
                return 0, "the trail was wiped and restarted: its genesis row is not the one the anchored head " \
                          "descends from"
            purged = (r["detail"] or {}).get("purged_through")
            if isinstance(purged, int) and (self.resume is None or purged > self.resume[0]):
                self.resume = (purged, r["hash"])
        elif seq != self.expected:
            if not (self.expected == 1 and self.resume is not None and seq == self.resume[0] + 1):
                return self.expected, f"row {self.expected} is missing (the next row is {seq})"
            self.prev = self.resume[1]
        if seq != 0:
            if r["prev_hash"] != self.prev:
                return seq, f"row {seq} does not link to the row before it"
            if mac_of(self.key, self.prev, r) != r["hash"]:
                return seq, f"row {seq} was altered (its MAC does not match its content)"
        if seq in self.anchors and self.anchors[seq] != r["hash"]:
            return seq, f"row {seq} differs from the head anchored outside the database"
        if r["kind"] == PURGED_KIND:
            self.purge_rows.add(seq)
        self.prev, self.expected, self.rows = r["hash"], seq + 1, self.rows + 1
        return None


async def verify_chain(ledger: Ledger, anchors: Sequence[Anchor] = ()) -> Verdict:
    """Walk the chain from its genesis row; compare it with the heads anchored outside the database.

    Names the first missing or altered sequence: a removed oldest row (no genesis), a hole, a row whose
    MAC does not match (rewritten, even with the hashes recomputed without the key), or rows missing at
    the end (the newest anchor is past the last row).
    """
    key = key_of(ledger)
    async with ledger.engine.connect() as conn:
        resume = await _declared_purge(conn)
        # The database's own head row is a weak anchor (whoever rewrites rows can rewrite it too), but it
        # catches a careless truncation between two anchors.
        own = (await conn.execute(sa.select(audit_head.c.seq, audit_head.c.hash))).first()
        if own is not None:
            anchors = [*anchors, Anchor(int(own[0]), "")]  # its sequence only: its MAC proves nothing more
        walk = _Walk(key, {a.seq: a.mac for a in anchors if a.mac}, {a.origin for a in anchors}, resume)
        result = await conn.stream(sa.select(audit_log).order_by(audit_log.c.seq))
        async for r in result.mappings():
            bad = walk.step(r)
            if bad is not None:
                return _bad(walk, anchors, *bad)
    if walk.expected == 0:
        return _bad(walk, anchors, 0, "the audit trail is empty: its genesis row and every row after it are gone")
    last = walk.expected - 1
    newest = max((a.seq for a in anchors), default=None)
    if newest is not None and newest > last:
        return _bad(walk, anchors, last + 1, f"rows {last + 1}..{newest} are missing: the head anchored outside the "
                    f"database is at {newest}, the trail ends at {last}")
    return Verdict(True, rows=walk.rows, last_seq=last, anchor_seq=newest)


def _bad(walk: _Walk, anchors: Sequence[Anchor], seq: int, reason: str) -> Verdict:
    return Verdict(False, seq, reason, walk.rows, walk.expected - 1 if walk.expected else None,
                   max((a.seq for a in anchors), default=None))


async def _declared_purge(conn: Any) -> tuple[int, str] | None:
    """The newest `audit.purged` declaration (its MAC is checked when the walk reaches its row)."""
    rows = (await conn.execute(sa.select(audit_log.c.detail).where(audit_log.c.kind == PURGED_KIND)
                               .order_by(audit_log.c.seq.desc()).limit(1))).scalars().all()
    for detail in rows:
        through, resume = (detail or {}).get("through_seq"), (detail or {}).get("resume_mac")
        if isinstance(through, int) and isinstance(resume, str):
            return through, resume
    return None
