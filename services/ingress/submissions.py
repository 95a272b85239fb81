"""What ingress accepted, recorded in the ledger database before it answers 202; idempotent submission.

Two promises rest on this table (`ledger.submissions`), shared by every ingress replica:

* **A 202 is a promise.** The row is written *before* the transfer is published, so from the moment
  a producer holds a status URL, every replica finds the transfer — in the tracker's projection, or
  here while the tracker is down or behind (202, in progress).
* **A retried POST is the same transfer.** A producer's `Idempotency-Key` (IETF httpapi draft), or
  else its `Bundle.identifier`, maps to one transfer id under a unique constraint: the same key with
  the same request answers the same `Content-Location` and publishes nothing; a different request
  under that key is refused (422); two at once: one insert wins, the other waits for its outcome.

Failure orders, and why they are safe:

* row written, publish refused (`BusUnavailable`): the row is marked `failed` and the producer gets
  503; a retry with the key takes the transfer over and publishes it (same transfer id).
* row written, process killed before the publish was acknowledged: the row stays `publishing`; after
  `STALE_AFTER_S` a retry with the key takes it over — unless the tracker already recorded an event of
  that transfer (the publish did happen), in which case it is simply marked published. The one window
  left is a crash after Kafka's acknowledgement, with the tracker behind, and a retry after
  `STALE_AFTER_S`: that transfer is published twice (conditional create makes this harmless at the target).
* published, row never written: impossible — nothing is published before its row is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from services.core.clock import aware
from services.core.envelope import new_id
from services.core.errors import TransientError
from services.core.logging import get_logger
from services.core.shielded import finish, shielded
from services.ingress import checks
from services.ingress.checks import Refusal
from services.tracker.dbfaults import unavailable
from services.tracker.ledger import Ledger, events, submissions

log = get_logger(__name__)

IDEMPOTENCY_HEADER = "Idempotency-Key"
PUBLISHING, PUBLISHED, FAILED = "publishing", "published", "failed"
STALE_AFTER_S = 30.0  # a `publishing` row older than this belongs to a request that died
WAIT_STEP_S = 0.05
MAX_KEY_CHARS = 255
_KEY = re.compile(r'^[\x20-\x7e]{1,255}$')

Verdict = Literal["new", "replay", "takeover", "busy", "conflict"]


@dataclass(frozen=True, slots=True)
class Claim:
    """What a submission found: publish it (`new`, `takeover`), answer as before (`replay`), wait for the
    request that holds the key (`busy`), or refuse a different request under the same key (`conflict`)."""

    verdict: Verdict
    transfer_id: str


def idempotency_key(header: str | None, bundle: Mapping[str, Any], targets: Sequence[str]) -> str | None:
    """The submission's key: the Idempotency-Key header (a structured-field string; a bare token is
    accepted too), else `Bundle.identifier` (system|value) for these targets — one export sent to a
    second target is a new request — else None (no idempotency)."""
    if header is not None:
        value = header.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        if not _KEY.match(value):
            raise checks.refuse(400, "invalid", f"the {IDEMPOTENCY_HEADER} header must be a string of 1 to "
                                f"{MAX_KEY_CHARS} printable ASCII characters, e.g. {IDEMPOTENCY_HEADER}: "
                                '"8e03978e-40d5-43e8-bc93-6894a57f9324"', rule="relais-ingress-idempotency-key")
        return f"h:{value}"
    ident = bundle.get("identifier")
    if isinstance(ident, dict) and isinstance(ident.get("value"), str) and ident["value"]:
        system = ident.get("system") if isinstance(ident.get("system"), str) else ""
        return f"id:{','.join(sorted(targets))}:{system}|{ident['value']}"[:320]
    return None


def fingerprint(targets: Sequence[str], body: bytes) -> str:
    """What makes two requests under one key 'the same request': the targets and the exact body."""
    digest = hashlib.sha256()
    digest.update(",".join(sorted(targets)).encode())
    digest.update(b"\n")
    digest.update(body)
    return digest.hexdigest()


@shielded
async def claim(ledger: Ledger, producer: str, key: str | None, print_: str, window_s: float) -> Claim:
    """Record a new submission, or find the one this key already names (see the module docstring)."""
    with unavailable("ledger"):
        return await _claim(ledger, producer, key, print_, window_s)


async def _claim(ledger: Ledger, producer: str, key: str | None, print_: str, window_s: float) -> Claim:
    for _ in range(5):
        now = datetime.now(UTC)
        transfer_id = new_id()
        try:
            async with ledger.submissions_engine.begin() as conn:
                await conn.execute(submissions.insert().values(
                    transfer_id=transfer_id, producer=producer, idem_key=key, fingerprint=print_,
                    state=PUBLISHING, created_at=now, updated_at=now))
            return Claim("new", transfer_id)
        except IntegrityError:
            if key is None:
                continue  # a transfer id collision: draw another
        async with ledger.submissions_engine.begin() as conn:
            row = (await conn.execute(sa.select(submissions).where(
                submissions.c.producer == producer, submissions.c.idem_key == key))).mappings().first()
            if row is None:
                continue  # expired and purged meanwhile: insert again
            if aware(row["created_at"]) < now - timedelta(seconds=window_s):
                # The key's window is over: it names nothing any more.
                await conn.execute(submissions.delete().where(submissions.c.transfer_id == row["transfer_id"]))
                continue
            if row["fingerprint"] != print_:
                return Claim("conflict", row["transfer_id"])
            if row["state"] == PUBLISHED:
                return Claim("replay", row["transfer_id"])
            stale = aware(row["updated_at"]) < now - timedelta(seconds=STALE_AFTER_S)
            if row["state"] == PUBLISHING and not stale:
                return Claim("busy", row["transfer_id"])
            seen = await _has_events(ledger, str(row["transfer_id"]))
            new_state = PUBLISHED if seen else PUBLISHING
            # Compare-and-set: of two retries taking over at once, one wins; the other waits for it.
            taken = await conn.execute(submissions.update().where(
                submissions.c.transfer_id == row["transfer_id"], submissions.c.state == row["state"],
                submissions.c.updated_at == row["updated_at"]).values(state=new_state, updated_at=now))
            if taken.rowcount != 1:
                return Claim("busy", row["transfer_id"])
            return Claim("replay" if seen else "takeover", row["transfer_id"])
    raise TransientError("could not record the submission after 5 tries")


async def _has_events(ledger: Ledger, transfer_id: str) -> bool:
    """Whether the tracker recorded anything of this transfer (then its publish did happen)."""
    async with ledger.engine.connect() as conn:
        return (await conn.execute(sa.select(events.c.id).where(
            events.c.transfer_id == transfer_id).limit(1))).first() is not None


@shielded
async def settle(ledger: Ledger, transfer_ids: Sequence[str], state: str) -> None:
    """Mark submissions published (or failed); best effort — see the module docstring for why."""
    with unavailable("ledger"):
        async with ledger.submissions_engine.begin() as conn:
            await conn.execute(submissions.update().where(submissions.c.transfer_id.in_(transfer_ids))
                               .values(state=state, updated_at=datetime.now(UTC)))


async def wait_for(ledger: Ledger, transfer_id: str, timeout_s: float) -> str | None:
    """The state of a submission another request is publishing, once it is not `publishing` (or at timeout)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        row = await lookup(ledger, transfer_id)
        if row is None or row["state"] != PUBLISHING or asyncio.get_running_loop().time() > deadline:
            return None if row is None else str(row["state"])
        await asyncio.sleep(WAIT_STEP_S)


