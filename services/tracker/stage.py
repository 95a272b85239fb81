"""Tracker stage: one event in, one idempotent ledger write, no records out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from services.core.envelope import Emit, Record
from services.core.topics import EVENTS
from services.tracker.ledger import Ledger, LedgerEvent


class TrackerStage:
    """Projects every event into the ledger; replays of the same event change nothing."""

    name = "tracker"
    topics: Sequence[str] = (EVENTS,)

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def handle(self, record: Record) -> Sequence[Emit]:
        """Apply the event; a malformed one raises and ends on the poison topic."""
        await self.ledger.apply(to_ledger_event(record))
        return ()


def to_ledger_event(record: Record) -> LedgerEvent:
    """The ledger's view of an event record; raises ValueError when it is not one."""
    env = record.envelope
    detail: Any = orjson.loads(env.data)
    if not isinstance(detail, dict) or "kind" not in detail or "stage" not in detail:
        raise ValueError("event record value must be a JSON object with 'kind' and 'stage'")
    return LedgerEvent(
        id=env.id, transfer_id=env.transfer_id, kind=str(detail["kind"]), stage=str(detail["stage"]),
        time=env.time, producer=env.producer, target=env.target, attempt=env.attempt,
        detail={k: v for k, v in detail.items() if k not in ("kind", "stage")},
    )
