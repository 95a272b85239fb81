"""The auditing tracker writes a poll's audit rows in one transaction, chained as one by one would be."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from services.core.settings import Settings
from services.tracker import audit
from services.tracker.auditchain import AuditingTracker, verify_chain
from services.tracker.ledger import Ledger
from services.tracker.stage import TrackerStage
from tests.unit.tracker.test_stage import event_record


@pytest.fixture
async def ledger(tmp_path: Path) -> Ledger:
    ledger = Ledger(f"sqlite+aiosqlite:///{tmp_path}/ledger.db")
    await audit.open_trail(ledger, Settings(database_url=ledger.url))  # a key created beside the ledger
    return ledger


async def audited(ledger: Ledger) -> list[str]:
    async with ledger.engine.connect() as conn:
        rows = await conn.execute(sa.select(audit.audit_log.c.event_id).where(audit.audit_log.c.seq > 0)
                                  .order_by(audit.audit_log.c.seq))
        return [str(r[0]) for r in rows]


async def test_a_poll_is_audited_in_one_transaction_and_the_chain_holds(ledger: Ledger) -> None:
    tracker = AuditingTracker(TrackerStage(ledger), ledger, anchor_every_s=3600)
    await tracker.anchors.due()  # the first anchor is due at once: out of the way
    commits: list[int] = []
    sa.event.listen(ledger.engine.sync_engine, "commit", lambda _: commits.append(1))
    records = [event_record(i, kind, f"t{i // 2}") for i, kind in enumerate(["accepted", "delivered"] * 15)]
    await tracker.prepare(records)
    assert len(commits) == 2  # the ledger's projection, then the audit rows
    for record in records:
        await tracker.handle(record)
    assert len(commits) == 2  # handle only confirms
    assert await audited(ledger) == [r.envelope.id for r in records]  # in poll order
    verdict = await verify_chain(ledger)
    assert verdict.valid and verdict.rows == 31, verdict  # genesis + 30


async def test_a_poll_read_again_falls_back_to_one_by_one_and_records_nothing_twice(ledger: Ledger) -> None:
    tracker = AuditingTracker(TrackerStage(ledger), ledger, anchor_every_s=3600)
    first = [event_record(i, "accepted", f"t{i}") for i in range(5)]
    await tracker.prepare(first)
    for record in first[:3]:  # the process stops after three: the poll comes again, with more
        await tracker.handle(record)
    again = AuditingTracker(TrackerStage(ledger), ledger, anchor_every_s=3600)
    second = [*first, *(event_record(i, "accepted", f"t{i}") for i in range(5, 8))]
    await again.prepare(second)
    for record in second:
        await again.handle(record)
    assert await audited(ledger) == [r.envelope.id for r in second]
    assert (await verify_chain(ledger)).valid
