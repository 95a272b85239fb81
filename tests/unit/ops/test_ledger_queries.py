"""Operator queries, operator state, retention and rebuild on a real ledger (SQLite here; PostgreSQL in
tests/integration/test_postgres.py, which runs these same tests)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import count
from typing import Any

import pytest
import sqlalchemy as sa

from services.tracker import opstate, queries
from services.tracker.ledger import Ledger, LedgerEvent, deliveries, events, transfers
from services.tracker.maintenance import purge

T0 = datetime(2025, 4, 1, 10, 0, 0, tzinfo=UTC)
_ids = count(1)


def ev(tid: str, kind: str, stage: str, second: float, *, target: str | None = None, attempt: int = 0,
       producer: str = "dui-a", **detail: Any) -> LedgerEvent:
    return LedgerEvent(id=f"e{next(_ids)}", transfer_id=tid, kind=kind, stage=stage,
                       time=T0 + timedelta(seconds=second), producer=producer, target=target, attempt=attempt,
                       detail=detail)


def story(tid: str, start: float, *, producer: str = "dui-a", targets: tuple[str, ...] = ("a",),
          fate: str = "delivered", finess: str | None = None, ms: float = 100.0) -> list[LedgerEvent]:
    """Events of one transfer: accepted, validated, routed, then per target `fate`."""
    extra = {"finess": [finess]} if finess else {}
    out = [ev(tid, "accepted", "ingress", start, producer=producer, targets=list(targets), size=1000),
           ev(tid, "validated", "validator", start + 0.1, producer=producer, **extra),
           ev(tid, "routed", "router", start + 0.2, producer=producer, targets=list(targets))]
    for target in targets:
        if fate == "delivered":
            out.append(ev(tid, "delivered", "delivery", start + 1, target=target, attempt=1, producer=producer,
                          http_status=201, duration_ms=ms, response={"resourceType": "Bundle"}))
        elif fate == "dead":
            out.append(ev(tid, "retry_scheduled", "delivery", start + 1, target=target, attempt=1,
                          producer=producer, http_status=503, duration_ms=ms, reason="HTTP 503"))
            out.append(ev(tid, "dead_lettered", "delivery", start + 2, target=target, attempt=2,
                          producer=producer, http_status=400, duration_ms=ms, reason="HTTP 400",
                          outcome={"resourceType": "OperationOutcome", "issue": [{"diagnostics": "INS Dupont"}]}))
        elif fate == "retrying":
            out.append(ev(tid, "retry_scheduled", "delivery", start + 1, target=target, attempt=1,
                          producer=producer, http_status=500, duration_ms=ms, reason="HTTP 500"))
    return out



async def seed(ledger: Ledger) -> None:
    evs = (story("t1", 0, targets=("a", "b"), finess="750000001")
           + story("t2", 10, producer="dui-b", targets=("b",), fate="dead", ms=900)
           + story("t3", 20, targets=("a",), fate="retrying")
           + story("t4", 30, targets=("a",), ms=300))
    for e in evs:
        await ledger.apply(e)


async def ids(ledger: Ledger, **flt: Any) -> list[str]:
    page = await queries.list_transfers(ledger, queries.TransferFilter(**flt), limit=100)
    return [t.id for t in page.items]


async def test_filters(ledger: Ledger) -> None:
    await seed(ledger)
    assert await ids(ledger) == ["t4", "t3", "t2", "t1"]
    assert await ids(ledger, status="dead-lettered") == ["t2"]
    assert await ids(ledger, status="delivering") == ["t3"]
    assert await ids(ledger, producer="dui-b") == ["t2"]
    assert await ids(ledger, target="b") == ["t2", "t1"]
    assert await ids(ledger, finess="750000001") == ["t1"]
    assert await ids(ledger, finess="999999999", finess_targets=("b",)) == ["t2", "t1"]
    assert await ids(ledger, since=T0 + timedelta(seconds=10), until=T0 + timedelta(seconds=25)) == ["t3", "t2"]
    # An offset-bearing bound means the same instant.
    paris = T0.astimezone(__import__("zoneinfo").ZoneInfo("Europe/Paris"))
    assert await ids(ledger, since=paris + timedelta(seconds=25)) == ["t4"]


async def test_cursor_pagination_walks_every_row_once(ledger: Ledger) -> None:
    for i in range(7):
        for e in story(f"p{i}", 100 if i < 4 else 200 + i):  # four share a created_at: ties broken by id
            await ledger.apply(e)
    seen: list[str] = []
    cursor = None
    while True:
        page = await queries.list_transfers(ledger, queries.TransferFilter(), cursor=cursor, limit=3)
        seen += [t.id for t in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == ["p6", "p5", "p4", "p3", "p2", "p1", "p0"]
    with pytest.raises(ValueError, match="cursor"):
        await queries.list_transfers(ledger, queries.TransferFilter(), cursor="garbage!")


async def test_timeline_hides_answers_unless_full(ledger: Ledger) -> None:
    await seed(ledger)
    tl = await queries.timeline(ledger, "t2")
    assert tl is not None and tl.status == "dead-lettered"
    assert [s.kind for s in tl.steps] == ["accepted", "validated", "routed", "retry_scheduled", "dead_lettered"]
    last = tl.steps[-1]
    assert last.detail == {"http_status": 400, "duration_ms": 900, "reason": "HTTP 400"}
    assert last.since_start_ms == 2000 and last.since_previous_ms == 1000
    assert "Dupont" not in str(tl.as_dict())
    full = await queries.timeline(ledger, "t2", full=True)
    assert full is not None and "Dupont" in str(full.as_dict())
    assert await queries.timeline(ledger, "nope") is None


async def test_target_health(ledger: Ledger) -> None:
    await seed(ledger)
    health = {h.target: h for h in await queries.target_health(ledger, ["a", "b", "c"], window=timedelta(days=1),
                                                               now=T0 + timedelta(hours=1))}
    a, b, c = health["a"], health["b"], health["c"]
    assert (a.attempts, a.delivered, a.waiting, a.dead_letters) == (3, 2, 1, 0)
    assert a.success_rate == pytest.approx(2 / 3, abs=1e-3) and a.p50_ms == 100 and a.p99_ms == 300
    assert (b.attempts, b.delivered, b.failed, b.dead_letters) == (3, 1, 2, 1) and b.health == "failing"
    assert c.health == "idle" and c.success_rate is None
    assert await queries.dlq_size(ledger) == 1
    assert queries.percentile([1, 2, 3, 4], 50) == 2 and queries.percentile([], 99) is None


async def test_overview(ledger: Ledger) -> None:
    await seed(ledger)
    over = await queries.overview(ledger, now=T0 + timedelta(minutes=30))
    assert over.by_status == {"delivered": 2, "dead-lettered": 1, "delivering": 1}
    assert (over.accepted_last_hour, over.delivered_last_hour, over.dlq_size) == (4, 3, 1)


async def test_pause_state_and_access_log(ledger: Ledger) -> None:
    assert await opstate.paused_targets(ledger) == frozenset()
    await opstate.set_paused(ledger, "a", True, by="alice", reason="maintenance")
    await opstate.set_paused(ledger, "b", True, by="alice")
    await opstate.set_paused(ledger, "b", False, by="bob")
    assert await opstate.paused_targets(ledger) == frozenset({"a"})
    states = await opstate.target_states(ledger)
    assert states["a"].reason == "maintenance" and states["b"].changed_by == "bob" and not states["b"].paused
    await opstate.record_access(ledger, "alice", "bundle.read", transfer_id="t1", target="a")
    entries = await opstate.access_entries(ledger, transfer_id="t1")
    assert [(e["operator"], e["action"], e["target"]) for e in entries] == [("alice", "bundle.read", "a")]


async def test_purge_removes_only_old_finished_transfers(ledger: Ledger) -> None:
    await seed(ledger)
    await opstate.record_access(ledger, "alice", "bundle.read", transfer_id="t1")
    # Everything is older than a day at T0 + 2 days, but t3 is still in flight: kept.
    purged = await purge(ledger, timedelta(days=1), now=datetime.now(UTC) + timedelta(days=2))
    assert (purged.transfers, purged.access_log) == (3, 1)
    assert await ids(ledger) == ["t3"]
    async with ledger.engine.connect() as conn:
        left = {r[0] for r in (await conn.execute(sa.select(events.c.transfer_id))).all()}
        left |= {r[0] for r in (await conn.execute(sa.select(deliveries.c.transfer_id))).all()}
    assert left == {"t3"}
    assert (await purge(ledger, timedelta(days=1), now=T0)).transfers == 0


async def test_indexes_exist(ledger: Ledger) -> None:
    def names(sync_conn: Any) -> set[str]:
        inspector = sa.inspect(sync_conn)
        return {i["name"] for t in (transfers, deliveries, events) for i in inspector.get_indexes(t.name)}

    async with ledger.engine.connect() as conn:
        found = await conn.run_sync(names)
    assert {"ix_transfers_created_id", "ix_deliveries_target_status", "ix_events_target_kind_time"} <= found
