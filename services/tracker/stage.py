"""Tracker stage: a poll's events projected into the ledger in one transaction, no records out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from services.core.envelope import Emit, Record
from services.core.errors import TransientError
from services.core.topics import EVENTS
from services.tracker.ledger import Ledger, LedgerEvent


class TrackerStage:
    """Projects every event into the ledger; replays of the same event change nothing."""

    name = "tracker"
    topics: Sequence[str] = (EVENTS,)

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._applied: set[str] = set()  # event ids `prepare` already projected

    async def prepare(self, records: Sequence[Record]) -> None:
        """Apply the whole poll's well-formed events in one transaction (one commit, not one per event).

        `handle` then only confirms them; when this fails, `handle` applies each event on its own,
        so a malformed event or an unavailable ledger still meets its usual fate, record by record.
        """
        await self.prepare_events(events_of(records))

    async def prepare_events(self, batch: Sequence[LedgerEvent]) -> None:
        """`prepare` for events already read from their records (the auditing tracker reads them once for both)."""
        try:
            await self.ledger.apply_many(batch)
        except TransientError:
            return
        self.confirm(batch)

    def confirm(self, batch: Sequence[LedgerEvent]) -> None:
        """These events are in the ledger (by `prepare`, or with the audit trail's rows): `handle` skips them."""
        # Added to, never reset: with the runner's lanes, records of an earlier poll may still be in hand.
        self._applied |= {ev.id for ev in batch}

    async def handle(self, record: Record) -> Sequence[Emit]:
        """Apply the event (unless prepared); a malformed one raises and ends on the poison topic."""
        if record.envelope.id in self._applied:  # an event's id is its envelope's: no need to read it again
            self._applied.discard(record.envelope.id)
        else:
            await self.ledger.apply(to_ledger_event(record))
        return ()


def events_of(records: Sequence[Record]) -> list[LedgerEvent]:
    """The well-formed events of a poll (a malformed one is left to `handle`, which sends it to the poison topic)."""
    batch = []
    for record in records:
        try:
            batch.append(to_ledger_event(record))
        except ValueError:
            continue
    return batch


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
