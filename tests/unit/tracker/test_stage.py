"""The tracker stage projects a whole poll's events in one ledger transaction, on a real SQLite file."""

from __future__ import annotations

import orjson
import pytest
import sqlalchemy as sa

from services.core.envelope import Envelope, Record
from services.core.topics import EVENTS
from services.tracker.ledger import Ledger
from services.tracker.stage import TrackerStage


def event_record(n: int, kind: str, transfer_id: str, body: bytes | None = None) -> Record:
    data = body if body is not None else orjson.dumps({"kind": kind, "stage": "test", "targets": ["a"]})
    env = Envelope(type=f"fr.relais.event.{kind}", source="/test", transfer_id=transfer_id, data=data)
    return Record(EVENTS, 0, n, transfer_id.encode(), env)


async def test_a_poll_is_one_transaction_and_handle_only_confirms(ledger: Ledger) -> None:
    commits: list[int] = []
    sa.event.listen(ledger.write_engine, "commit", lambda _: commits.append(1))
    stage = TrackerStage(ledger)
    records = [event_record(i, kind, f"t{i // 2}") for i, kind in enumerate(["accepted", "validated"] * 20)]
    await stage.prepare(records)
    assert len(commits) == 1
    for record in records:
        assert await stage.handle(record) == ()
    assert len(commits) == 1  # nothing written twice
    assert (await ledger.count_by_status()) == {"validated": 20}


async def test_a_malformed_event_keeps_its_own_fate_and_replays_change_nothing(ledger: Ledger) -> None:
    stage = TrackerStage(ledger)
    good = [event_record(0, "accepted", "t0"), event_record(1, "validated", "t0")]
    bad = event_record(2, "accepted", "t1", body=b'"not an event"')
    await stage.prepare([*good, bad])
    for record in good:
        await stage.handle(record)
    with pytest.raises(ValueError, match="kind"):
        await stage.handle(bad)  # -> the poison topic, as before
    again = TrackerStage(ledger)
    await again.prepare(good)  # a replayed poll (at-least-once input): applied one by one, no error
    for record in good:
        await again.handle(record)
    assert (await ledger.count_by_status()) == {"validated": 1}

