"""Dead letters read from the ledger (the tracker's projection) and acted on through the bus.

The ledger is the index (status, reason, outcome, where the record came from). A delivery dead
letter's payload is in the blob store (delivery claim-checks every one); a stage's dead letter is read
back from the poison topic, where the runner keeps the whole record. Replays and discards are atomic
state changes: a conditional UPDATE of the dead letter's row (`WHERE status = 'dead-lettered'`, checked
by its row count) claims it before anything is published, so of two concurrent replays one wins and
the other is refused (AlreadyHandled, HTTP 409) — the target never gets the Bundle twice from that.

A process killed between the claim and the publish leaves the row `replaying` with no `replayed`
event. Publishing is atomic with that event, so once the tracker has projected every event (no lag on
its topic) and the claim is older than `stale_claim_s`, nothing was published: a new replay may take
the claim over. While either is not so, the claim stands and the replay is refused.
"""

from __future__ import annotations

import builtins
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from services.core.blobstore import BlobIntegrityError, BlobStore, resolve_payload
from services.core.bus import Bus
from services.core.clock import aware
from services.core.envelope import Record
from services.core.errors import PermanentError
from services.core.shielded import shielded
from services.core.topics import EVENTS, POISON
from services.dlq.logic import DeadLetter, DlqFilter, blob_of, discard_emit, replay_emits, stage_replay_emits
from services.tracker import logic as status
from services.tracker.ledger import Ledger, deliveries, events, stage_dead_letters, transfers


class NotDeadLettered(PermanentError):
    """When an operator names a dead letter whose payload is gone or that cannot be acted on."""


class AlreadyHandled(NotDeadLettered):
    """When another replay or discard of the same dead letter got there first (HTTP 409)."""


OPEN = (status.DEAD_LETTERED,)
REPLAYABLE = (status.DEAD_LETTERED, status.DISCARDED)
READ_TIMEOUT_S = 30.0  # reading a stage's dead letter back from the poison topic


async def read_poison(bus: Bus, poison_id: str, *, timeout_s: float = READ_TIMEOUT_S) -> Record | None:
    """The poison record whose envelope id is `poison_id`, or None when the topic no longer holds it.

    The bus has no random access, so this reads the topic from its start with a throw-away consumer group
    that never commits, up to the heads it had when asked. The poison topic only holds records no stage
    could handle, so it stays small; this runs on an operator's replay or payload read, never on the
    record path.
    """
    if not poison_id:
        return None
    group = f"dlq-reader-{uuid.uuid4().hex[:12]}"
    heads = {p: head for p, head in (await bus.lag(group, [POISON])).items() if head > 0}
    if not heads:
        return None
    sub = bus.subscribe(group, [POISON])
    await sub.start()
    try:
        positions = dict.fromkeys(heads, -1)
        deadline = time.monotonic() + timeout_s
        while any(positions[p] < head - 1 for p, head in heads.items()) and time.monotonic() < deadline:
            for record in await sub.poll(500, 0.5):
                if record.envelope.id == poison_id:
                    return record
                partition = next((p for p in heads if (p.topic, p.partition) == (record.topic, record.partition)),
                                 None)
                if partition is not None:
                    positions[partition] = record.offset
        return None
    finally:
        await sub.stop()


