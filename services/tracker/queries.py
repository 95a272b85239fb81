"""Operator queries on the ledger: transfer lists, a transfer's timeline, per-target health, DLQ size.

Read-only, and never personal data: a timeline carries stages, attempts, durations, HTTP statuses and
reasons; the targets' full answers (OperationOutcome, transaction-response) only when the caller asks
for them (`full=True`), and the API records that access.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import sqlalchemy as sa

from services.core.clock import aware
from services.core.identifiers import digest
from services.core.outcome import issues_of
from services.tracker import logic
from services.tracker.ledger import Ledger, deliveries, events, stage_dead_letters, transfer_identifiers, transfers

# Event detail fields that are operational facts, shown in every timeline.
SAFE_DETAIL = ("http_status", "duration_ms", "reason", "not_before", "attempts", "operator", "note", "targets",
               "size", "entries", "replay", "probe", "warnings", "added_by_routes", "topic")
WAITING = (logic.PENDING, logic.RETRYING)
ATTEMPT_KINDS = ("delivered", "delivered_unconfirmed", "retry_scheduled", "dead_lettered")
SUCCESS_KINDS = ("delivered", "delivered_unconfirmed")
FAILURE_KINDS = ("retry_scheduled", "dead_lettered")
DOWN_AFTER_FAILURES = 3  # consecutive failed attempts (no success since) that make a target "down"


@dataclass(frozen=True, slots=True)
class TransferFilter:
    """Which transfers an operator wants; None does not constrain."""

    status: str | None = None
    producer: str | None = None
    target: str | None = None
    finess: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    # Targets whose configured FINESS is the one asked for: their transfers match too.
    finess_targets: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TransferRow:
    """One line of the transfers list."""

    id: str
    producer: str | None
    status: str
    targets: list[str]
    size: int | None
    created_at: datetime
    updated_at: datetime

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"id": self.id, "producer": self.producer, "status": self.status, "targets": self.targets,
                "size": self.size, "created_at": self.created_at.isoformat(),
                "updated_at": self.updated_at.isoformat()}


@dataclass(frozen=True, slots=True)
class Page:
    """A page of transfers, newest first, and the cursor of the next one (None: last page)."""

    items: list[TransferRow]
    next_cursor: str | None


def encode_cursor(created_at: datetime, transfer_id: str) -> str:
    """An opaque cursor pointing after this row."""
    return base64.urlsafe_b64encode(orjson.dumps([aware(created_at).isoformat(), transfer_id])).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) a cursor points after; ValueError when it is not one of ours."""
    try:
        raw = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return aware(datetime.fromisoformat(raw[0])), str(raw[1])
    except (ValueError, TypeError, IndexError, orjson.JSONDecodeError) as exc:
        raise ValueError("invalid cursor: use the next_cursor of a previous page") from exc


def _utc(moment: datetime) -> datetime:
    return aware(moment).astimezone(UTC)


async def list_transfers(ledger: Ledger, flt: TransferFilter, *, cursor: str | None = None,
                         limit: int = 50) -> Page:
    """Transfers matching `flt`, newest first, `limit` at a time (keyset pagination on created_at, id)."""
    query = sa.select(transfers.c.id, transfers.c.producer, transfers.c.status, transfers.c.targets,
                      transfers.c.size, transfers.c.created_at, transfers.c.updated_at)
    if flt.status:
        query = query.where(transfers.c.status == flt.status)
    if flt.producer:
        query = query.where(transfers.c.producer == flt.producer)
    if flt.target:
        query = query.where(sa.exists().where((deliveries.c.transfer_id == transfers.c.id)
                                              & (deliveries.c.target == flt.target)))
    if flt.finess:
        cond: sa.ColumnElement[bool] = transfers.c.finess.like(f"%,{flt.finess},%")
        if flt.finess_targets:
            cond = cond | sa.exists().where((deliveries.c.transfer_id == transfers.c.id)
                                            & deliveries.c.target.in_(flt.finess_targets))
        query = query.where(cond)
    if flt.since:
        query = query.where(transfers.c.created_at >= _utc(flt.since))
    if flt.until:
        query = query.where(transfers.c.created_at <= _utc(flt.until))
    if cursor:
        at, after_id = decode_cursor(cursor)
        at = _utc(at)
        query = query.where((transfers.c.created_at < at)
                            | ((transfers.c.created_at == at) & (transfers.c.id < after_id)))
    query = query.order_by(transfers.c.created_at.desc(), transfers.c.id.desc()).limit(limit + 1)
    async with ledger.engine.connect() as conn:
        rows = (await conn.execute(query)).mappings().all()
    items = [TransferRow(r["id"], r["producer"], r["status"], list(r["targets"] or []), r["size"],
                         aware(r["created_at"]), aware(r["updated_at"])) for r in rows[:limit]]
    more = len(rows) > limit
    return Page(items, encode_cursor(items[-1].created_at, items[-1].id) if more and items else None)


