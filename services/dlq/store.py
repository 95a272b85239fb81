"""Dead letters read from the ledger (the tracker's projection) and acted on through the bus.

The ledger is the index (status, reason, outcome, where the record came from); the payload is in the
blob store (the delivery stage claim-checks every dead letter), so a replay needs no Kafka scan.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from services.core.blobstore import BlobStore
from services.core.bus import Bus
from services.core.errors import PermanentError
from services.dlq.logic import DeadLetter, DlqFilter, blob_of, discard_emit, replay_emits
from services.tracker import logic as status
from services.tracker.ledger import Ledger, deliveries, events, transfers


class NotDeadLettered(PermanentError):
    """When an operator names a delivery that is not (or no longer) a dead letter."""


@dataclass
class DlqService:
    """List, show, replay and discard dead letters."""

    ledger: Ledger
    bus: Bus
    blobs: BlobStore

    async def list(self, flt: DlqFilter | None = None, *, include_closed: bool = False,
                   limit: int = 500) -> list[DeadLetter]:
        """Dead letters matching `flt`, newest first; `include_closed` adds discarded ones."""
        wanted = [status.DEAD_LETTERED] + ([status.DISCARDED] if include_closed else [])
        query = (sa.select(deliveries, transfers.c.producer)
                 .join(transfers, transfers.c.id == deliveries.c.transfer_id)
                 .where(deliveries.c.status.in_(wanted)))
        flt = flt or DlqFilter()
        if flt.target:
            query = query.where(deliveries.c.target == flt.target)
        if flt.producer:
            query = query.where(transfers.c.producer == flt.producer)
        async with self.ledger.engine.connect() as conn:
            rows = (await conn.execute(query.order_by(deliveries.c.updated_at.desc()))).mappings().all()
            out = []
            for row in rows:
                dl = await self._entry(conn, row)
                if dl is not None and flt.matches(dl):
                    out.append(dl)
                if len(out) >= limit:
                    break
        return out

    async def get(self, dlq_id: str) -> DeadLetter | None:
        """One dead letter by `transfer/target` (also when discarded)."""
        transfer_id, _, target = dlq_id.partition("/")
        query = (sa.select(deliveries, transfers.c.producer)
                 .join(transfers, transfers.c.id == deliveries.c.transfer_id)
                 .where((deliveries.c.transfer_id == transfer_id) & (deliveries.c.target == target)))
        async with self.ledger.engine.connect() as conn:
            row = (await conn.execute(query)).mappings().first()
            return await self._entry(conn, row) if row is not None else None

    async def _entry(self, conn: Any, row: Any) -> DeadLetter | None:
        ev = (await conn.execute(
            sa.select(events.c.detail, events.c.time)
            .where((events.c.transfer_id == row["transfer_id"]) & (events.c.target == row["target"])
                   & (events.c.kind == "dead_lettered"))
            .order_by(events.c.time.desc()).limit(1))).mappings().first()
        if ev is None:
            return None
        detail = dict(ev["detail"] or {})
        when = ev["time"] if ev["time"].tzinfo else ev["time"].replace(tzinfo=UTC)
        return DeadLetter(
            transfer_id=row["transfer_id"], target=row["target"], producer=row["producer"], status=row["status"],
            attempts=row["attempts"], last_http_status=row["last_http_status"],
            reason=str(detail.get("reason", "")), outcome=row["outcome"] or detail.get("outcome"),
            first_failure=detail.get("first_failure"), last_failure=detail.get("last_failure"),
            dead_lettered_at=when, detail=detail,
        )

    async def payload(self, dl: DeadLetter) -> bytes:
        """The Bundle of a dead letter (operator rights only: it is health data)."""
        ref = blob_of(dl)
        if ref is None:
            raise NotDeadLettered(f"dead letter {dl.id} has no stored payload")
        return await self.blobs.get(ref)

    async def replay(self, dl: DeadLetter, operator: str, note: str | None = None) -> None:
        """Send the delivery round again, with a fresh attempt budget; tracked as `replayed`."""
        if dl.status not in (status.DEAD_LETTERED, status.DISCARDED):
            raise NotDeadLettered(f"{dl.id} is {dl.status}, not dead-lettered")
        ref = blob_of(dl)
        if ref is None:
            raise NotDeadLettered(f"dead letter {dl.id} has no stored payload; it cannot be replayed")
        await self.blobs.get(ref)  # refuse now, not at the target, if the payload is gone or corrupt
        await self.bus.publish(replay_emits(dl, ref, operator, note))

    async def replay_all(self, flt: DlqFilter, operator: str, note: str | None = None) -> builtins.list[str]:
        """Replay every open dead letter matching `flt`; returns their ids."""
        done: builtins.list[str] = []
        for dl in await self.list(flt):
            await self.replay(dl, operator, note)
            done.append(dl.id)
        return done

    async def discard(self, dl: DeadLetter, operator: str, reason: str) -> None:
        """Close a dead letter for good, saying why."""
        if dl.status != status.DEAD_LETTERED:
            raise NotDeadLettered(f"{dl.id} is {dl.status}, not dead-lettered")
        if not reason.strip():
            raise ValueError("a discard needs a reason")
        await self.bus.publish([discard_emit(dl, operator, reason)])


def parse_time(text: str | None) -> datetime | None:
    """An ISO 8601 time from an operator (UTC when no offset is given)."""
    if not text:
        return None
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
