"""The audit trail: append-only rows from events and operator actions, hash-chained, exported as AuditEvents;
the auditing tracker writes a poll's rows in one transaction, chained as one by one would be.

Against someone who can write to the ledger database but does not hold the audit key, each tampering must
make verify answer invalid and name the first missing or altered sequence. The module runs again on
PostgreSQL (tests/integration/test_postgres.py overrides `ledger`).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa

from services.core.embedded import EmbeddedBus
from services.core.errors import ConfigurationError
from services.core.settings import Settings
from services.ops.audit_api import audit_event
from services.tracker import audit, auditchain
from services.tracker.auditkey import new_audit_key, parse_audit_key
from services.tracker.ledger import Ledger, LedgerEvent
from services.tracker.stage import TrackerStage
from tests.unit.tracker.test_stage import event_record

ROWS = 50


@pytest.fixture
async def new_trail(ledger: Ledger) -> Ledger:
    """The ledger's audit trail opened: the genesis row, chained under a fresh key kept outside the database."""
    await audit.open_trail(ledger, Settings(database_url=ledger.url, audit_key=new_audit_key()))
    return ledger


@pytest.fixture
async def trail(new_trail: Ledger) -> Ledger:
    """What a tamperer finds: a trail of ROWS operator rows."""
    for n in range(1, ROWS + 1):
        await audit.record_operator(new_trail, "alice", "pause", target=f"target-{n}")
    return new_trail


def accepted(event_id: str = "ev-1") -> LedgerEvent:
    return LedgerEvent(id=event_id, transfer_id="t-1", kind="accepted", stage="ingress", time=datetime.now(UTC),
                       producer="dui-a", detail={"targets": ["essms-a"], "size": 1234, "sha256": "ab" * 32,
                                                 "finess": ["990000001"], "auth": "mtls", "cert": "cd" * 32})


async def test_events_and_operator_actions_are_chained_and_idempotent(new_trail: Ledger) -> None:
    assert await audit.record_event(new_trail, accepted())
    assert not await audit.record_event(new_trail, accepted())  # replayed event: recorded once
    assert not await audit.record_event(new_trail, LedgerEvent(id="x", transfer_id="t-1", kind="validated",
                                                            stage="validator", time=datetime.now(UTC)))
    await audit.record_event(new_trail, LedgerEvent(id="ev-2", transfer_id="t-1", kind="delivered", stage="delivery",
                                                 time=datetime.now(UTC), target="essms-a", attempt=1,
                                                 detail={"http_status": 200, "response": {"secret": 1}}))
    await audit.record_operator(new_trail, "alice", "bundle.read", transfer_id="t-1", target="essms-a")
    items, cursor = await audit.entries(new_trail, limit=2)
    assert [i.kind for i in items] == ["operator.bundle.read", "delivered"] and cursor
    rest, end = await audit.entries(new_trail, cursor=cursor)
    assert [i.kind for i in rest] == ["accepted", "audit.genesis"] and end is None  # the chain starts at seq 0
    first = rest[0]
    assert first.actor == "dui-a" and first.actor_type == "producer" and first.finess == ["990000001"]
    assert first.detail["sha256"] == "ab" * 32 and first.detail["auth"] == "mtls"
    assert "response" not in items[1].detail  # a target's answer never goes into the trail
    only, _ = await audit.entries(new_trail, audit.AuditFilter(finess="990000001"))
    assert [i.kind for i in only] == ["accepted"]
    assert (await auditchain.verify_chain(new_trail)).valid

    async with new_trail.engine.begin() as conn:  # someone edits history ...
        await conn.execute(audit.audit_log.update().where(audit.audit_log.c.seq == 2).values(target="elsewhere"))
    verdict = await auditchain.verify_chain(new_trail)
    assert not verdict.valid and verdict.first_bad_seq == 2


async def test_deleting_a_row_breaks_the_chain(new_trail: Ledger) -> None:
    for n in range(3):
        await audit.record_operator(new_trail, "alice", "pause", target=f"t{n}")
    async with new_trail.engine.begin() as conn:
        await conn.execute(sa.delete(audit.audit_log).where(audit.audit_log.c.seq == 2))
    verdict = await auditchain.verify_chain(new_trail)
    assert (verdict.valid, verdict.first_bad_seq) == (False, 2) and "missing" in (verdict.reason or "")