@dataclass(frozen=True, slots=True)
class Step:
    """One event of a transfer's timeline."""

    time: datetime
    kind: str
    stage: str
    target: str | None
    attempt: int
    since_start_ms: float
    since_previous_ms: float
    detail: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"time": self.time.isoformat(), "kind": self.kind, "stage": self.stage, "target": self.target,
                "attempt": self.attempt, "since_start_ms": self.since_start_ms,
                "since_previous_ms": self.since_previous_ms, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class Timeline:
    """What happened to one transfer, stage by stage and target by target."""

    id: str
    producer: str | None
    status: str
    created_at: datetime
    updated_at: datetime
    steps: list[Step]
    deliveries: list[dict[str, Any]]
    full: bool = False
    issues: list[dict[str, Any]] = field(default_factory=list)  # the validator's errors and warnings

    @property
    def duration_ms(self) -> float:
        """From the first fact to the latest one."""
        return round((self.updated_at - self.created_at).total_seconds() * 1000, 1)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"id": self.id, "producer": self.producer, "status": self.status,
                "created_at": self.created_at.isoformat(), "updated_at": self.updated_at.isoformat(),
                "duration_ms": self.duration_ms, "deliveries": self.deliveries,
                "steps": [s.as_dict() for s in self.steps], "full": self.full, "issues": self.issues}


def _shown(detail: dict[str, Any] | None, full: bool) -> dict[str, Any]:
    detail = detail or {}
    if full:
        return {k: v for k, v in detail.items() if k not in ("blob", "extra", "key", "identifiers")}
    return {k: detail[k] for k in SAFE_DETAIL if detail.get(k) is not None}


async def timeline(ledger: Ledger, transfer_id: str, *, full: bool = False) -> Timeline | None:
    """The transfer's timeline, or None when the ledger has not seen it."""
    async with ledger.engine.connect() as conn:
        row = (await conn.execute(sa.select(transfers).where(transfers.c.id == transfer_id))).mappings().first()
        if row is None:
            return None
        evs = (await conn.execute(sa.select(events).where(events.c.transfer_id == transfer_id)
                                  .order_by(events.c.time, events.c.attempt))).mappings().all()
        dls = (await conn.execute(sa.select(deliveries).where(deliveries.c.transfer_id == transfer_id)
                                  .order_by(deliveries.c.target))).mappings().all()
    steps: list[Step] = []
    start = aware(evs[0]["time"]) if evs else aware(row["created_at"])
    previous = start
    for e in evs:
        at = aware(e["time"])
        steps.append(Step(at, e["kind"], e["stage"], e["target"], e["attempt"],
                          round((at - start).total_seconds() * 1000, 1),
                          round((at - previous).total_seconds() * 1000, 1), _shown(e["detail"], full)))
        previous = at
    shown_deliveries = []
    for d in dls:
        item: dict[str, Any] = {"target": d["target"], "status": d["status"], "attempts": d["attempts"],
                                "last_http_status": d["last_http_status"],
                                "updated_at": aware(d["updated_at"]).isoformat()}
        if full:
            item |= {"response": d["response"], "outcome": d["outcome"], "assigned": d["assigned"]}
        shown_deliveries.append(item)
    issues = [issue for e in evs if e["kind"] in ("rejected", "validated")
              for issue in issues_of((e["detail"] or {}).get("outcome"))]
    return Timeline(row["id"], row["producer"], row["status"], aware(row["created_at"]), aware(row["updated_at"]),
                    steps, shown_deliveries, full, issues)


