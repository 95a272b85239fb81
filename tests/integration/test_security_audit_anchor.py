"""The audit chain's head anchored on the bus, read back by verify: a real Kafka (compacted topic) and the
embedded log."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from services.core.buses import make_bus
from services.core.settings import Settings
from services.tracker import audit, auditchain
from services.tracker.auditkey import new_audit_key
from services.tracker.ledger import Ledger


async def test_the_newest_authentic_anchor_is_read_back(bus_settings: Callable[..., Settings], tmp_path: Path) -> None:
    settings = bus_settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/ledger.db", audit_key=new_audit_key())
    ledger = Ledger(settings.database_url)
    bus = make_bus(settings)
    await bus.start()
    try:
        await audit.open_trail(ledger, settings)
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