async def test_audit_event_export_shape(new_trail: Ledger) -> None:
    await audit.record_event(new_trail, accepted())
    (entry, _genesis), _ = await audit.entries(new_trail)
    event = audit_event(entry)
    assert event["resourceType"] == "AuditEvent" and event["action"] == "C" and event["outcome"] == "0"
    assert event["agent"][0]["who"]["identifier"] == {"system": "urn:relais:producer", "value": "dui-a"}
    systems = [e["what"]["identifier"]["system"] for e in event["entity"]]
    assert systems == ["urn:relais:transfer", "https://finess.esante.gouv.fr"]
    from fhir.resources.R4B.auditevent import AuditEvent  # the export is valid FHIR R4(B)

    AuditEvent.model_validate(event)


def test_detail_with_an_integer_past_64_bits_is_kept_as_text() -> None:
    # A hostile Bundle can carry any JSON number; the audit row must still be written and hashed.
    from services.tracker.audit import _plain_json

    kept = [1, True, None, 1.5, "x"]
    assert _plain_json({"n": 10**30, "ok": kept}) == {"n": str(10**30), "ok": kept}


async def execute(ledger: Ledger, statement: sa.Executable) -> None:
    async with ledger.engine.begin() as conn:
        await conn.execute(statement)


async def head(ledger: Ledger) -> auditchain.Anchor:
    async with ledger.engine.connect() as conn:
        seq, mac = (await conn.execute(sa.select(audit.audit_log.c.seq, audit.audit_log.c.hash)
                                       .order_by(audit.audit_log.c.seq.desc()).limit(1))).one()
        origin = await _mac(conn, 0)
    return auditchain.Anchor(seq, mac, origin)


async def assert_bad(ledger: Ledger, seq: int, anchors: list[auditchain.Anchor] | None = None) -> str:
    verdict = await auditchain.verify_chain(ledger, anchors or [])
    assert (verdict.valid, verdict.first_bad_seq) == (False, seq), verdict
    assert verdict.reason
    return verdict.reason


async def test_untouched_trail_verifies_with_its_genesis_row_and_anchor(trail: Ledger) -> None:
    verdict = await auditchain.verify_chain(trail, [await head(trail)])
    assert verdict.valid and verdict.rows == ROWS + 1 and verdict.last_seq == ROWS and verdict.anchor_seq == ROWS


async def test_deleting_the_first_row(trail: Ledger) -> None:
    await execute(trail, sa.delete(audit.audit_log).where(audit.audit_log.c.seq == 1))
    assert "missing" in await assert_bad(trail, 1)


async def test_deleting_the_genesis_row(trail: Ledger) -> None:
    await execute(trail, sa.delete(audit.audit_log).where(audit.audit_log.c.seq == 0))
    assert "genesis" in await assert_bad(trail, 0)


async def test_deleting_a_range(trail: Ledger) -> None:
    await execute(trail, sa.delete(audit.audit_log).where(audit.audit_log.c.seq.between(1, 40)))
    await assert_bad(trail, 1)
    await execute(trail, sa.delete(audit.audit_log).where(audit.audit_log.c.seq.between(45, 47)))
    await assert_bad(trail, 1)


async def test_deleting_a_range_in_the_middle(trail: Ledger) -> None:
    await execute(trail, sa.delete(audit.audit_log).where(audit.audit_log.c.seq.between(20, 29)))
    await assert_bad(trail, 20)


async def test_emptying_the_table(trail: Ledger) -> None:
    anchor = await head(trail)
    await execute(trail, sa.delete(audit.audit_log))
    assert "empty" in await assert_bad(trail, 0, [anchor])
    await execute(trail, sa.delete(audit.audit_head))  # and the head row: writing starts a new chain ...
    await audit.record_operator(trail, "alice", "resume", target="t")
    assert "restarted" in await assert_bad(trail, 0, [anchor])  # ... that the anchor does not descend from