@dataclass(frozen=True, slots=True)
class TargetHealth:
    """One target as the ledger sees it over a recent window."""

    target: str
    attempts: int
    delivered: int
    failed: int
    success_rate: float | None  # None: no attempt in the window
    p50_ms: float | None
    p99_ms: float | None
    waiting: int
    dead_letters: int
    last_http_status: int | None = None
    last_attempt_at: datetime | None = None
    failures_since_success: int = 0  # consecutive failed attempts since the latest success (any age)
    down_since: datetime | None = None  # the first of those failures
    last_error: str | None = None  # the latest failure's reason
    oldest_waiting_at: datetime | None = None  # when the oldest pending/retrying record was accepted

    @property
    def down(self) -> bool:
        """Its latest attempts all failed (DOWN_AFTER_FAILURES or more since the last success)."""
        return self.failures_since_success >= DOWN_AFTER_FAILURES

    @property
    def health(self) -> str:
        """down, ok, degraded, failing or idle — the dashboard's colour."""
        if self.down:
            return "down"
        if self.success_rate is None:
            return "failing" if self.dead_letters and self.waiting else "idle"
        if self.success_rate >= 0.95:
            return "ok"
        return "degraded" if self.success_rate >= 0.5 else "failing"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"target": self.target, "health": self.health, "attempts": self.attempts,
                "delivered": self.delivered, "failed": self.failed, "success_rate": self.success_rate,
                "p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "waiting": self.waiting,
                "dead_letters": self.dead_letters, "last_http_status": self.last_http_status,
                "last_attempt_at": self.last_attempt_at.isoformat() if self.last_attempt_at else None,
                "down": self.down, "failures_since_success": self.failures_since_success,
                "down_since": self.down_since.isoformat() if self.down_since else None,
                "last_error": self.last_error,
                "oldest_waiting_at": self.oldest_waiting_at.isoformat() if self.oldest_waiting_at else None}


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


async def target_health(ledger: Ledger, targets: Sequence[str], *, window: timedelta = timedelta(hours=1),
                        now: datetime | None = None) -> list[TargetHealth]:
    """Success rate and latency of attempts in `window`, waiting records and dead letters, per target."""
    since = (now or datetime.now(UTC)) - window
    async with ledger.engine.connect() as conn:
        attempts = (await conn.execute(
            sa.select(events.c.target, events.c.kind, events.c.time, events.c.detail)
            .where(events.c.kind.in_(ATTEMPT_KINDS) & (events.c.time >= since) & events.c.target.is_not(None))
            .order_by(events.c.time))).all()
        counts = (await conn.execute(
            sa.select(deliveries.c.target, deliveries.c.status, sa.func.count())
            .where(deliveries.c.status.in_((*WAITING, logic.DEAD_LETTERED)))
            .group_by(deliveries.c.target, deliveries.c.status))).all()
    waiting: dict[str, int] = {}
    dead: dict[str, int] = {}
    for target, status, n in counts:
        if status == logic.DEAD_LETTERED:
            dead[target] = dead.get(target, 0) + n
        else:
            waiting[target] = waiting.get(target, 0) + n
    per: dict[str, dict[str, Any]] = {}
    for target, kind, at, detail in attempts:
        detail = detail or {}
        if kind == "dead_lettered" and detail.get("http_status") is None and detail.get("duration_ms") is None:
            continue  # dead-lettered without an attempt (unknown target, claim check): not the target's doing
        s = per.setdefault(target, {"ok": 0, "ko": 0, "ms": [], "last": None, "at": None})
        s["ok" if kind in ("delivered", "delivered_unconfirmed") else "ko"] += 1
        if isinstance(detail.get("duration_ms"), int | float):
            s["ms"].append(float(detail["duration_ms"]))
        s["last"], s["at"] = detail.get("http_status"), aware(at)
    out = []
    names = sorted(set(targets) | set(per) | set(waiting) | set(dead))
    streaks = await _failure_streaks(ledger, names)
    oldest = await _oldest_waiting(ledger)
    for target in names:
        s = per.get(target, {"ok": 0, "ko": 0, "ms": [], "last": None, "at": None})
        total = s["ok"] + s["ko"]
        failures, down_since, last_error = streaks.get(target, (0, None, None))
        out.append(TargetHealth(target, total, s["ok"], s["ko"], round(s["ok"] / total, 4) if total else None,
                                percentile(s["ms"], 50), percentile(s["ms"], 99), waiting.get(target, 0),
                                dead.get(target, 0), s["last"], s["at"], failures, down_since, last_error,
                                oldest.get(target)))
    return out


def _attempted(detail: dict[str, Any] | None) -> bool:
    """False for a dead letter without an attempt (unknown target, claim check): not the target's doing."""
    detail = detail or {}
    return detail.get("http_status") is not None or detail.get("duration_ms") is not None


