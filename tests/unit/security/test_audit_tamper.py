"""The audit trail against someone who can write to the ledger database but does not hold the audit key.

Each tampering must make verify answer invalid and name the first missing or altered sequence.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa

from services.core.embedded import EmbeddedBus
from services.core.errors import ConfigurationError
from services.core.settings import Settings
from services.tracker import audit, auditchain
from services.tracker.auditkey import new_audit_key, parse_audit_key
from services.tracker.ledger import Ledger

ROWS = 50


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    ledger = Ledger(f"sqlite+aiosqlite:///{tmp_path}/ledger.db")
    await audit.open_trail(ledger, Settings(database_url=ledger.url, audit_key=new_audit_key()))
    for n in range(1, ROWS + 1):
        await audit.record_operator(ledger, "alice", "pause", target=f"target-{n}")
    try:
        yield ledger
    finally:
        await ledger.close()


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


async def test_untouched_trail_verifies_with_its_genesis_row_and_anchor(ledger: Ledger) -> None:
    verdict = await auditchain.verify_chain(ledger, [await head(ledger)])
    assert verdict.valid and verdict.rows == ROWS + 1 and verdict.last_seq == ROWS and verdict.anchor_seq == ROWS


async def test_deleting_the_first_row(ledger: Ledger) -> None:
    await execute(ledger, sa.delete(audit.audit_log).where(audit.audit_log.c.seq == 1))
    assert "missing" in await assert_bad(ledger, 1)


async def test_deleting_the_genesis_row(ledger: Ledger) -> None:
    await execute(ledger, sa.delete(audit.audit_log).where(audit.audit_log.c.seq == 0))
    assert "genesis" in await assert_bad(ledger, 0)


async def test_deleting_a_range(ledger: Ledger) -> None:
    await execute(ledger, sa.delete(audit.audit_log).where(audit.audit_log.c.seq.between(1, 40)))
    await assert_bad(ledger, 1)
    await execute(ledger, sa.delete(audit.audit_log).where(audit.audit_log.c.seq.between(45, 47)))
    await assert_bad(ledger, 1)


async def test_deleting_a_range_in_the_middle(ledger: Ledger) -> None:
    await execute(ledger, sa.delete(audit.audit_log).where(audit.audit_log.c.seq.between(20, 29)))
    await assert_bad(ledger, 20)


async def test_emptying_the_table(ledger: Ledger) -> None:
    anchor = await head(ledger)
    await execute(ledger, sa.delete(audit.audit_log))
    assert "empty" in await assert_bad(ledger, 0, [anchor])
    await execute(ledger, sa.delete(audit.audit_head))  # and the head row: writing starts a new chain ...
    await audit.record_operator(ledger, "alice", "resume", target="t")
    assert "restarted" in await assert_bad(ledger, 0, [anchor])  # ... that the anchor does not descend from


async def test_rewriting_a_row_and_recomputing_the_chain_without_the_key(ledger: Ledger) -> None:
    """What the old plain SHA-256 chain let through: edit row 17, recompute every hash after it."""
    async with ledger.engine.begin() as conn:
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
    assert "altered" in await assert_bad(ledger, 17)


async def test_rewriting_a_row_with_a_guessed_key(ledger: Ledger) -> None:
    other = parse_audit_key(new_audit_key(), "test")
    async with ledger.engine.begin() as conn:
        r = (await conn.execute(sa.select(audit.audit_log).where(audit.audit_log.c.seq == 5))).mappings().one()
        digest = audit.row_mac(other, r["prev_hash"], 5, r["time"], r["kind"], r["actor_type"], "mallory",
                               r["transfer_id"], r["target"], r["finess"], r["outcome"], r["detail"])
        await conn.execute(audit.audit_log.update().where(audit.audit_log.c.seq == 5).values(actor="mallory",
                                                                                            hash=digest))
    await assert_bad(ledger, 5)


async def test_deleting_the_newest_rows(ledger: Ledger) -> None:
    anchor = await head(ledger)
    await execute(ledger, sa.delete(audit.audit_log).where(audit.audit_log.c.seq > ROWS - 3))
    async with ledger.engine.begin() as conn:  # and cover the tracks in the database's own head row
        await conn.execute(audit.audit_head.update().values(seq=ROWS - 3))
    reason = await assert_bad(ledger, ROWS - 2, [anchor])
    assert f"{ROWS - 2}..{ROWS}" in reason


async def test_replacing_the_newest_row_is_caught_by_the_anchor(ledger: Ledger) -> None:
    anchor = await head(ledger)
    await execute(ledger, sa.delete(audit.audit_log).where(audit.audit_log.c.seq == ROWS))
    async with ledger.engine.begin() as conn:
        await conn.execute(audit.audit_head.update().values(seq=ROWS - 1, hash=(await _mac(conn, ROWS - 1))))
    await audit.record_operator(ledger, "alice", "resume", target="t")  # a new row ROWS, chained correctly
    assert "anchored" in await assert_bad(ledger, ROWS, [anchor])


async def _mac(conn: sa.ext.asyncio.AsyncConnection, seq: int) -> str:
    return str((await conn.execute(sa.select(audit.audit_log.c.hash).where(audit.audit_log.c.seq == seq))).scalar())


async def test_retention_purge_keeps_the_chain_verifiable_and_a_further_removal_is_caught(ledger: Ledger) -> None:
    later = datetime.now(UTC) + timedelta(days=1)
    assert await audit.purge(ledger, timedelta(hours=1), now=later) == ROWS
    await audit.record_operator(ledger, "alice", "resume", target="t")
    verdict = await auditchain.verify_chain(ledger, [await head(ledger)])
    assert verdict.valid, verdict
    assert await audit.purge(ledger, timedelta(hours=1), now=later + timedelta(days=1)) == 2  # purge row too
    assert (await auditchain.verify_chain(ledger, [await head(ledger)])).valid
    # Deleting the last purge row (to hide that rows were removed) leaves an undeclared hole.
    await execute(ledger, sa.delete(audit.audit_log).where(audit.audit_log.c.kind == audit.PURGED_KIND))
    await assert_bad(ledger, 1)  # the database's own head row still says where the trail ended
    await audit.record_operator(ledger, "alice", "resume", target="t")
    await assert_bad(ledger, 1)


async def test_a_process_with_another_key_is_refused_at_start(ledger: Ledger) -> None:
    other = Ledger(ledger.url)
    try:
        with pytest.raises(ConfigurationError, match="same RELAIS_AUDIT_KEY_FILE"):
            await audit.open_trail(other, Settings(database_url=ledger.url, audit_key=new_audit_key()))
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


async def test_head_anchors_go_to_the_bus_and_a_forged_one_is_ignored(ledger: Ledger, tmp_path: Path) -> None:
    settings = Settings(database_url=ledger.url, embedded_log_path=tmp_path / "log.db")
    bus = EmbeddedBus(settings)
    await bus.start()
    try:
        anchors = auditchain.HeadAnchors(ledger, every_s=3600)
        emit = await anchors.due()
        assert emit is not None and await anchors.due() is None  # once per interval
        forged = emit.envelope.evolve(data=orjson.dumps({"seq": 999, "mac": "0" * 64, "sig": "0" * 64}))
        await bus.publish([emit, type(emit)(emit.topic, emit.key, forged)])
        key = audit.key_of(ledger)
        found = await auditchain.latest_anchor(bus, key, settle_s=1)
        assert found == await head(ledger)
        await execute(ledger, sa.delete(audit.audit_log).where(audit.audit_log.c.seq == ROWS))
        await assert_bad(ledger, ROWS, [found])
    finally:
        await bus.stop()


async def test_failed_authentications_are_recorded_at_most_once_per_interval(ledger: Ledger) -> None:
    refusals = audit.Refusals(ledger, every_s=60)
    assert refusals.note("ingress", 401, "unknown token", client="10.0.0.1", now=0.0)
    assert not refusals.note("ingress", 401, "unknown token", client="10.0.0.1", now=1.0)
    assert not refusals.note("ingress", 401, "unknown token", client="10.0.0.1", now=2.0)
    assert refusals.note("ops", 401, "unknown token", client="10.0.0.1", now=2.0)
    assert refusals.note("ingress", 401, "unknown token", client="10.0.0.1", now=61.0)
    await refusals.drain()
    rows, _ = await audit.entries(ledger, audit.AuditFilter(kind="auth.refused"), ascending=True)
    assert sorted((r.detail["surface"], r.detail.get("suppressed_since_last") or 0) for r in rows) == [
        ("ingress", 0), ("ingress", 2), ("ops", 0)]
    assert all(r.outcome == "failure" and r.actor_type == "unknown" for r in rows)
    assert (await auditchain.verify_chain(ledger)).valid


def test_row_mac_is_not_plain_sha256() -> None:
    key = parse_audit_key(new_audit_key(), "test")
    now = datetime.now(UTC)
    args = ("0" * 64, 1, now, "k", "system", None, None, None, None, "success", {})
    assert audit.row_mac(key, *args) != audit.legacy_row_hash(*args)
    assert audit.legacy_row_hash(*args) == hashlib.sha256(b"0" * 64 + audit._content(*args[1:])).hexdigest()


async def test_the_tracker_does_not_anchor_a_head_that_went_backwards(ledger: Ledger) -> None:
    anchors = auditchain.HeadAnchors(ledger, every_s=0.0)
    assert await anchors.due() is not None
    await execute(ledger, sa.delete(audit.audit_log).where(audit.audit_log.c.seq > ROWS - 5))
    assert await anchors.due() is None  # a lower head never overwrites the anchored one


async def test_refusals_from_many_clients_are_capped_per_interval(ledger: Ledger) -> None:
    refusals = audit.Refusals(ledger, every_s=60)
    written = sum(refusals.note("ingress", 401, "unknown token", client=f"10.0.{n // 256}.{n % 256}", now=1.0)
                  for n in range(150))
    assert written == audit.Refusals.MAX_ROWS
    assert refusals.note("ingress", 401, "unknown token", client="10.9.9.9", now=62.0)
    await refusals.drain()
    rows, _ = await audit.entries(ledger, audit.AuditFilter(kind="auth.refused"), limit=500)
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