async def test_rewriting_a_row_and_recomputing_the_chain_without_the_key(trail: Ledger) -> None:
    """What the old plain SHA-256 chain let through: edit row 17, recompute every hash after it."""
    async with trail.engine.begin() as conn:
        rows = (await conn.execute(sa.select(audit.audit_log).order_by(audit.audit_log.c.seq))).mappings().all()
        prev = rows[17]["prev_hash"]  # row 17 still links to row 16
        for r in rows[17:]:
            target = "elsewhere" if r["seq"] == 17 else r["target"]
            digest = audit.legacy_row_hash(prev, r["seq"], r["time"], r["kind"], r["actor_type"], r["actor"],
                                           r["transfer_id"], target, r["finess"], r["outcome"], r["detail"])
            await conn.execute(audit.audit_log.update().where(audit.audit_log.c.seq == r["seq"])
                               .values(target=target, prev_hash=prev, hash=digest))
            prev = digest
        await conn.execute(audit.audit_head.update().values(hash=prev))
    assert "altered" in await assert_bad(trail, 17)


async def test_rewriting_a_row_with_a_guessed_key(trail: Ledger) -> None:
    other = parse_audit_key(new_audit_key(), "test")
    async with trail.engine.begin() as conn:
        r = (await conn.execute(sa.select(audit.audit_log).where(audit.audit_log.c.seq == 5))).mappings().one()
        digest = audit.row_mac(other, r["prev_hash"], 5, r["time"], r["kind"], r["actor_type"], "mallory",
                               r["transfer_id"], r["target"], r["finess"], r["outcome"], r["detail"])
        await conn.execute(audit.audit_log.update().where(audit.audit_log.c.seq == 5).values(actor="mallory",
                                                                                            hash=digest))
    await assert_bad(trail, 5)


async def test_deleting_the_newest_rows(trail: Ledger) -> None:
    anchor = await head(trail)
    await execute(trail, sa.delete(audit.audit_log).where(audit.audit_log.c.seq > ROWS - 3))
    async with trail.engine.begin() as conn:  # and cover the tracks in the database's own head row
        await conn.execute(audit.audit_head.update().values(seq=ROWS - 3))
    reason = await assert_bad(trail, ROWS - 2, [anchor])
    assert f"{ROWS - 2}..{ROWS}" in reason


async def test_replacing_the_newest_row_is_caught_by_the_anchor(trail: Ledger) -> None:
    anchor = await head(trail)
    await execute(trail, sa.delete(audit.audit_log).where(audit.audit_log.c.seq == ROWS))
    async with trail.engine.begin() as conn:
        await conn.execute(audit.audit_head.update().values(seq=ROWS - 1, hash=(await _mac(conn, ROWS - 1))))
    await audit.record_operator(trail, "alice", "resume", target="t")  # a new row ROWS, chained correctly
    assert "anchored" in await assert_bad(trail, ROWS, [anchor])


async def _mac(conn: sa.ext.asyncio.AsyncConnection, seq: int) -> str:
    return str((await conn.execute(sa.select(audit.audit_log.c.hash).where(audit.audit_log.c.seq == seq))).scalar())


async def test_retention_purge_keeps_the_chain_verifiable_and_a_further_removal_is_caught(trail: Ledger) -> None:
    later = datetime.now(UTC) + timedelta(days=1)
    assert await audit.purge(trail, timedelta(hours=1), now=later) == ROWS
    await audit.record_operator(trail, "alice", "resume", target="t")
    verdict = await auditchain.verify_chain(trail, [await head(trail)])
    assert verdict.valid, verdict
    assert await audit.purge(trail, timedelta(hours=1), now=later + timedelta(days=1)) == 2  # purge row too
    assert (await auditchain.verify_chain(trail, [await head(trail)])).valid
    # Deleting the last purge row (to hide that rows were removed) leaves an undeclared hole.
    await execute(trail, sa.delete(audit.audit_log).where(audit.audit_log.c.kind == audit.PURGED_KIND))
    await assert_bad(trail, 1)  # the database's own head row still says where the trail ended
    await audit.record_operator(trail, "alice", "resume", target="t")
    await assert_bad(trail, 1)


async def test_a_process_with_another_key_is_refused_at_start(trail: Ledger) -> None:
    other = Ledger(trail.url)
    try:
        with pytest.raises(ConfigurationError, match="same RELAIS_AUDIT_KEY_FILE"):
            await audit.open_trail(other, Settings(database_url=trail.url, audit_key=new_audit_key()))
    finally:
        await other.close()


