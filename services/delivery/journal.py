"""The attempt journal: a POST to a target is recorded before it is made, so a crash leaves it *in doubt*.

A POST is not part of any bus transaction: a delivery process killed after sending but before its
outcome is committed would, on restart, read the record again and send it again. The journal (table
`delivery_attempts` in the ledger database, which every delivery replica shares) closes that gap:

* before attempt N of (transfer, target) is POSTed, the stage *claims* it: a row says it started — if that
  row cannot be written the POST is not made (`TransientError`: the record waits, the stage backs off);
* when the answer comes, the row says what it was (delivered with its transaction-response, or
  certainly not applied);
* once the outcome is committed on the bus the row is closed; rows are purged by age.

A record can also be read twice: Kafka hands a partition over from its committed offset, which can lag
the last transaction of the member that held it, and a member that lost a partition may still be in the
middle of a POST. So two copies of one delivery record can each go their way, and the journal, not the
bus, keeps one chain of attempts per (transfer, target, round) — `judge` says what a copy may do:

* a later attempt exists: this copy is stale, another carries the transfer on (it is dropped);
* an attempt of the chain was delivered: the outcome is known, nothing is sent again;
* the attempt (or the one before it) was started and may still be in flight — its POST's time bound
  has not passed, whoever made it: wait for its outcome (a request a process sent just before it died
  may still be executing at the target: probing then would find nothing and send it twice);
* started and past that bound without an answer: in doubt, resolved like an ambiguous failure (probe,
  or the target's policy), never blindly.

A DLQ replay starts a new round (its `replays` count), so its attempts never meet the old ones.
"""

from __future__ import annotations

import enum
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.core.envelope import Envelope
from services.core.errors import TransientError
from services.core.logging import get_logger
from services.core.shielded import shielded
from services.core.targets import Target
from services.tracker.ledger import delivery_attempts as table

log = get_logger(__name__)

STARTED, DELIVERED, NOT_APPLIED, IN_DOUBT = "started", "delivered", "not-applied", "in-doubt"
# Beyond the target's timeouts: clocks of delivery hosts that differ a little, the journal write after the answer.
IN_FLIGHT_MARGIN_S = 5.0


class ClaimVerdict(enum.Enum):
    """What a delivery record may do with the attempt it is about to make (`judge`)."""

    GO = "go"                  # claimed: make the POST
    BUSY = "busy"              # this attempt or the one before may be in flight elsewhere: wait for its outcome
    DELIVERED = "delivered"    # an attempt of the chain was applied: report it, send nothing
    IN_DOUBT = "in-doubt"      # started, no answer, past its time bound: resolve like an ambiguous failure
    SUPERSEDED = "superseded"  # a later attempt exists: this is a stale copy of the record


@dataclass(frozen=True, slots=True)
class AttemptKey:
    """Attempt `attempt` (1-based) of round `round` (0, then one per replay) of (transfer, target)."""

    transfer_id: str
    target: str
    round: int
    attempt: int

    @classmethod
    def next_of(cls, env: Envelope) -> AttemptKey:
        """The attempt a delivery record is about to make."""
        try:
            replays = int(env.extra.get("replays", "0") or 0)
        except ValueError:
            replays = 0
        return cls(env.transfer_id, env.target or "", replays, env.attempt + 1)


@dataclass(frozen=True, slots=True)
class Prior:
    """What the journal knows of an attempt made before (by this process or a crashed one)."""

    state: str
    started_at: datetime
    process: str | None
    http_status: int | None = None
    response: dict[str, Any] | None = None
    assigned: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Claim:
    """The verdict on an attempt, with the row it rests on (None when the attempt is new)."""

    verdict: ClaimVerdict
    prior: Prior | None = None


def judge(key: AttemptKey, chain: Mapping[int, Prior], now: datetime, in_flight_s: float) -> Claim:
    """What attempt `key` may do, given every attempt of its (transfer, target, round) so far, by number.

    `in_flight_s` bounds how long a started POST can still be running (the target's timeouts and a margin).
    """
    later = [n for n in chain if n > key.attempt]
    if later:
        return Claim(ClaimVerdict.SUPERSEDED, chain[max(later)])
    delivered = next((chain[n] for n in sorted(chain) if chain[n].state == DELIVERED), None)
    if delivered is not None:
        return Claim(ClaimVerdict.DELIVERED, delivered)
    mine = chain.get(key.attempt)
    if mine is None:
        before = chain.get(key.attempt - 1)
        if before is not None and _maybe_in_flight(before, now, in_flight_s):
            return Claim(ClaimVerdict.BUSY, before)
        return Claim(ClaimVerdict.GO)
    if mine.state == NOT_APPLIED:
        return Claim(ClaimVerdict.GO, mine)  # it certainly failed and its retry was never made: make it again
    if _maybe_in_flight(mine, now, in_flight_s):
        return Claim(ClaimVerdict.BUSY, mine)
    return Claim(ClaimVerdict.IN_DOUBT, mine)


def _maybe_in_flight(prior: Prior, now: datetime, in_flight_s: float) -> bool:
    return prior.state == STARTED and (now - prior.started_at).total_seconds() < in_flight_s


def in_flight_s(target: Target) -> float:
    """How long a POST to `target` may still be running after it started: its whole time bound, and a margin."""
    return target.timeouts.connect_s + target.timeouts.total_s + IN_FLIGHT_MARGIN_S