@dataclass
class DlqService:
    """List, show, replay and discard dead letters of every stage."""

    ledger: Ledger
    bus: Bus
    blobs: BlobStore
    stale_claim_s: float = 300.0  # far beyond a replay's claim-to-publish time (milliseconds)

    async def list(self, flt: DlqFilter | None = None, *, include_closed: bool = False,
                   limit: int = 500) -> builtins.list[DeadLetter]:
        """Dead letters matching `flt`, newest first; `include_closed` adds discarded ones."""
        wanted = [status.DEAD_LETTERED] + ([status.DISCARDED] if include_closed else [])
        flt = flt or DlqFilter()
        found: builtins.list[DeadLetter] = []
        async with self.ledger.engine.connect() as conn:
            if flt.stage in (None, "delivery"):
                query = (sa.select(deliveries, transfers.c.producer)
                         .join(transfers, transfers.c.id == deliveries.c.transfer_id)
                         .where(deliveries.c.status.in_(wanted)))
                if flt.target:
                    query = query.where(deliveries.c.target == flt.target)
                if flt.transfer_id:
                    query = query.where(deliveries.c.transfer_id == flt.transfer_id)
                if flt.producer:
                    query = query.where(transfers.c.producer == flt.producer)
                for row in (await conn.execute(query.order_by(deliveries.c.updated_at.desc()))).mappings().all():
                    dl = await self._delivery_entry(conn, row)
                    if dl is not None:
                        found.append(dl)
            query = (sa.select(stage_dead_letters, transfers.c.producer)
                     .join(transfers, transfers.c.id == stage_dead_letters.c.transfer_id, isouter=True)
                     .where(stage_dead_letters.c.status.in_(wanted)))
            if flt.transfer_id:
                query = query.where(stage_dead_letters.c.transfer_id == flt.transfer_id)
            found += [_stage_entry(row) for row in (await conn.execute(query)).mappings().all()]
        found.sort(key=lambda d: d.dead_lettered_at, reverse=True)
        return [d for d in found if flt.matches(d)][:limit]

    async def get(self, dlq_id: str) -> DeadLetter | None:
        """One dead letter by `transfer/slot` (also when discarded or replayed)."""
        transfer_id, _, slot = dlq_id.partition("/")
        async with self.ledger.engine.connect() as conn:
            if slot.startswith("@"):
                row = (await conn.execute(
                    sa.select(stage_dead_letters, transfers.c.producer)
                    .join(transfers, transfers.c.id == stage_dead_letters.c.transfer_id, isouter=True)
                    .where((stage_dead_letters.c.transfer_id == transfer_id)
                           & (stage_dead_letters.c.slot == slot)))).mappings().first()
                return _stage_entry(row) if row is not None else None
            row = (await conn.execute(
                sa.select(deliveries, transfers.c.producer)
                .join(transfers, transfers.c.id == deliveries.c.transfer_id)
                .where((deliveries.c.transfer_id == transfer_id) & (deliveries.c.target == slot)))).mappings().first()
            return await self._delivery_entry(conn, row) if row is not None else None

    async def _delivery_entry(self, conn: Any, row: Any) -> DeadLetter | None:
        ev = (await conn.execute(
            sa.select(events.c.detail, events.c.time)
            .where((events.c.transfer_id == row["transfer_id"]) & (events.c.target == row["target"])
                   & (events.c.kind == "dead_lettered"))
            .order_by(events.c.time.desc()).limit(1))).mappings().first()
        if ev is None:
            return None
        detail = dict(ev["detail"] or {})
        return DeadLetter(
            transfer_id=row["transfer_id"], slot=row["target"], stage="delivery", target=row["target"],
            producer=row["producer"], status=row["status"], attempts=row["attempts"],
            last_http_status=row["last_http_status"], reason=str(detail.get("reason", "")),
            outcome=row["outcome"] or detail.get("outcome"), first_failure=detail.get("first_failure"),
            last_failure=detail.get("last_failure"), dead_lettered_at=aware(ev["time"]), detail=detail,
        )

    async def payload(self, dl: DeadLetter) -> bytes:
        """The Bundle of a dead letter (operator rights only: it is health data)."""
        if not dl.is_delivery:
            found = await read_poison(self.bus, str(dl.detail.get("poison_id") or ""))
            if found is None:
                raise NotDeadLettered(f"dead letter {dl.id}: its record is no longer on the poison topic "
                                      "(past RELAIS_DLQ_RETENTION_DAYS?)")
            return await resolve_payload(self.blobs, found.envelope.data, found.envelope.extra)
        ref = blob_of(dl)
        if ref is None:
            raise NotDeadLettered(f"dead letter {dl.id} has no stored payload")
        return await self.blobs.get(ref)

    async def replay(self, dl: DeadLetter, operator: str, note: str | None = None) -> None:
        """Send the record back to where it failed (a delivery with a fresh attempt budget); tracked as `replayed`.

        Raises AlreadyHandled when the dead letter is not open any more (e.g. a concurrent replay won).
        """
        if dl.is_delivery:
            ref = blob_of(dl)
            if ref is None:
                raise NotDeadLettered(f"dead letter {dl.id} has no stored payload; it cannot be replayed")
            await self.blobs.get(ref)  # refuse now, not at the target, if the payload is gone or corrupt
            emits = replay_emits(dl, ref, operator, note)
        else:
            found = await read_poison(self.bus, str(dl.detail.get("poison_id") or ""))
            if found is None:
                raise NotDeadLettered(f"dead letter {dl.id}: its record is no longer on the poison topic "
                                      "(past RELAIS_DLQ_RETENTION_DAYS?); it cannot be replayed")
            emits = stage_replay_emits(dl, found.envelope, found.key, operator, note)
        try:
            before = await self._claim(dl, REPLAYABLE, status.REPLAYING)
        except AlreadyHandled:
            before = await self._take_over_stale_claim(dl)
        try:
            await self.bus.publish(emits)
        except BaseException:
            await self._release(dl, status.REPLAYING, before)  # nothing was published: it is still open
            raise

    async def replay_all(self, flt: DlqFilter, operator: str,
                         note: str | None = None) -> tuple[builtins.list[str], dict[str, str]]:
        """Replay every open dead letter matching `flt`; returns the ids replayed and, by id, why others were not."""
        done: builtins.list[str] = []
        skipped: dict[str, str] = {}
        for dl in await self.list(flt):
            try:
                await self.replay(dl, operator, note)
            except (NotDeadLettered, BlobIntegrityError) as exc:  # e.g. another operator got there first
                skipped[dl.id] = str(exc)
                continue
            done.append(dl.id)
        return done, skipped

    async def discard(self, dl: DeadLetter, operator: str, reason: str) -> None:
        """Close a dead letter for good, saying why."""
        if not reason.strip():
            raise ValueError("a discard needs a reason")
        before = await self._claim(dl, OPEN, status.DISCARDED)
        try:
            await self.bus.publish([discard_emit(dl, operator, reason)])
        except BaseException:
            await self._release(dl, status.DISCARDED, before)
            raise

    # --- the atomic state change -------------------------------------------------------------
    def _where(self, dl: DeadLetter) -> tuple[sa.Table, sa.ColumnElement[bool]]:
        if dl.is_delivery:
            return deliveries, (deliveries.c.transfer_id == dl.transfer_id) & (deliveries.c.target == dl.slot)
        return stage_dead_letters, ((stage_dead_letters.c.transfer_id == dl.transfer_id)
                                    & (stage_dead_letters.c.slot == dl.slot))

    @shielded
    async def _claim(self, dl: DeadLetter, allowed: Iterable[str], to: str) -> str:
        """Move the dead letter from one of `allowed` to `to` by conditional UPDATEs; returns its former status.

        Each UPDATE is its own write (no read first), so concurrent claims queue on the database's
        write lock and exactly one sees a row count of 1.
        """
        table, where = self._where(dl)
        for before in allowed:
            async with self.ledger.engine.begin() as conn:
                moved = await conn.execute(table.update().where(where & (table.c.status == before))
                                           .values(status=to, updated_at=datetime.now(UTC)))
            if moved.rowcount == 1:
                return before
        raise await self._refusal(dl)

    @shielded
    async def _take_over_stale_claim(self, dl: DeadLetter) -> str:
        """Claim a dead letter left `replaying` by a replay that died before publishing; else AlreadyHandled."""
        table, where = self._where(dl)
        stale = (where & (table.c.status == status.REPLAYING)
                 & (table.c.updated_at < datetime.now(UTC) - timedelta(seconds=self.stale_claim_s)))
        async with self.ledger.engine.connect() as conn:
            if (await conn.execute(sa.select(table.c.status).where(stale))).first() is None:
                raise await self._refusal(dl)
        if any((await self.bus.lag("tracker", [EVENTS])).values()):
            raise AlreadyHandled(f"{dl.id} was claimed by a replay that may not have finished; the tracker is "
                                 "still catching up with events — try again in a minute")
        async with self.ledger.engine.begin() as conn:
            moved = await conn.execute(table.update().where(stale).values(updated_at=datetime.now(UTC)))
        if moved.rowcount != 1:
            raise await self._refusal(dl)
        return status.DEAD_LETTERED

    async def _refusal(self, dl: DeadLetter) -> AlreadyHandled:
        table, where = self._where(dl)
        async with self.ledger.engine.connect() as conn:
            current = (await conn.execute(sa.select(table.c.status).where(where))).scalar_one_or_none()
        return AlreadyHandled(f"{dl.id} is {current or 'gone'}, not dead-lettered: another replay or discard "
                              "got there first (see its timeline)")

    @shielded
    async def _release(self, dl: DeadLetter, claimed: str, before: str) -> None:
        table, where = self._where(dl)
        async with self.ledger.engine.begin() as conn:
            await conn.execute(table.update().where(where & (table.c.status == claimed)).values(status=before))


def _stage_entry(row: Any) -> DeadLetter:
    detail = dict(row["detail"] or {})
    when = aware(row["dead_lettered_at"])
    return DeadLetter(
        transfer_id=row["transfer_id"], slot=row["slot"], stage=row["stage"], target=row["target"],
        producer=row.get("producer"), status=row["status"], attempts=int(detail.get("attempts") or 0),
        last_http_status=None, reason=str(detail.get("reason", "")), outcome=None,
        first_failure=when.isoformat(), last_failure=when.isoformat(), dead_lettered_at=when, detail=detail,
    )


def parse_time(text: str | None) -> datetime | None:
    """An ISO 8601 time from an operator (UTC when no offset is given)."""
    if not text:
        return None
    return aware(datetime.fromisoformat(text))
