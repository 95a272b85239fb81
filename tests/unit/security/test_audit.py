"""The audit trail: append-only rows from events and operator actions, hash-chained, exported as AuditEvents."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from services.core.settings import Settings
from services.ops.audit_api import audit_event
from services.tracker import audit, auditchain
from services.tracker.ledger import Ledger, LedgerEvent


async def ledger_at(tmp_path: Path) -> Ledger:
    ledger = Ledger(f"sqlite+aiosqlite:///{tmp_path}/ledger.db")
    await audit.open_trail(ledger, Settings(database_url=ledger.url))
    return ledger


def accepted(event_id: str = "ev-1") -> LedgerEvent:
    return LedgerEvent(id=event_id, transfer_id="t-1", kind="accepted", stage="ingress", time=datetime.now(UTC),
                       producer="dui-a", detail={"targets": ["essms-a"], "size": 1234, "sha256": "ab" * 32,
                                                 "finess": ["990000001"], "auth": "mtls", "cert": "cd" * 32})


async def test_events_and_operator_actions_are_chained_and_idempotent(tmp_path: Path) -> None:
    ledger = await ledger_at(tmp_path)
    try:
        assert await audit.record_event(ledger, accepted())
        assert not await audit.record_event(ledger, accepted())  # replayed event: recorded once
        assert not await audit.record_event(ledger, LedgerEvent(id="x", transfer_id="t-1", kind="validated",
                                                                stage="validator", time=datetime.now(UTC)))
        await audit.record_event(ledger, LedgerEvent(id="ev-2", transfer_id="t-1", kind="delivered", stage="delivery",
                                                     time=datetime.now(UTC), target="essms-a", attempt=1,
                                                     detail={"http_status": 200, "response": {"secret": 1}}))
        await audit.record_operator(ledger, "alice", "bundle.read", transfer_id="t-1", target="essms-a")
        items, cursor = await audit.entries(ledger, limit=2)
        assert [i.kind for i in items] == ["operator.bundle.read", "delivered"] and cursor
        rest, end = await audit.entries(ledger, cursor=cursor)
        assert [i.kind for i in rest] == ["accepted", "audit.genesis"] and end is None  # the chain starts at seq 0
        first = rest[0]
        assert first.actor == "dui-a" and first.actor_type == "producer" and first.finess == ["990000001"]
        assert first.detail["sha256"] == "ab" * 32 and first.detail["auth"] == "mtls"
        assert "response" not in items[1].detail  # a target's answer never goes into the trail
        only, _ = await audit.entries(ledger, audit.AuditFilter(finess="990000001"))
        assert [i.kind for i in only] == ["accepted"]
        assert (await auditchain.verify_chain(ledger)).valid

        async with ledger.engine.begin() as conn:  # someone edits history ...
            await conn.execute(audit.audit_log.update().where(audit.audit_log.c.seq == 2).values(target="elsewhere"))
        verdict = await auditchain.verify_chain(ledger)
        assert not verdict.valid and verdict.first_bad_seq == 2
    finally:
        await ledger.close()


async def test_deleting_a_row_breaks_the_chain(tmp_path: Path) -> None:
    ledger = await ledger_at(tmp_path)
    try:
        for n in range(3):
            await audit.record_operator(ledger, "alice", "pause", target=f"t{n}")
        async with ledger.engine.begin() as conn:
            await conn.execute(sa.delete(audit.audit_log).where(audit.audit_log.c.seq == 2))
        verdict = await auditchain.verify_chain(ledger)
        assert (verdict.valid, verdict.first_bad_seq) == (False, 2) and "missing" in (verdict.reason or "")
    finally:
        await ledger.close()


async def test_audit_event_export_shape(tmp_path: Path) -> None:
    ledger = await ledger_at(tmp_path)
    try:
        await audit.record_event(ledger, accepted())
        (entry, _genesis), _ = await audit.entries(ledger)
        event = audit_event(entry)
        assert event["resourceType"] == "AuditEvent" and event["action"] == "C" and event["outcome"] == "0"
        assert event["agent"][0]["who"]["identifier"] == {"system": "urn:relais:producer", "value": "dui-a"}
        systems = [e["what"]["identifier"]["system"] for e in event["entity"]]
        assert systems == ["urn:relais:transfer", "https://finess.esante.gouv.fr"]
        from fhir.resources.R4B.auditevent import AuditEvent  # the export is valid FHIR R4(B)

        AuditEvent.model_validate(event)
    finally:
        await ledger.close()


def test_detail_with_an_integer_past_64_bits_is_kept_as_text() -> None:
    # A hostile Bundle can carry any JSON number; the audit row must still be written and hashed.
    from services.tracker.audit import _plain_json

    kept = [1, True, None, 1.5, "x"]
    assert _plain_json({"n": 10**30, "ok": kept}) == {"n": str(10**30), "ok": kept}
