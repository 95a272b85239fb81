"""The ledger on a real SQLite file: projection, idempotence, late events, terminal states."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from services.tracker import audit
from services.tracker.auditkey import AuditKey
from services.tracker.ledger import Ledger, LedgerEvent, submissions

T0 = datetime(2025, 4, 1, 10, 0, 0, tzinfo=UTC)
TID = "tr-0001"
REJECTION = {"resourceType": "OperationOutcome", "issue": [
    {"severity": "error", "code": "required", "diagnostics": "INS missing",
     "expression": ["Bundle.entry[1].resource.identifier"]}]}
_ids = count(1)


def tx_response(location: str) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction-response",
            "entry": [{"response": {"status": "201 Created", "location": location}}]}


def ev(kind: str, stage: str, second: int, *, target: str | None = None, attempt: int = 0,
       detail: dict[str, Any] | None = None, event_id: str | None = None, transfer_id: str = TID,
       producer: str | None = "dui-acme") -> LedgerEvent:
    return LedgerEvent(id=event_id or f"evt-{next(_ids)}", transfer_id=transfer_id, kind=kind, stage=stage,
                       time=T0 + timedelta(seconds=second), producer=producer, target=target, attempt=attempt,
                       detail=detail)


def accepted(second: int = 0, **kw: Any) -> LedgerEvent:
    return ev("accepted", "ingress", second, detail={"targets": ["a", "b"], "size": 1234}, **kw)


def validated(second: int = 1, **kw: Any) -> LedgerEvent:
    return ev("validated", "validator", second, detail={"warnings": 0}, **kw)


def routed(second: int = 2, **kw: Any) -> LedgerEvent:
    return ev("routed", "router", second, detail={"targets": ["a", "b"]}, **kw)


def delivered(target: str, second: int, attempt: int = 1, http: int = 201) -> LedgerEvent:
    return ev("delivered", "delivery", second, target=target, attempt=attempt,
              detail={"http_status": http, "response": tx_response(f"Patient/{target}1/_history/1")})


async def apply_all(ledger: Ledger, *events: LedgerEvent) -> list[bool]:
    return [await ledger.apply(e) for e in events]


async def test_create_schema_is_idempotent_and_starts_empty(ledger: Ledger) -> None:
    await ledger.create_schema()
    assert await ledger.count_by_status() == {}
    assert await ledger.get(TID) is None


async def test_happy_path_ends_delivered_with_each_targets_response(ledger: Ledger) -> None:
    assert await apply_all(ledger, accepted(), validated(), routed(), delivered("a", 3),
                           delivered("b", 4, attempt=2, http=200)) == [True] * 5
    view = await ledger.get(TID)
    assert view is not None
    assert (view.status, view.stage_status) == ("delivered", "routed")
    assert view.producer == "dui-acme"
    assert view.targets == ["a", "b"]
    assert view.outcome is None
    assert view.created_at == T0 and view.updated_at == T0 + timedelta(seconds=4)
    assert view.created_at.tzinfo is not None
    by_target = {d.target: d for d in view.deliveries}
    assert [d.target for d in view.deliveries] == ["a", "b"]
    a, b = by_target["a"], by_target["b"]
    assert (a.status, a.attempts, a.last_http_status) == ("delivered", 1, 201)
    assert a.response == tx_response("Patient/a1/_history/1")
    assert (b.status, b.attempts, b.last_http_status) == ("delivered", 2, 200)
    assert b.response == tx_response("Patient/b1/_history/1")


@pytest.mark.parametrize(("events", "status", "stage"), [
    ([accepted], "accepted", "accepted"),
    ([accepted, validated], "validated", "validated"),
    ([accepted, validated, routed], "delivering", "routed"),
])
async def test_in_flight_statuses(ledger: Ledger, events: list[Any], status: str, stage: str) -> None:
    await apply_all(ledger, *(make() for make in events))
    view = await ledger.get(TID)
    assert view is not None
    assert (view.status, view.stage_status) == (status, stage)


async def test_in_flight_deliveries_start_pending(ledger: Ledger) -> None:
    await apply_all(ledger, accepted(), validated(), routed())
    view = await ledger.get(TID)
    assert view is not None
    assert [(d.target, d.status, d.attempts, d.response) for d in view.deliveries] == [
        ("a", "pending", 0, None), ("b", "pending", 0, None)]


async def test_same_event_twice_is_a_no_op(ledger: Ledger) -> None:
    await apply_all(ledger, accepted(), validated(), routed())
    first = delivered("a", 3)
    assert await ledger.apply(first) is True
    before = await ledger.get(TID)
    assert await ledger.apply(first) is False
    # Same id, different content (a replayed record): still ignored.
    assert await ledger.apply(ev("dead_lettered", "delivery", 9, target="a", attempt=5, event_id=first.id,
                                 detail={"http_status": 500})) is False
    assert await ledger.get(TID) == before
    assert await ledger.count_by_status() == {"delivering": 1}


async def test_validated_before_accepted_ends_right(ledger: Ledger) -> None:
    assert await apply_all(ledger, validated(1, producer=None), accepted(0)) == [True, True]
    view = await ledger.get(TID)
    assert view is not None
    assert (view.status, view.stage_status) == ("validated", "validated")
    assert view.producer == "dui-acme"
    assert view.targets == ["a", "b"]
    await apply_all(ledger, routed(), delivered("a", 3), delivered("b", 4))
    view = await ledger.get(TID)
    assert view is not None and view.status == "delivered"


async def test_late_accepted_keeps_created_at_earliest_and_updated_at_latest(ledger: Ledger) -> None:
    # The transfer was created when ingress accepted it, whichever event the tracker saw first;
    # and a late event must not move updated_at back in time.
    await apply_all(ledger, validated(5), accepted(0))
    view = await ledger.get(TID)
    assert view is not None
    assert view.created_at == T0
    assert view.updated_at == T0 + timedelta(seconds=5)


async def test_late_event_of_a_finished_delivery_does_not_overwrite_what_it_recorded(ledger: Ledger) -> None:
    # At-least-once: the delivered attempt is processed again and the target now answers 409;
    # the delivery stays delivered (ranks), so its recorded answer must stay the successful one.
    conflict = {"resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "duplicate", "diagnostics": "already exists"}]}
    await apply_all(ledger, accepted(), validated(), routed(), delivered("a", 3, attempt=3, http=201),
                    ev("dead_lettered", "delivery", 4, target="a", attempt=3,
                       detail={"http_status": 409, "outcome": conflict}))
    view = await ledger.get(TID)
    assert view is not None
    a = next(d for d in view.deliveries if d.target == "a")
    assert a.status == "delivered"
    assert (a.last_http_status, a.outcome) == (201, None)
    assert a.response == tx_response("Patient/a1/_history/1")


async def test_late_accepted_does_not_undo_routing_targets(ledger: Ledger) -> None:
    wider = ev("routed", "router", 2, detail={"targets": ["a", "b", "c"]})
    await apply_all(ledger, validated(), wider, accepted(0))
    view = await ledger.get(TID)
    assert view is not None
    assert view.targets == ["a", "b", "c"]
    assert view.stage_status == "routed"
    assert [d.target for d in view.deliveries] == ["a", "b", "c"]


async def test_delivered_before_routed_is_not_reset_to_pending(ledger: Ledger) -> None:
    await apply_all(ledger, accepted(), validated(), delivered("a", 3), routed(2), delivered("b", 4))
    view = await ledger.get(TID)
    assert view is not None
    assert view.status == "delivered"
    assert {d.target: d.status for d in view.deliveries} == {"a": "delivered", "b": "delivered"}


async def test_retry_then_dead_letter_ends_dead_lettered(ledger: Ledger) -> None:
    target_oo = {"resourceType": "OperationOutcome",
                 "issue": [{"severity": "error", "code": "transient", "diagnostics": "overloaded"}]}
    await apply_all(
        ledger, accepted(), validated(), routed(), delivered("a", 3),
        ev("retry_scheduled", "delivery", 4, target="b", attempt=1, detail={"http_status": 503}),
    )
    view = await ledger.get(TID)
    assert view is not None
    assert view.status == "delivering"
    b = next(d for d in view.deliveries if d.target == "b")
    assert (b.status, b.attempts, b.last_http_status) == ("retrying", 1, 503)

    await ledger.apply(ev("retry_scheduled", "delivery", 5, target="b", attempt=2,
                          detail={"http_status": 503}))
    await ledger.apply(ev("dead_lettered", "delivery", 6, target="b", attempt=3,
                          detail={"http_status": 503, "outcome": target_oo, "reason": "gave up"}))
    view = await ledger.get(TID)
    assert view is not None
    assert (view.status, view.stage_status) == ("dead-lettered", "routed")
    assert view.outcome is None
    by_target = {d.target: d for d in view.deliveries}
    assert by_target["a"].status == "delivered"
    assert (by_target["b"].status, by_target["b"].attempts, by_target["b"].last_http_status) == (
        "dead-lettered", 3, 503)
    assert by_target["b"].outcome == target_oo


async def test_replayed_dead_letter_goes_back_in_flight(ledger: Ledger) -> None:
    await apply_all(ledger, accepted(), validated(), routed(), delivered("a", 3),
                    ev("dead_lettered", "delivery", 4, target="b", attempt=1, detail={"http_status": 422}))
    assert (await ledger.get(TID)).status == "dead-lettered"  # type: ignore[union-attr]
    await ledger.apply(ev("replayed", "ops", 5, target="b", attempt=1))
    view = await ledger.get(TID)
    assert view is not None and view.status == "delivering"
    await ledger.apply(delivered("b", 6, attempt=2))
    assert (await ledger.get(TID)).status == "delivered"  # type: ignore[union-attr]


async def test_rejected_stores_the_outcome(ledger: Ledger) -> None:
    await apply_all(ledger, accepted(),
                    ev("rejected", "validator", 1, detail={"errors": 1, "outcome": REJECTION}),
                    validated(2))  # a stray late event cannot resurrect it
    view = await ledger.get(TID)
    assert view is not None
    assert (view.status, view.stage_status) == ("rejected", "rejected")
    assert view.outcome == REJECTION
    assert view.deliveries == []


async def test_failed_stage_gets_a_generated_outcome(ledger: Ledger) -> None:
    await apply_all(ledger, accepted(), ev("failed", "validator", 1, detail={"reason": "KeyError: 'x'"}))
    view = await ledger.get(TID)
    assert view is not None
    assert view.status == "dead-lettered"
    assert view.outcome is not None and view.outcome["resourceType"] == "OperationOutcome"
    diagnostics = view.outcome["issue"][0]["diagnostics"]
    assert "validator" in diagnostics and "KeyError" in diagnostics


async def test_get_unknown_is_none(ledger: Ledger) -> None:
    await ledger.apply(accepted())
    assert await ledger.get("no-such-transfer") is None


async def test_count_by_status(ledger: Ledger) -> None:
    await apply_all(
        ledger,
        accepted(transfer_id="t1"), accepted(transfer_id="t2"), accepted(transfer_id="t3"),
        validated(transfer_id="t2"),
        ev("rejected", "validator", 1, transfer_id="t3", detail={"outcome": REJECTION}),
        accepted(transfer_id="t4"), validated(transfer_id="t4"), routed(transfer_id="t4"),
        accepted(transfer_id="t5"),
    )
    assert await ledger.count_by_status() == {"accepted": 2, "validated": 1, "rejected": 1, "delivering": 1}


async def test_ledger_survives_reopening(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/l.db"
    first = Ledger(url)
    await first.create_schema()
    await apply_all(first, accepted(), validated())
    await first.close()
    await first.close()  # safe twice
    second = Ledger(url)
    try:
        await second.create_schema()
        view = await second.get(TID)
        assert view is not None and view.status == "validated"
        assert await second.apply(validated(1, event_id="dup")) is True
        assert await second.apply(validated(1, event_id="dup")) is False
    finally:
        await second.close()


async def test_schema_creation_is_safe_when_processes_start_together(tmp_path: Path) -> None:
    """Ingress, tracker and delivery each create the schema at start; on one file they race."""
    import asyncio

    from services.tracker import audit  # noqa: F401 - registers the audit tables on the shared metadata

    for round_no in range(5):
        url = f"sqlite+aiosqlite:///{tmp_path}/race-{round_no}.db"
        ledgers = [Ledger(url) for _ in range(6)]
        try:
            await asyncio.gather(*(ledger.create_schema() for ledger in ledgers))
            assert await ledgers[0].get("nothing") is None  # the schema is there and usable
        finally:
            await asyncio.gather(*(ledger.close() for ledger in ledgers))


async def test_submissions_have_their_own_sqlite_file_and_old_rows_move_there(tmp_path: Path) -> None:
    """Ingress's submissions are written where no worker writes (SQLite: one writer per file); a ledger
    from before keeps its rows: they move to the new file once, and leave the ledger file."""
    import sqlite3

    old = tmp_path / "ledger.db"
    with sqlite3.connect(old) as db:
        db.execute("CREATE TABLE submissions (transfer_id VARCHAR(64) PRIMARY KEY, producer VARCHAR(128) NOT NULL, "
                   "idem_key VARCHAR(320), fingerprint VARCHAR(64) NOT NULL, state VARCHAR(16) NOT NULL, "
                   "created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL)")
        db.execute("INSERT INTO submissions VALUES ('t-old', 'dui', 'h:k', 'f', 'published', "
                   "'2026-12-01 10:00:00.000000', '2026-12-01 10:00:00.000000')")
    ledger = Ledger(f"sqlite+aiosqlite:///{old}")
    await ledger.create_schema()
    await ledger.create_schema()  # a second process starting: nothing moves twice, nothing breaks
    try:
        async with ledger.submissions_engine.connect() as conn:
            rows = (await conn.execute(sa.select(submissions.c.transfer_id, submissions.c.idem_key))).all()
    finally:
        await ledger.close()
    assert [tuple(r) for r in rows] == [("t-old", "h:k")]
    assert (tmp_path / "ledger.submissions.db").exists()
    with sqlite3.connect(old) as db:
        assert db.execute("SELECT count(*) FROM sqlite_master WHERE name='submissions'").fetchone() == (0,)


def _story(rng: Any) -> list[LedgerEvent]:
    """A shuffled, partly replayed stream of events about a few transfers and two targets, as polls see it."""
    stream: list[LedgerEvent] = []
    for n in range(rng.randint(2, 5)):
        tid = f"tr-{n}"
        targets = rng.sample(["a", "b"], rng.randint(1, 2))
        own = [ev("accepted", "ingress", 0, transfer_id=tid, detail={"targets": targets, "size": 10 + n}),
               ev("validated", "validator", 1, transfer_id=tid,
                  detail={"warnings": 0, "identifiers": [f"{n:064d}", f"{n + 7:064d}"], "finess": [f"75000000{n}"]})]
        if rng.random() < 0.2:
            own.append(ev("rejected", "validator", 1, transfer_id=tid, detail={"outcome": REJECTION}))
        else:
            own.append(ev("routed", "router", 2, transfer_id=tid, detail={"targets": targets}))
            for target in targets:
                attempts = rng.randint(1, 3)
                for attempt in range(1, attempts):
                    own.append(ev("retry_scheduled", "delivery", 2 + attempt, transfer_id=tid, target=target,
                                  attempt=attempt, detail={"http_status": 503}))
                end = rng.choice(["delivered", "delivered", "dead_lettered"])
                own.append(ev(end, "delivery", 2 + attempts, transfer_id=tid, target=target, attempt=attempts,
                              detail={"http_status": 201 if end == "delivered" else 500,
                                      "response": tx_response(f"Patient/{n}")}))
                if end == "dead_lettered" and rng.random() < 0.5:
                    own.append(ev("replayed", "ops", 9, transfer_id=tid, target=target, detail={"by": "otto"}))
        if rng.random() < 0.7:  # a stage's dead letter and its replay: order-sensitive (the replay rewinds)
            own.append(ev("failed", "router", 3, transfer_id=tid, detail={"reason": "boom"}))
            own.append(ev(rng.choice(["replayed", "discarded"]), "ops", 8, transfer_id=tid,
                          detail={"slot": "@router", "failed_stage": "router"}))
        stream += own
    rng.shuffle(stream)  # stages publish independently: a poll sees their events in any order
    for again in rng.sample(stream, len(stream) // 3):  # at-least-once: some come again, soon or much later
        at = stream.index(again) + rng.randint(1, 6) if rng.random() < 0.7 else len(stream)
        stream.insert(min(at, len(stream)), again)
    return stream


async def _tables(ledger: Ledger) -> dict[str, list[tuple[Any, ...]]]:
    from services.tracker.ledger import deliveries, events, stage_dead_letters, transfer_identifiers, transfers

    dump = {}
    async with ledger.engine.connect() as conn:
        for table in (transfers, deliveries, events, stage_dead_letters, transfer_identifiers):
            rows = (await conn.execute(sa.select(table))).all()
            dump[table.name] = sorted(tuple(map(repr, r)) for r in rows)
    return dump


@pytest.mark.parametrize("seed", range(30))
async def test_a_poll_applied_at_once_projects_what_its_events_one_by_one_do(tmp_path: Path, seed: int) -> None:
    import random

    stream = _story(random.Random(seed))
    one_by_one, batched = Ledger(f"sqlite+aiosqlite:///{tmp_path}/a.db"), Ledger(f"sqlite+aiosqlite:///{tmp_path}/b.db")
    for ledger in (one_by_one, batched):
        audit.bind(ledger, AuditKey(b"k" * 32, "test"))  # one key: equal search keys
    try:
        await one_by_one.create_schema()
        await batched.create_schema()
        for e in stream:
            await one_by_one.apply(e)
        rng, start = random.Random(seed + 1000), 0
        while start < len(stream):  # polls of random sizes, replays included
            size = rng.randint(1, 12)
            await batched.apply_many(stream[start:start + size])
            start += size
        assert await _tables(batched) == await _tables(one_by_one)
    finally:
        await one_by_one.close()
        await batched.close()
