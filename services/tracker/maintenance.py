"""`relais ledger purge|rebuild`: the ledger database's maintenance.

Retention: finished transfers, their history and old access-log lines go after N days. Health data must
not be kept longer than needed; the ledger holds none, but it says who sent what to whom and when, so it
is purged too (`relais ledger purge`, RELAIS_LEDGER_RETENTION_DAYS).

Rebuild: replay `transfers.events` from the beginning into an empty ledger. The ledger is a projection of
the events topic, so a lost or corrupt database is rebuilt by reading the topic again with a fresh consumer
group. Projection is idempotent and order-tolerant (see `tracker.logic`), so the result is the state the
tracker had built, for every event still retained (`relais ledger rebuild`).
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from services.core.bus import Bus, Partition
from services.core.errors import ConfigurationError
from services.core.logging import get_logger
from services.core.topics import EVENTS
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
from services.tracker.stage import to_ledger_event

log = get_logger(__name__)

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


@dataclass(frozen=True, slots=True)
class Rebuilt:
    """What a rebuild read and applied."""

    read: int
    applied: int
    skipped: int


async def is_empty(ledger: Ledger) -> bool:
    """True when the ledger holds no transfer and no event."""
    async with ledger.engine.connect() as conn:
        for table in (transfers, events):
            if (await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar_one():
                return False
    return True


async def rebuild(bus: Bus, ledger: Ledger, *, batch_size: int = 500, idle_s: float = 3.0) -> Rebuilt:
    """Read every retained event into `ledger` (which must be empty); returns once caught up.

    Caught up means: the group's lag is zero, or nothing arrived for `idle_s` (Kafka's transaction
    markers keep a lag of a few offsets that no record will ever fill).
    """
    await ledger.create_schema()
    if not await is_empty(ledger):
        raise ConfigurationError("the ledger is not empty: rebuild into a new database (point "
                                 "RELAIS_DATABASE_URL at an empty one), then switch the tracker to it")
    group = f"ledger-rebuild-{uuid.uuid4().hex[:8]}"
    sub = bus.subscribe(group, [EVENTS])
    await sub.start()
    read = applied = skipped = 0
    last_data = time.monotonic()
    try:
        while True:
            records = await sub.poll(batch_size, 0.5)
            if records:
                last_data = time.monotonic()
                offsets: dict[Partition, int] = defaultdict(int)
                for record in records:
                    read += 1
                    try:
                        event = to_ledger_event(record)
                    except ValueError:
                        skipped += 1  # the tracker sent it to the poison topic too
                    else:
                        applied += await ledger.apply(event)
                    part = Partition(record.topic, record.partition)
                    offsets[part] = max(offsets[part], record.offset + 1)
                await sub.complete([], offsets)
                continue
            if sum((await bus.lag(group, [EVENTS])).values()) <= 0 or time.monotonic() - last_data > idle_s:
                break
    finally:
        await sub.stop()
    log.info("ledger rebuilt", read=read, applied=applied, skipped=skipped)
    return Rebuilt(read, applied, skipped)
