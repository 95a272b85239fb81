"""The attempt journal: a POST to a target is recorded before it is made, so a crash leaves it *in doubt*.

A POST is not part of any bus transaction: a delivery process killed after sending but before its
outcome is committed would, on restart, read the record again and send it again. The journal (table
`delivery_attempts` in the ledger database, which every delivery replica shares) closes that gap:

* before attempt N of (transfer, target) is POSTed, a row says it started — if that row cannot be
  written the POST is not made (`TransientError`: the record waits, the stage backs off);
* when the answer comes, the row says what it was (delivered with its transaction-response, or
  certainly not applied);
* when the record comes back and its attempt's row says only "started", the attempt is in doubt:
  the stage resolves it like an ambiguous failure (probe, or the target's policy), never blindly;
* once the outcome is committed on the bus the row is closed; rows are purged by age.

A DLQ replay starts a new round (its `replays` count), so its attempts never meet the old ones.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.core.envelope import Envelope
from services.core.errors import TransientError
from services.core.logging import get_logger
from services.core.shielded import shielded
from services.tracker.ledger import delivery_attempts as table

log = get_logger(__name__)

STARTED, DELIVERED, NOT_APPLIED, IN_DOUBT = "started", "delivered", "not-applied", "in-doubt"


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
        if row is None:
            return None
        started = row["started_at"]
        return Prior(row["state"], started if started.tzinfo else started.replace(tzinfo=UTC), row["process"],
                     row["http_status"], row["response"], row["assigned"])

    @shielded
    async def start(self, key: AttemptKey, seen: Prior | None = None) -> None:
        """Record that the attempt is starting; raises TransientError (and the POST must not be made) if it cannot.

        `seen` is what `prior` answered (None, or a not-applied attempt): the row is claimed only if it is still
        so. Two processes can hold the same record for a moment (a partition handed over while the old holder
        is mid-record); without this check both would POST it. The loser waits, and next time finds the
        attempt started: in doubt, resolved by probe, never sent blindly.
        """
        values = {"state": STARTED, "process": self.process, "started_at": datetime.now(UTC), "finished_at": None,
                  "closed_at": None, "http_status": None, "response": None, "assigned": None}
        try:
            async with self.engine.begin() as conn:
                if seen is None:  # a concurrent claim of the same attempt fails on the primary key
                    await conn.execute(table.insert().values(
                        transfer_id=key.transfer_id, target=key.target, round=key.round, attempt=key.attempt,
                        **values))
                    return
                updated = await conn.execute(table.update().where(_where(key) & (table.c.state == seen.state))
                                             .values(**values))
        except (SQLAlchemyError, OSError) as exc:
            raise TransientError(f"cannot record the delivery attempt, so it is not made: {exc}") from exc
        if not updated.rowcount:
            raise TransientError(f"attempt {key.attempt} of {key.transfer_id} to {key.target} was started by another "
                                 "delivery process meanwhile; it is not made twice (resolved as in doubt next time)")

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


def _where(key: AttemptKey) -> Any:
    return ((table.c.transfer_id == key.transfer_id) & (table.c.target == key.target)
            & (table.c.round == key.round) & (table.c.attempt == key.attempt))
