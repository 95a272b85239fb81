"""The audit trail through the operator API, on a real ledger and the embedded bus: failed authentications on
/ops are recorded, verify is itself recorded, and verify compares the chain with the head anchored on the bus;
the head anchored on the bus is read back by verify, on a real Kafka (compacted topic) and the embedded log."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from services.core.buses import make_bus
from services.core.settings import Settings
from services.tracker import audit, auditchain
from services.tracker.auditkey import new_audit_key
from services.tracker.ledger import Ledger
from tests.integration.test_ops_api import OPERATOR, bearer, running, settings  # noqa: F401 - fixture
from tests.support.kafka import wait_for
from tests.support.producers import TOKEN_A


async def test_ops_refusals_and_verify_are_in_the_trail_and_verify_uses_the_bus_anchor(settings: Settings) -> None:  # noqa: F811
    async with running(settings) as (client, app):
        ledger = app.state.ops.ledger
        assert (await client.get("/ops/audit/verify", headers=bearer("not-a-token"))).status_code == 401
        assert (await client.get("/ops/audit/verify", headers=bearer(TOKEN_A))).status_code == 403  # a producer
        assert (await client.get("/ops/audit/verify", headers=bearer("not-a-token"))).status_code == 401  # again

        async def refused() -> list[audit.AuditEntry]:
            rows = (await audit.entries(ledger, audit.AuditFilter(kind="auth.refused")))[0]
            return rows if len(rows) >= 2 else []

        rows = await wait_for(refused, timeout_s=10)
        assert sorted((r.detail["surface"], r.detail["http_status"]) for r in rows) == [("ops", 401), ("ops", 403)]

        for n in range(5):
            await audit.record_operator(ledger, "otto", "pause", target=f"t{n}")
        emit = await auditchain.HeadAnchors(ledger, every_s=60).due()  # as the tracker, every RELAIS_AUDIT_ANCHOR_S
        assert emit is not None
        await app.state.ops.bus.publish([emit])
        first = (await client.get("/ops/audit/verify", headers=bearer(OPERATOR))).json()
        assert first["valid"] and first["anchor_seq"] == first["last_seq"], first
        verified, _ = await audit.entries(ledger, audit.AuditFilter(kind="operator.audit.verify"))
        assert [v.actor for v in verified] == ["otto"] and verified[0].detail["valid"] is True

        anchored = first["anchor_seq"]
        async with ledger.engine.begin() as conn:  # remove the newest rows, including those after the anchor
            await conn.execute(sa.delete(audit.audit_log).where(audit.audit_log.c.seq >= anchored - 1))
            await conn.execute(audit.audit_head.update().values(seq=anchored - 2))
        second = (await client.get("/ops/audit/verify", headers=bearer(OPERATOR))).json()
        assert (second["valid"], second["first_bad_seq"]) == (False, anchored - 1), second
        # An anchor copied from the log ('audit chain head' line) is taken as well.
        third = (await client.get("/ops/audit/verify", headers=bearer(OPERATOR),
                                  params={"seq": anchored + 5, "mac": "ab" * 32})).json()
        assert third["valid"] is False and third["anchor_seq"] == anchored + 5


async def test_verify_refuses_an_anchor_sequence_no_row_can_have(settings: Settings) -> None:  # noqa: F811
    """Found by the fuzzer: a 23-digit ?seq= reached the JSON encoder and answered 500."""
    async with running(settings) as (client, _):
        for seq in ("99999999999999999999999", "0", "-5"):
            answer = await client.get("/ops/audit/verify", headers=bearer(OPERATOR), params={"seq": seq, "mac": "ab"})
            assert answer.status_code == 400, (seq, answer.text)
            issue = answer.json()["issue"][0]
            assert issue["expression"] == ["query.seq"], answer.text


async def test_the_newest_authentic_anchor_is_read_back(bus_settings: Callable[..., Settings], tmp_path: Path) -> None:
    s = bus_settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/ledger.db", audit_key=new_audit_key())
    ledger = Ledger(s.database_url)
    bus = make_bus(s)
    await bus.start()
    try:
        await audit.open_trail(ledger, s)
        anchors = auditchain.HeadAnchors(ledger, every_s=0.0)
        for n in range(3):
            await audit.record_operator(ledger, "otto", "pause", target=f"t{n}")
            emit = await anchors.due()
            assert emit is not None
            await bus.publish([emit])
        found = await auditchain.latest_anchor(bus, audit.key_of(ledger))  # the default settle time, as verify uses
        assert found is not None and found.seq == 3
        assert (await auditchain.verify_chain(ledger, [found])).valid
    finally:
        await bus.stop()
        await ledger.close()
