"""Ledger retention: finished transfers, their history and old access-log lines go after N days.

Health data must not be kept longer than needed; the ledger holds none, but it says who sent what
to whom and when, so it is purged too (`relais ledger purge`, RELAIS_LEDGER_RETENTION_DAYS).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from services.tracker import logic
from services.tracker.ledger import (
    Ledger,
    access_log,
    deliveries,
    events,
    ops_sessions,
    stage_dead_letters,
    transfer_identifiers,
    transfers,
)

BATCH = 500


@dataclass(frozen=True, slots=True)
class Purged:
    """How much a purge removed."""

    transfers: int
    deliveries: int
    events: int
    access_log: int


async def purge(ledger: Ledger, older_than: timedelta, *, now: datetime | None = None) -> Purged:
    """Remove transfers in a terminal state not updated since `older_than`, with their deliveries and events.

    Transfers still in flight are kept whatever their age: an operator may still need them.
    """
    cutoff = (now or datetime.now(UTC)) - older_than
    counts = [0, 0, 0, 0]
    while True:
        async with ledger.engine.begin() as conn:
            ids = (await conn.execute(
                sa.select(transfers.c.id).where(transfers.c.status.in_(sorted(logic.TERMINAL))
                                                & (transfers.c.updated_at < cutoff)).limit(BATCH))).scalars().all()
            if not ids:
                break
            counts[2] += (await conn.execute(events.delete().where(events.c.transfer_id.in_(ids)))).rowcount or 0
            counts[1] += (await conn.execute(
                deliveries.delete().where(deliveries.c.transfer_id.in_(ids)))).rowcount or 0
            # A transfer's search keys and stage dead letters go with it.
            await conn.execute(transfer_identifiers.delete().where(transfer_identifiers.c.transfer_id.in_(ids)))
            await conn.execute(stage_dead_letters.delete().where(stage_dead_letters.c.transfer_id.in_(ids)))
            counts[0] += (await conn.execute(transfers.delete().where(transfers.c.id.in_(ids)))).rowcount or 0
    async with ledger.engine.begin() as conn:
        counts[3] = (await conn.execute(access_log.delete().where(access_log.c.time < cutoff))).rowcount or 0
        await conn.execute(ops_sessions.delete().where(ops_sessions.c.expires_at < datetime.now(UTC)))
    return Purged(*counts)