@shielded
async def lookup(ledger: Ledger, transfer_id: str) -> Mapping[str, Any] | None:
    """The submission row of a transfer, or None."""
    with unavailable("ledger"):
        async with ledger.submissions_engine.connect() as conn:
            row = (await conn.execute(sa.select(submissions).where(
                submissions.c.transfer_id == transfer_id))).mappings().first()
            return dict(row) if row is not None else None


@shielded
async def purge(ledger: Ledger, window_s: float) -> int:
    """Forget submissions (and their keys) older than the idempotency window."""
    before = datetime.now(UTC) - timedelta(seconds=window_s)
    async with ledger.submissions_engine.begin() as conn:
        result = await conn.execute(submissions.delete().where(submissions.c.created_at < before))
    return int(result.rowcount or 0)


class Background:
    """The ingress's writes to the submissions table that POSTs share, group-committed: every write queued while
    the previous one was in flight goes into the next transaction (one write for many POSTs, not one per POST).

    * `claim`: a new submission's row, before its 202 — the caller waits for the commit;
    * `mark_published`: after the 202, returns at once; drained at stop. A write lost here leaves rows
      `publishing`, which the module docstring shows is safe.
    """

    def __init__(self) -> None:
        self._new: list[tuple[dict[str, Any], asyncio.Future[bool]]] = []
        self._published: list[str] = []
        self._writer: asyncio.Task[None] | None = None
        self.transactions = 0  # tests and benchmarks read it

    async def claim(self, ledger: Ledger, producer: str, key: str | None, print_: str, window_s: float) -> Claim:
        """`claim`, with the row of a new submission inserted together with other POSTs' rows; anything else (the
        key is known, an id collides, the database fails) is decided by `claim` alone."""
        now, transfer_id = datetime.now(UTC), new_id()
        row = {"transfer_id": transfer_id, "producer": producer, "idem_key": key, "fingerprint": print_,
               "state": PUBLISHING, "created_at": now, "updated_at": now}
        inserted: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._new.append((row, inserted))
        self._wake(ledger)
        if await finish(inserted):
            return Claim("new", transfer_id)
        return await claim(ledger, producer, key, print_, window_s)

    def _wake(self, ledger: Ledger) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(ledger), name="submissions-writer")

    def mark_published(self, ledger: Ledger, transfer_id: str) -> None:
        """Queue `transfer_id` to be marked published; returns at once."""
        self._published.append(transfer_id)
        self._wake(ledger)

    async def _write(self, ledger: Ledger) -> None:
        while self._new or self._published:
            new, self._new = self._new, []
            transfer_ids, self._published = self._published, []
            # One transaction for both: a claim waiting for its commit never also waits for a separate settle.
            ok = await self._commit(ledger, [row for row, _ in new], transfer_ids)
            for _, inserted in new:
                if not inserted.done():
                    inserted.set_result(ok)
            if transfer_ids and not ok:
                try:
                    await settle(ledger, transfer_ids, PUBLISHED)
                    self.transactions += 1
                except Exception as exc:  # noqa: BLE001 - best effort, see the module docstring
                    with contextlib.suppress(Exception):
                        log.warning("transfers published but not marked so in the ledger",
                                    transfers=len(transfer_ids), error=str(exc))

    @shielded
    async def _commit(self, ledger: Ledger, rows: list[dict[str, Any]], published: list[str]) -> bool:
        """Insert new submissions' rows and mark published ones in one transaction; False (nothing written)
        when a row cannot be inserted (each of those claims then decides alone, and reports a database fault)."""
        try:
            async with ledger.submissions_engine.begin() as conn:
                if rows:
                    await conn.execute(submissions.insert(), rows)
                if published:
                    await conn.execute(submissions.update().where(submissions.c.transfer_id.in_(published))
                                       .values(state=PUBLISHED, updated_at=datetime.now(UTC)))
        except Exception:  # noqa: BLE001 - see above
            return False
        self.transactions += 1
        return True

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Let pending writes finish (at shutdown), within `timeout_s`."""
        if self._writer is not None and not self._writer.done():
            await asyncio.wait({self._writer}, timeout=timeout_s)


def key_conflict(transfer_id: str) -> Refusal:
    """422: this key already names another request (IETF httpapi idempotency draft)."""
    return checks.refuse(422, "conflict", f"this {IDEMPOTENCY_HEADER} (or Bundle.identifier) was already used for "
                         f"a different request (transfer {transfer_id}, other body or targets); use a new key for a "
                         "new request, or resend exactly the same one", "Bundle", rule="relais-ingress-idempotency")


def key_busy(retry_after_s: int) -> Refusal:
    """409: a request with this key is still being stored (IETF httpapi idempotency draft)."""
    return checks.refuse(409, "conflict", f"a request with this {IDEMPOTENCY_HEADER} is still being stored; retry "
                         "shortly with the same key", rule="relais-ingress-idempotency-busy",
                         headers={"Retry-After": str(retry_after_s)})