class _Overturned(Exception):
    """Internal: the chain moved while this attempt was being claimed; `claim` is what it says now."""

    def __init__(self, claim: Claim) -> None:
        self.claim = claim


class AttemptJournal:
    """Reads and writes `delivery_attempts`; what must hold raises `TransientError`, the rest is best effort."""

    def __init__(self, engine: AsyncEngine, process: str | None = None) -> None:
        self.engine = engine
        self.process = process or f"{socket.gethostname()}-{os.getpid()}"

    @shielded
    async def prior(self, key: AttemptKey) -> Prior | None:
        """The row of this very attempt, if one was started before."""
        try:
            async with self.engine.connect() as conn:
                row = (await conn.execute(sa.select(table).where(_where(key)))).mappings().first()
        except (SQLAlchemyError, OSError) as exc:
            raise TransientError(f"attempt journal unreadable, delivery waits: {exc}") from exc
        return None if row is None else _prior(row)

    @shielded
    async def claim(self, key: AttemptKey, in_flight_s: float) -> Claim:
        """Judge attempt `key` against its chain and, on GO, record that it starts — atomically.

        Raises TransientError (and the POST must not be made) if the journal cannot be read or written.
        The chain is judged twice: before the write, and again once this transaction holds the write (PostgreSQL
        locks the chain's rows from the first read; SQLite reads outside any transaction until the first write,
        after which no other writer can change the chain before this one commits). A claim the second judgement
        overturns is rolled back, and the copy told what the chain says now (wait, or drop).
        """
        now = datetime.now(UTC)
        try:
            async with self.engine.begin() as conn:
                claim = judge(key, await _read_chain(conn, key), now, in_flight_s)
                if claim.verdict is not ClaimVerdict.GO:
                    return claim
                if not await self._start(conn, key, claim.prior, now):
                    return Claim(ClaimVerdict.BUSY, claim.prior)  # another copy claimed it again first
                chain = await _read_chain(conn, key)
                if claim.prior is None:
                    del chain[key.attempt]  # the chain as it is but for this claim
                else:
                    chain[key.attempt] = claim.prior
                again = judge(key, chain, now, in_flight_s)
                if again.verdict is not ClaimVerdict.GO:
                    raise _Overturned(again)  # rolls the claim back
                return claim
        except _Overturned as overturned:
            return overturned.claim
        except (SQLAlchemyError, OSError) as exc:
            if isinstance(exc, IntegrityError) and await self.prior(key) is not None:
                return Claim(ClaimVerdict.BUSY)  # another copy inserted the same attempt first: in flight now
            raise TransientError(f"cannot record the delivery attempt, so it is not made: {exc}") from exc

    async def _start(self, conn: AsyncConnection, key: AttemptKey, seen: Prior | None, now: datetime) -> bool:
        values = {"state": STARTED, "process": self.process, "started_at": now, "finished_at": None,
                  "closed_at": None, "http_status": None, "response": None, "assigned": None}
        if seen is None:  # a concurrent insert of the same attempt fails on the primary key
            await conn.execute(table.insert().values(transfer_id=key.transfer_id, target=key.target,
                                                     round=key.round, attempt=key.attempt, **values))
            return True
        updated = await conn.execute(table.update().where(_where(key) & (table.c.state == NOT_APPLIED))
                                     .values(**values))
        return bool(updated.rowcount)

    async def finish(self, key: AttemptKey, state: str, http_status: int | None = None,
                     response: dict[str, Any] | None = None, assigned: dict[str, str] | None = None) -> None:
        """Record how the attempt ended; a failure only costs a probe if the process then crashes."""
        await self._best_effort("finish", table.update().where(_where(key)).values(
            state=state, finished_at=datetime.now(UTC), http_status=http_status, response=response,
            assigned=assigned))

    async def close(self, keys: Iterable[AttemptKey]) -> None:
        """The attempts' outcomes are committed on the bus: the rows are history now."""
        keys = list(keys)
        if keys:
            await self._best_effort("close", table.update().where(sa.or_(*(_where(k) for k in keys)))
                                    .values(closed_at=datetime.now(UTC)))

    async def purge(self, older_than_s: float) -> None:
        """Forget attempts started longer ago than `older_than_s` (their records have left the topics)."""
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
        await self._best_effort("purge", table.delete().where(table.c.started_at < cutoff))

    @shielded
    async def _best_effort(self, what: str, statement: Any) -> None:
        try:
            async with self.engine.begin() as conn:
                await conn.execute(statement)
        except (SQLAlchemyError, OSError) as exc:
            log.warning("attempt journal not updated", action=what, error=str(exc))


async def _read_chain(conn: AsyncConnection, key: AttemptKey) -> dict[int, Prior]:
    rows = (await conn.execute(sa.select(table).where(_chain(key)).with_for_update())).mappings().all()
    return {row["attempt"]: _prior(row) for row in rows}


def _prior(row: Any) -> Prior:
    started = row["started_at"]
    return Prior(row["state"], started if started.tzinfo else started.replace(tzinfo=UTC), row["process"],
                 row["http_status"], row["response"], row["assigned"])


def _chain(key: AttemptKey) -> Any:
    return ((table.c.transfer_id == key.transfer_id) & (table.c.target == key.target)
            & (table.c.round == key.round))


def _where(key: AttemptKey) -> Any:
    return ((table.c.transfer_id == key.transfer_id) & (table.c.target == key.target)
            & (table.c.round == key.round) & (table.c.attempt == key.attempt))