async def _failure_streaks(ledger: Ledger, targets: Sequence[str],
                           cap: int = 100) -> dict[str, tuple[int, datetime | None, str | None]]:
    """Per target: failed attempts since its latest success (up to `cap`), the first one's time, the last reason."""
    out: dict[str, tuple[int, datetime | None, str | None]] = {}
    async with ledger.engine.connect() as conn:
        successes = dict((await conn.execute(
            sa.select(events.c.target, sa.func.max(events.c.time))
            .where(events.c.kind.in_(SUCCESS_KINDS) & events.c.target.in_(targets))
            .group_by(events.c.target))).all())
        for target in targets:
            query = (sa.select(events.c.time, events.c.detail)
                     .where((events.c.target == target) & events.c.kind.in_(FAILURE_KINDS)))
            if successes.get(target) is not None:
                query = query.where(events.c.time > successes[target])
            rows = [r for r in (await conn.execute(query.order_by(events.c.time.desc()).limit(cap))).all()
                    if _attempted(r[1])]
            if rows:
                last = rows[0][1] or {}
                reason = str(last.get("reason") or "")
                status = last.get("http_status")
                out[target] = (len(rows), aware(rows[-1][0]), f"HTTP {status}: {reason}" if status else reason)
    return out


async def _oldest_waiting(ledger: Ledger) -> dict[str, datetime]:
    """Per target: when the oldest transfer still waiting for it (pending or retrying) was accepted."""
    async with ledger.engine.connect() as conn:
        rows = (await conn.execute(
            sa.select(deliveries.c.target, sa.func.min(transfers.c.created_at))
            .join(transfers, transfers.c.id == deliveries.c.transfer_id)
            .where(deliveries.c.status.in_(WAITING)).group_by(deliveries.c.target))).all()
    return {t: aware(at) for t, at in rows if at is not None}


async def dlq_size(ledger: Ledger) -> int:
    """Dead letters of every stage not yet replayed or discarded."""
    async with ledger.engine.connect() as conn:
        deliveries_dead = (await conn.execute(sa.select(sa.func.count()).select_from(deliveries)
                                              .where(deliveries.c.status == logic.DEAD_LETTERED))).scalar_one()
        stages_dead = (await conn.execute(sa.select(sa.func.count()).select_from(stage_dead_letters)
                                          .where(stage_dead_letters.c.status == logic.DEAD_LETTERED))).scalar_one()
    return int(deliveries_dead) + int(stages_dead)


@dataclass(frozen=True, slots=True)
class Overview:
    """The dashboard's first screen, as numbers."""

    by_status: dict[str, int]
    accepted_last_hour: int
    delivered_last_hour: int
    dlq_size: int
    window_s: float = 3600.0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"by_status": self.by_status, "accepted_last_hour": self.accepted_last_hour,
                "delivered_last_hour": self.delivered_last_hour, "dlq_size": self.dlq_size}


async def overview(ledger: Ledger, *, now: datetime | None = None) -> Overview:
    """Transfers per status, throughput over the last hour and the dead-letter count."""
    since = (now or datetime.now(UTC)) - timedelta(hours=1)
    async with ledger.engine.connect() as conn:
        by_status = {s: n for s, n in (await conn.execute(
            sa.select(transfers.c.status, sa.func.count()).group_by(transfers.c.status))).all()}
        accepted = (await conn.execute(sa.select(sa.func.count()).select_from(transfers)
                                       .where(transfers.c.created_at >= since))).scalar_one()
        delivered = (await conn.execute(sa.select(sa.func.count()).select_from(events)
                                        .where((events.c.kind == "delivered") & (events.c.time >= since))))\
            .scalar_one()
    return Overview(by_status, int(accepted), int(delivered), await dlq_size(ledger))


async def find_by_identifier(ledger: Ledger, value: str, *, limit: int = 100) -> list[TransferRow]:
    """Transfers whose Bundle carried this business identifier value (Bundle.identifier or a resource's)."""
    query = (sa.select(transfers.c.id, transfers.c.producer, transfers.c.status, transfers.c.targets,
                       transfers.c.size, transfers.c.created_at, transfers.c.updated_at)
             .join(transfer_identifiers, transfer_identifiers.c.transfer_id == transfers.c.id)
             .where(transfer_identifiers.c.digest == ledger.search_digest(digest(value)))
             .order_by(transfers.c.created_at.desc()).limit(limit))
    async with ledger.engine.connect() as conn:
        rows = (await conn.execute(query)).mappings().all()
    return [TransferRow(r["id"], r["producer"], r["status"], list(r["targets"] or []), r["size"],
                        aware(r["created_at"]), aware(r["updated_at"])) for r in rows]