async def _legacy_trail(url: str, rows: int, *, break_at: int | None = None) -> None:
    """An audit_log as Relais wrote it before the keyed chain: plain SHA-256, no genesis row."""
    ledger = Ledger(url)
    await ledger.create_schema()
    prev = "0" * 64
    async with ledger.engine.begin() as conn:
        for seq in range(1, rows + 1):
            moment = datetime.now(UTC)
            detail = {"n": seq}
            digest = audit.legacy_row_hash(prev, seq, moment, "operator.pause", "operator", "alice", None, "t", None,
                                           "success", detail)
            await conn.execute(audit.audit_log.insert().values(
                seq=seq, time=moment, kind="operator.pause", actor_type="operator", actor="alice", target="t",
                outcome="success", detail=detail if seq != break_at else {"n": -1}, prev_hash=prev, hash=digest))
            prev = digest
        await conn.execute(audit.audit_head.insert().values(id=1, seq=rows, hash=prev))
    await ledger.close()


async def test_an_old_plain_sha_trail_is_migrated_when_it_verifies(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/old.db"
    await _legacy_trail(url, 12)
    ledger = Ledger(url)
    try:
        await audit.open_trail(ledger, Settings(database_url=url, audit_key=new_audit_key()))
        await audit.record_operator(ledger, "bob", "resume", target="t")
        verdict = await auditchain.verify_chain(ledger, [await head(ledger)])
        assert verdict.valid and verdict.rows == 14, verdict
        (genesis,), _ = await audit.entries(ledger, audit.AuditFilter(kind=audit.GENESIS_KIND))
        assert genesis.detail["migrated"]["rows"] == 12
    finally:
        await ledger.close()


async def test_an_old_plain_sha_trail_that_was_altered_is_refused_with_what_to_do(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/old.db"
    await _legacy_trail(url, 8, break_at=4)
    ledger = Ledger(url)
    try:
        with pytest.raises(ConfigurationError, match=r"does not verify at seq 4.*RENAME TO audit_log_legacy"):
            await audit.open_trail(ledger, Settings(database_url=url, audit_key=new_audit_key()))
    finally:
        await ledger.close()


async def test_head_anchors_go_to_the_bus_and_a_forged_one_is_ignored(trail: Ledger, tmp_path: Path) -> None:
    settings = Settings(database_url=trail.url, embedded_log_path=tmp_path / "log.db")
    bus = EmbeddedBus(settings)
    await bus.start()
    try:
        anchors = auditchain.HeadAnchors(trail, every_s=3600)
        emit = await anchors.due()
        assert emit is not None and await anchors.due() is None  # once per interval
        forged = emit.envelope.evolve(data=orjson.dumps({"seq": 999, "mac": "0" * 64, "sig": "0" * 64}))
        await bus.publish([emit, type(emit)(emit.topic, emit.key, forged)])
        key = audit.key_of(trail)
        found = await auditchain.latest_anchor(bus, key, settle_s=1)
        assert found == await head(trail)
        await execute(trail, sa.delete(audit.audit_log).where(audit.audit_log.c.seq == ROWS))
        await assert_bad(trail, ROWS, [found])
    finally:
        await bus.stop()


async def test_failed_authentications_are_recorded_at_most_once_per_interval(trail: Ledger) -> None:
    refusals = audit.Refusals(trail, every_s=60)
    assert refusals.note("ingress", 401, "unknown token", client="10.0.0.1", now=0.0)
    assert not refusals.note("ingress", 401, "unknown token", client="10.0.0.1", now=1.0)
    assert not refusals.note("ingress", 401, "unknown token", client="10.0.0.1", now=2.0)
    assert refusals.note("ops", 401, "unknown token", client="10.0.0.1", now=2.0)
    assert refusals.note("ingress", 401, "unknown token", client="10.0.0.1", now=61.0)
    await refusals.drain()
    rows, _ = await audit.entries(trail, audit.AuditFilter(kind="auth.refused"), ascending=True)
    assert sorted((r.detail["surface"], r.detail.get("suppressed_since_last") or 0) for r in rows) == [
        ("ingress", 0), ("ingress", 2), ("ops", 0)]
    assert all(r.outcome == "failure" and r.actor_type == "unknown" for r in rows)
    assert (await auditchain.verify_chain(trail)).valid


def test_row_mac_is_not_plain_sha256() -> None:
    key = parse_audit_key(new_audit_key(), "test")
    now = datetime.now(UTC)
    args = ("0" * 64, 1, now, "k", "system", None, None, None, None, "success", {})
    assert audit.row_mac(key, *args) != audit.legacy_row_hash(*args)
    assert audit.legacy_row_hash(*args) == hashlib.sha256(b"0" * 64 + audit._content(*args[1:])).hexdigest()


async def test_the_tracker_does_not_anchor_a_head_that_went_backwards(trail: Ledger) -> None:
    anchors = auditchain.HeadAnchors(trail, every_s=0.0)
    assert await anchors.due() is not None
    await execute(trail, sa.delete(audit.audit_log).where(audit.audit_log.c.seq > ROWS - 5))
    assert await anchors.due() is None  # a lower head never overwrites the anchored one


async def test_refusals_from_many_clients_are_capped_per_interval(trail: Ledger) -> None:
    refusals = audit.Refusals(trail, every_s=60)
    written = sum(refusals.note("ingress", 401, "unknown token", client=f"10.0.{n // 256}.{n % 256}", now=1.0)
                  for n in range(150))
    assert written == audit.Refusals.MAX_ROWS
    assert refusals.note("ingress", 401, "unknown token", client="10.9.9.9", now=62.0)
    await refusals.drain()
    rows, _ = await audit.entries(trail, audit.AuditFilter(kind="auth.refused"), limit=500)
    assert len(rows) == audit.Refusals.MAX_ROWS + 1
    assert [r.detail.get("dropped_over_limit") for r in rows if r.detail["client"] == "10.9.9.9"] == [50]


def test_processes_starting_together_share_one_complete_audit_key(tmp_path: Path) -> None:
    import concurrent.futures

    from services.tracker.auditkey import load_audit_key

    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/ledger.db")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        keys = list(pool.map(lambda _: load_audit_key(settings).secret, range(32)))
    assert len(set(keys)) == 1 and len(keys[0]) == 32
    assert [p.name for p in tmp_path.iterdir()] == ["relais-audit.key"]
    assert (tmp_path / "relais-audit.key").stat().st_mode & 0o777 == 0o600


async def audited_ids(ledger: Ledger) -> list[str]:
    async with ledger.engine.connect() as conn:
        rows = await conn.execute(sa.select(audit.audit_log.c.event_id).where(audit.audit_log.c.seq > 0)
                                  .order_by(audit.audit_log.c.seq))
        return [str(r[0]) for r in rows]


async def test_a_poll_is_audited_in_one_transaction_and_the_chain_holds(new_trail: Ledger) -> None:
    tracker = auditchain.AuditingTracker(TrackerStage(new_trail), new_trail, anchor_every_s=3600)
    await tracker.anchors.due()  # the first anchor is due at once: out of the way
    commits: list[int] = []
    sa.event.listen(new_trail.write_engine, "commit", lambda _: commits.append(1))
    records = [event_record(i, kind, f"t{i // 2}") for i, kind in enumerate(["accepted", "delivered"] * 15)]
    await tracker.prepare(records)
    assert len(commits) == 1  # the ledger's projection and the audit rows together
    for record in records:
        await tracker.handle(record)
    assert len(commits) == 1  # handle only confirms
    assert await audited_ids(new_trail) == [r.envelope.id for r in records]  # in poll order
    verdict = await auditchain.verify_chain(new_trail)
    assert verdict.valid and verdict.rows == 31, verdict  # genesis + 30


async def test_a_poll_read_again_falls_back_to_one_by_one_and_records_nothing_twice(new_trail: Ledger) -> None:
    tracker = auditchain.AuditingTracker(TrackerStage(new_trail), new_trail, anchor_every_s=3600)
    first = [event_record(i, "accepted", f"t{i}") for i in range(5)]
    await tracker.prepare(first)
    for record in first[:3]:  # the process stops after three: the poll comes again, with more
        await tracker.handle(record)
    again = auditchain.AuditingTracker(TrackerStage(new_trail), new_trail, anchor_every_s=3600)
    second = [*first, *(event_record(i, "accepted", f"t{i}") for i in range(5, 8))]
    await again.prepare(second)
    for record in second:
        await again.handle(record)
    assert await audited_ids(new_trail) == [r.envelope.id for r in second]
    assert (await auditchain.verify_chain(new_trail)).valid
