"""What the operators' tools read back from the bus, on a real Kafka and the embedded log: `relais ledger rebuild`
gives the tracker's state back from `transfers.events`; the lag reader sees a stage's backlog; a stage's dead
letter is read back from the poison topic."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from services.core.buses import make_bus
from services.core.envelope import JSON, Emit, Envelope
from services.core.errors import ConfigurationError
from services.core.settings import Settings
from services.core.topics import EVENTS, POISON, RECEIVED
from services.dlq.store import read_poison
from services.ops.context import LagReader
from services.tracker.ledger import Ledger, LedgerEvent, deliveries, events, transfers
from services.tracker.maintenance import rebuild
from tests.unit.ops.test_ledger_queries import story


def as_emit(e: LedgerEvent) -> Emit:
    env = Envelope(type=f"fr.relais.event.{e.kind}", source=f"/relais/{e.stage}", transfer_id=e.transfer_id,
                   data=orjson.dumps({**(e.detail or {}), "kind": e.kind, "stage": e.stage}), producer=e.producer,
                   target=e.target, attempt=e.attempt, id=e.id, time=e.time, content_type=JSON)
    return Emit(EVENTS, e.transfer_id.encode(), env)


async def dump(ledger: Ledger) -> dict[str, list[Any]]:
    out = {}
    async with ledger.engine.connect() as conn:
        for table, key in ((transfers, "id"), (deliveries, "transfer_id"), (events, "id")):
            rows = (await conn.execute(sa.select(table))).mappings().all()
            cleaned = [{k: (v.replace(tzinfo=None) if hasattr(v, "tzinfo") else v) for k, v in r.items()}
                       for r in rows]
            out[table.name] = sorted(cleaned, key=lambda r: (str(r[key]), str(r.get("target"))))
    return out


async def test_rebuild_gives_the_same_state(bus_settings: Callable[..., Settings], tmp_path: Path) -> None:
    settings = bus_settings()
    evs = (story("t1", 0, targets=("a", "b"), finess="750000001") + story("t2", 10, fate="dead")
           + story("t3", 20, fate="retrying") + story("t4", 30, producer="dui-b", ms=250))
    tracked = Ledger(f"sqlite+aiosqlite:///{tmp_path}/tracked.db")
    rebuilt = Ledger(f"sqlite+aiosqlite:///{tmp_path}/rebuilt.db")
    bus = make_bus(settings)
    await bus.start()
    try:
        await tracked.create_schema()
        for e in evs:
            await tracked.apply(e)
        await bus.publish([as_emit(e) for e in evs])
        await bus.publish([as_emit(evs[0])])  # a duplicate, as at-least-once delivery makes them
        done = await rebuild(bus, rebuilt, idle_s=5)
        assert (done.read, done.applied) == (len(evs) + 1, len(evs))
        assert await dump(rebuilt) == await dump(tracked)
        with pytest.raises(ConfigurationError, match="not empty"):
            await rebuild(bus, rebuilt)
    finally:
        await bus.stop()
        await tracked.close()
        await rebuilt.close()


async def test_lag_reader_sees_the_backlog(bus_settings: Callable[..., Settings]) -> None:
    settings = bus_settings()
    bus = make_bus(settings)
    await bus.start()
    try:
        records = [Emit(RECEIVED, f"k{i}".encode(), Envelope(type="fr.relais.transfer.received", source="/t",
                                                             transfer_id=f"t{i}", data=b"{}")) for i in range(5)]
        await bus.publish(records)
        lags = {s.stage: s for s in await LagReader(bus, settings).read()}
        assert lags["validator"].lag == 5 and lags["validator"].topics == {RECEIVED: 5}
        assert lags["router"].lag == 0 and lags["delivery"].lag == 0
    finally:
        await bus.stop()


async def test_read_poison_finds_one_record_among_many(bus_settings: Callable[..., Settings]) -> None:
    settings = bus_settings(topic_partitions=2)
    bus = make_bus(settings)
    await bus.start()
    try:
        envelopes = [Envelope(type="fr.relais.transfer.received", source="/relais/ingress", transfer_id=f"t{n}",
                              data=f'{{"n": {n}}}'.encode(), extra={"failedstage": "validator"}) for n in range(12)]
        await bus.publish([Emit(POISON, e.transfer_id.encode(), e) for e in envelopes])
        found = await read_poison(bus, envelopes[7].id, timeout_s=60)
        assert found is not None and found.envelope.data == b'{"n": 7}' and found.key == b"t7"
        assert await read_poison(bus, "no-such-id", timeout_s=60) is None
        assert await read_poison(bus, "", timeout_s=60) is None
    finally:
        await bus.stop()
