"""The attempt journal: a POST to a target is recorded before it is made, so a crash leaves it *in doubt*.

A POST is not part of any bus transaction: a delivery process killed after sending but before its
outcome is committed would, on restart, read the record again and send it again. The journal (table
`delivery_attempts` in the ledger database, which every delivery replica shares) closes that gap:

* before attempt N of (transfer, target) is POSTed, the stage *claims* it: a row says it started — if that
  row cannot be written the POST is not made (`TransientError`: the record waits, the stage backs off);
* when the answer comes, the row says what it was (delivered with its transaction-response, or
  certainly not applied);
* once the outcome is committed on the bus the row is closed; rows are purged by age.

Answers and closes are best-effort history, so they are group-committed: every `finish` and `close`
queued while the previous write was in flight goes into the next transaction, as one executemany each
(one transaction for many lanes' answers instead of one per answer, and one per runner commit). A
caller still returns only once its write is committed (or has failed and been logged). A claim keeps
its own transaction: it judges the chain and writes the started row atomically.

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

How long "may still be in flight" lasts depends on what is known of the process that made the attempt.
Each row records its *incarnation* (host, boot, PID namespace, PID and start time: `liveness.py`) beside
the `process` name people read. Before judging, the claim reads /proc (the I/O edge; `judge` gets the
result as data, `Liveness`):

* a process not known to be dead — alive, on another host or in another container, a row from before
  incarnations were recorded, no /proc: the whole time bound of its POST, `in_flight_s` (connect_s +
  total_s + 5 s: 40 s with the default timeouts). A live process may be in the middle of that POST (a
  member that lost its partitions in a rebalance goes on with what it holds).
* a process *certainly dead* (it ran in this host's PID space, and no process with its PID and start
  time runs now): it can send nothing more, so no new request can start; what remains is a request it
  had already sent, which the target may still be executing — applied after a probe found nothing, it
  would be applied twice. So the attempt waits, from the moment this process first saw the death (the
  process died before that, and sent nothing after), for the target to finish what it received: twice
  the slowest answer the target gave in the last hour (`settle_s`: the journal's own rows, answered
  attempts only, started → answer recorded, so connect and upload are inside), and at least that slowest
  answer + DEAD_SETTLE_MARGIN_S (the dead socket's last bytes, a target a little slower than usual). It
  never waits longer than the whole bound, and with no answer of the target in the last hour (its pace
  unknown) it waits the whole bound. What this cannot rule out is a target that takes more than twice
  as long as anything it answered in the hour (and more than 2 s over it) to apply that one request:
  the same bet the live path makes when its `total_s` timeout fires and the attempt is probed.

A DLQ replay starts a new round (its `replays` count), so its attempts never meet the old ones.
"""

from __future__ import annotations

import asyncio
import enum
import os
import socket
import time
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from services.core.clock import aware
from services.core.envelope import Envelope
from services.core.errors import TransientError
from services.core.logging import get_logger
from services.core.shielded import finish as wait_out
from services.core.shielded import shielded
from services.core.targets import Target
from services.delivery.liveness import certainly_dead, this_incarnation
from services.tracker import prepared
from services.tracker.ledger import Ledger
from services.tracker.ledger import delivery_attempts as table

log = get_logger(__name__)

STARTED, DELIVERED, NOT_APPLIED, IN_DOUBT = "started", "delivered", "not-applied", "in-doubt"
# Beyond the target's timeouts: clocks of delivery hosts that differ a little, the journal write after the answer.
IN_FLIGHT_MARGIN_S = 5.0
# A certainly dead process's attempt: beyond the target's slowest recent answer (see the module docstring).
DEAD_SETTLE_MARGIN_S = 2.0
PACE_WINDOW_S = 3600.0  # the target's answers that tell its pace: those of the last hour...
PACE_SAMPLES = 500      # ...the latest of them at most
PACE_CACHE_S = 5.0      # a target's pace is read again after this long (only while a dead process's attempt waits)


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
    incarnation: str | None = None  # the run of `process` that made it (liveness.py); None in older rows


@dataclass(frozen=True, slots=True)
class Liveness:
    """What the claim found out before judging: the incarnations certainly dead, each with when it was first
    seen dead, and how long the chain's target may still be executing a request it received (None: unknown)."""

    dead: Mapping[str, datetime] = field(default_factory=dict)
    settle_s: float | None = None


NOT_KNOWN_DEAD = Liveness()


@dataclass(frozen=True, slots=True)
class Claim:
    """The verdict on an attempt, with the row it rests on (None when the attempt is new)."""

    verdict: ClaimVerdict
    prior: Prior | None = None


def judge(key: AttemptKey, chain: Mapping[int, Prior], now: datetime, in_flight_s: float,
          liveness: Liveness = NOT_KNOWN_DEAD) -> Claim:
    """What attempt `key` may do, given every attempt of its (transfer, target, round) so far, by number.

    `in_flight_s` bounds how long a started POST can still be running (the target's timeouts and a margin);
    `liveness` shortens it for the attempts of processes certainly dead (see the module docstring).
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
        if before is not None and _maybe_in_flight(before, now, in_flight_s, liveness):
            return Claim(ClaimVerdict.BUSY, before)
        return Claim(ClaimVerdict.GO)
    if mine.state == NOT_APPLIED:
        return Claim(ClaimVerdict.GO, mine)  # it certainly failed and its retry was never made: make it again
    if _maybe_in_flight(mine, now, in_flight_s, liveness):
        return Claim(ClaimVerdict.BUSY, mine)
    return Claim(ClaimVerdict.IN_DOUBT, mine)


def _maybe_in_flight(prior: Prior, now: datetime, in_flight_s: float, liveness: Liveness) -> bool:
    if prior.state != STARTED:
        return False
    running_s = in_flight_s
    seen_dead = liveness.dead.get(prior.incarnation) if prior.incarnation else None
    if seen_dead is not None and liveness.settle_s is not None:
        # Nothing sent after the death, which came before it was seen (and after the attempt started).
        dead_after_s = max((seen_dead - prior.started_at).total_seconds(), 0.0)
        running_s = min(in_flight_s, dead_after_s + liveness.settle_s)
    return (now - prior.started_at).total_seconds() < running_s


def settle_s(answers_s: Iterable[float]) -> float | None:
    """How long a target may still execute a request it received, from how long its recent answers took
    (None when it gave none: its pace is unknown)."""
    slowest = max(answers_s, default=None)
    return None if slowest is None else slowest + max(slowest, DEAD_SETTLE_MARGIN_S)


def in_flight_s(target: Target) -> float:
    """How long a POST to `target` may still be running after it started: its whole time bound, and a margin."""
    return target.timeouts.connect_s + target.timeouts.total_s + IN_FLIGHT_MARGIN_S


class _Overturned(Exception):
    """Internal: the chain moved while this attempt was being claimed; `claim` is what it says now."""

    def __init__(self, claim: Claim) -> None:
        self.claim = claim


KEY = ("transfer_id", "target", "round", "attempt")
ANSWER = ("state", "finished_at", "http_status", "response", "assigned")


def _key_params(key: AttemptKey) -> dict[str, Any]:
    return {"transfer_id": key.transfer_id, "target": key.target, "round": key.round, "attempt": key.attempt}


class AttemptJournal:
    """Reads and writes `delivery_attempts`; what must hold raises `TransientError`, the rest is best effort.

    Its transactions run through `Ledger.write`: a whole transaction's statements in one go (on a SQLite file, one
    hop to the ledger's writer thread, in BEGIN IMMEDIATE; on PostgreSQL, run_sync), the hot statements compiled
    once (tracker/prepared.py). Through aiosqlite each statement was a thread hop of its own and Core compiled it
    again: most of the journal's CPU, itself the largest part of the delivery stage's.
    """

    def __init__(self, ledger: Ledger, process: str | None = None) -> None:
        self.ledger = ledger
        self.process = process or f"{socket.gethostname()}-{os.getpid()}"
        self.here = this_incarnation()  # None without /proc: rows then say nothing, and nothing is known dead
        self._dead_since: dict[str, datetime] = {}  # incarnations this process saw dead, and when it first did
        self._paces: dict[str, tuple[float, float | None]] = {}  # target → (when read, monotonic; settle_s)
        # Queued claims and best-effort writes (finish, close), each with the future its caller waits on; one task
        # writes them, a transaction at a time (two at once from one process would only queue on SQLite's lock).
        self._finishes: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._closes: list[tuple[list[dict[str, Any]], asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._claims: list[tuple[AttemptKey, float, asyncio.Future[Claim]]] = []
        self.transactions = 0  # group commits (of claims; of answers and closes): tests and benchmarks read it

    @shielded
    async def prior(self, key: AttemptKey) -> Prior | None:
        """The row of this very attempt, if one was started before."""
        try:
            async with self.ledger.engine.connect() as conn:
                row = (await conn.execute(sa.select(table).where(_where(key)))).mappings().first()
        except (SQLAlchemyError, OSError) as exc:
            raise TransientError(f"attempt journal unreadable, delivery waits: {exc}") from exc
        return None if row is None else _prior(row)

    async def claim(self, key: AttemptKey, in_flight_s: float) -> Claim:
        """Judge attempt `key` against its chain and, on GO, record that it starts — atomically.

        Raises TransientError (and the POST must not be made) if the journal cannot be read or written.
        The chain is judged twice: before the write, and again once this transaction holds the write (PostgreSQL
        locks the chain's rows from the first read, and an attempt inserted meanwhile shows in the second; on
        SQLite the transaction holds the write lock from its BEGIN IMMEDIATE, so no other writer can change the
        chain before this one commits). A claim the second judgement overturns is rolled back, and the copy told
        what the chain says now (wait, or drop).

        Claims queued while another transaction of this journal was in flight are group-committed
        (`_claim_together`); a shielded wait, like every ledger write (see `_queued`).
        """
        done: asyncio.Future[Claim] = asyncio.get_running_loop().create_future()
        self._claims.append((key, in_flight_s, done))
        self._wake()
        return await wait_out(done)

    def _wake(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name="attempt-journal-writer")

    async def _write(self) -> None:
        while self._claims or self._finishes or self._closes:
            await self._claim_queued()
            await self._write_queued()

    async def _claim_queued(self) -> None:
        """Claim what is queued in one transaction, one claim per chain (a chain's other copies wait for the next
        one, so each is judged seeing what the one before it wrote)."""
        if self._claims:
            batch: list[tuple[AttemptKey, float, asyncio.Future[Claim]]] = []
            chains: set[tuple[str, str, int]] = set()
            rest: list[tuple[AttemptKey, float, asyncio.Future[Claim]]] = []
            for item in self._claims:
                chain = (item[0].transfer_id, item[0].target, item[0].round)
                (rest if chain in chains else batch).append(item)
                chains.add(chain)
            self._claims = rest
            try:
                claims = await self._claim_together([(k, s) for k, s, _ in batch])
            except (_Overturned, IntegrityError):
                # Another process wrote one of these chains meanwhile (nothing was written): each claim decides alone.
                for key, bound, done in batch:
                    await _settle(done, self._claim_alone(key, bound))
                return
            except Exception as exc:  # noqa: BLE001 - TransientError, or a bug: the callers see it
                for _, _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                return
            for (_, _, done), claim in zip(batch, claims, strict=True):
                if not done.done():
                    done.set_result(claim)

    async def _claim_together(self, keys: list[tuple[AttemptKey, float]]) -> list[Claim]:
        """`_claim_alone` for several chains in one transaction: one read of every chain, one insert of every new
        attempt, one read again to judge each claim a second time. Raises _Overturned or IntegrityError (nothing
        written) when another process moved one of the chains meanwhile."""
        self.transactions += 1
        try:
            now = datetime.now(UTC)
            return await self.ledger.write(lambda conn: self._claim_many(conn, keys, now))
        except (_Overturned, IntegrityError):
            raise
        except (SQLAlchemyError, OSError) as exc:
            raise TransientError(f"cannot record the delivery attempt, so it is not made: {exc}") from exc

    def _claim_many(self, conn: sa.Connection, keys: list[tuple[AttemptKey, float]], now: datetime) -> list[Claim]:
        """`_claim_together`'s transaction (on the ledger's writer)."""
        chains = _read_chains(conn, [k for k, _ in keys])
        lives = self._liveness(conn, chains, now)
        claims = [judge(k, chains[_chain_of(k)], now, s, lives.get(k.target, NOT_KNOWN_DEAD)) for k, s in keys]
        fresh = [k for (k, _), c in zip(keys, claims, strict=True) if c.verdict is ClaimVerdict.GO and c.prior is None]
        # A concurrent insert of the same attempt fails on the primary key.
        prepared.insert(conn, table, [{**_key_params(k), **self._started(now)} for k in fresh])
        for i, ((k, _), c) in enumerate(zip(keys, claims, strict=True)):
            if c.verdict is ClaimVerdict.GO and c.prior is not None and not self._start(conn, k, c.prior, now):
                claims[i] = Claim(ClaimVerdict.BUSY, c.prior)  # another copy claimed it again first
        made = [((k, s), c) for (k, s), c in zip(keys, claims, strict=True) if c.verdict is ClaimVerdict.GO]
        if made:
            now_chains = _read_chains(conn, [k for (k, _), _ in made])
            for (k, s), c in made:
                again = _judge_again(k, c, now_chains[_chain_of(k)], now, s, lives.get(k.target, NOT_KNOWN_DEAD))
                if again.verdict is not ClaimVerdict.GO:
                    raise _Overturned(again)  # rolls every claim of the transaction back
        return claims

    async def _claim_alone(self, key: AttemptKey, in_flight_s: float) -> Claim:
        try:
            now = datetime.now(UTC)
            return await self.ledger.write(lambda conn: self._claim_one(conn, key, in_flight_s, now))
        except _Overturned as overturned:
            return overturned.claim
        except (SQLAlchemyError, OSError) as exc:
            if isinstance(exc, IntegrityError) and await self.prior(key) is not None:
                return Claim(ClaimVerdict.BUSY)  # another copy inserted the same attempt first: in flight now
            raise TransientError(f"cannot record the delivery attempt, so it is not made: {exc}") from exc

    def _claim_one(self, conn: sa.Connection, key: AttemptKey, in_flight_s: float, now: datetime) -> Claim:
        """`_claim_alone`'s transaction (on the ledger's writer)."""
        chain = _read_chains(conn, [key])[_chain_of(key)]
        liveness = self._liveness(conn, {_chain_of(key): chain}, now).get(key.target, NOT_KNOWN_DEAD)
        claim = judge(key, chain, now, in_flight_s, liveness)
        if claim.verdict is not ClaimVerdict.GO:
            return claim
        if not self._start(conn, key, claim.prior, now):
            return Claim(ClaimVerdict.BUSY, claim.prior)  # another copy claimed it again first
        again = _judge_again(key, claim, _read_chains(conn, [key])[_chain_of(key)], now, in_flight_s, liveness)
        if again.verdict is not ClaimVerdict.GO:
            raise _Overturned(again)  # rolls the claim back
        return claim

    def _liveness(self, conn: sa.Connection, chains: Mapping[tuple[str, str, int], Mapping[int, Prior]],
                  now: datetime) -> dict[str, Liveness]:
        """For each target whose chains hold an attempt started by a process certainly dead: which are, since
        when this process knows it, and the target's pace. Empty (nothing read) in the usual case."""
        targets: set[str] = set()
        for (_, target, _), chain in chains.items():
            for prior in chain.values():
                if prior.state == STARTED and prior.incarnation and self._known_dead(prior.incarnation, now):
                    targets.add(target)
        if not targets:
            return {}
        dead = dict(self._dead_since)
        return {t: Liveness(dead, self._settle_s(conn, t, now)) for t in targets}

    def _known_dead(self, incarnation: str, now: datetime) -> bool:
        if incarnation not in self._dead_since:
            if not certainly_dead(incarnation, self.here):
                return False
            self._dead_since[incarnation] = now  # a process once dead stays dead: kept
            log.info("a delivery process that started attempts is gone from this host: they wait only for their "
                     "target to settle, not their whole time bound", incarnation=incarnation)
        return True

    def _settle_s(self, conn: sa.Connection, target: str, now: datetime) -> float | None:
        """`settle_s` of the target's answers journaled in the last PACE_WINDOW_S (read again after PACE_CACHE_S)."""
        read_at, known = self._paces.get(target, (float("-inf"), None))
        if time.monotonic() - read_at < PACE_CACHE_S:
            return known
        # Answered attempts only (an HTTP status): a timeout, a crash or a probe's finding says nothing of the pace.
        rows = conn.execute(
            sa.select(table.c.started_at, table.c.finished_at)
            .where((table.c.target == target) & (table.c.started_at > now - timedelta(seconds=PACE_WINDOW_S))
                   & table.c.http_status.is_not(None) & table.c.finished_at.is_not(None))
            .order_by(table.c.started_at.desc()).limit(PACE_SAMPLES)).all()
        known = settle_s((aware(finished) - aware(started)).total_seconds() for started, finished in rows)
        self._paces[target] = (time.monotonic(), known)
        return known

    def _started(self, now: datetime) -> dict[str, Any]:
        return {"state": STARTED, "process": self.process, "incarnation": None if self.here is None else str(self.here),
                "started_at": now, "finished_at": None,
                "closed_at": None, "http_status": None, "response": None, "assigned": None}

    def _start(self, conn: sa.Connection, key: AttemptKey, seen: Prior | None, now: datetime) -> bool:
        row = {**_key_params(key), **self._started(now)}
        if seen is None:  # a concurrent insert of the same attempt fails on the primary key
            prepared.insert(conn, table, [row])
            return True
        # Only an attempt that certainly failed is made again, and only by one copy.
        restart = prepared.prepared(conn, "journal-restart", lambda: _keyed(table.update()).where(
            table.c.state == NOT_APPLIED).values({c: sa.bindparam(c, type_=table.c[c].type) for c in STARTED_ROW}))
        return bool(restart.run(conn, [row]).rowcount)

    async def finish(self, key: AttemptKey, state: str, http_status: int | None = None,
                     response: dict[str, Any] | None = None, assigned: dict[str, str] | None = None) -> None:
        """Record how the attempt ended; a failure only costs a probe if the process then crashes."""
        row = {**_key_params(key), "state": state, "finished_at": datetime.now(UTC), "http_status": http_status,
               "response": response, "assigned": assigned}
        await self._queued(self._finishes, row)

    async def close(self, keys: Iterable[AttemptKey]) -> None:
        """The attempts' outcomes are committed on the bus: the rows are history now."""
        now = datetime.now(UTC)
        rows = [{**_key_params(k), "closed_at": now} for k in keys]
        if rows:
            await self._queued(self._closes, rows)

    async def _queued(self, queue: list[tuple[Any, asyncio.Future[None]]], item: Any) -> None:
        """Queue a best-effort write for the next group commit and wait until it is done (shielded, like
        every ledger write: a cancelled caller waits for the commit it is part of, so no transaction is cut)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append((item, done))
        self._wake()
        await wait_out(done)

    async def _write_queued(self) -> None:
        """Commit the queued answers and closes in one transaction."""
        if self._finishes or self._closes:
            finishes, self._finishes = self._finishes, []
            closes, self._closes = self._closes, []

            def write(conn: sa.Connection) -> None:
                prepared.update(conn, table, KEY, ANSWER, [row for row, _ in finishes])
                # After the answers: a close never precedes its attempt's answer.
                prepared.update(conn, table, KEY, ("closed_at",), [row for rows, _ in closes for row in rows])

            try:
                await self.ledger.write(write)
                self.transactions += 1
            except (SQLAlchemyError, OSError) as exc:
                log.warning("attempt journal not updated", finished=len(finishes), closed=len(closes),
                            error=str(exc))
            except Exception as exc:  # noqa: BLE001 - a bug, not the database: the callers see it
                for _, done in (*finishes, *closes):
                    if not done.done():
                        done.set_exception(exc)
                return
            for _, done in (*finishes, *closes):
                if not done.done():
                    done.set_result(None)

    async def purge(self, older_than_s: float) -> None:
        """Forget attempts started longer ago than `older_than_s` (their records have left the topics)."""
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
        try:
            await self.ledger.write(lambda conn: conn.execute(table.delete().where(table.c.started_at < cutoff)))
        except (SQLAlchemyError, OSError) as exc:
            log.warning("attempt journal not updated", action="purge", error=str(exc))


STARTED_ROW = ("state", "process", "incarnation", "started_at", "finished_at", "closed_at", "http_status", "response",
               "assigned")


async def _settle(done: asyncio.Future[Claim], work: Awaitable[Claim]) -> None:
    """Give `done` what `work` returns or raises."""
    try:
        claim = await work
    except Exception as exc:  # noqa: BLE001 - TransientError, or a bug: the caller sees it
        if not done.done():
            done.set_exception(exc)
        return
    if not done.done():
        done.set_result(claim)


def _judge_again(key: AttemptKey, claim: Claim, chain: dict[int, Prior], now: datetime, in_flight_s: float,
                 liveness: Liveness) -> Claim:
    """`judge` once more, on the chain as read after this claim's own write, that write taken back out."""
    if claim.prior is None:
        del chain[key.attempt]
    else:
        chain[key.attempt] = claim.prior
    return judge(key, chain, now, in_flight_s, liveness)


def _keyed(statement: Any) -> Any:
    """`statement` restricted to one attempt named by bound parameters (its key's column names)."""
    return statement.where(sa.and_(*(table.c[k] == sa.bindparam(k, type_=table.c[k].type) for k in KEY)))


def _read_chains(conn: sa.Connection, keys: list[AttemptKey]) -> dict[tuple[str, str, int], dict[int, Prior]]:
    """The chains of `keys`' attempts, each by attempt number, in one query (its rows locked on PostgreSQL)."""
    chains: dict[tuple[str, str, int], dict[int, Prior]] = {_chain_of(k): {} for k in keys}
    unique = list(chains)

    def build() -> Any:
        return sa.select(table).where(sa.or_(*(
            (table.c.transfer_id == sa.bindparam(f"t{i}", type_=table.c.transfer_id.type))
            & (table.c.target == sa.bindparam(f"g{i}", type_=table.c.target.type))
            & (table.c.round == sa.bindparam(f"r{i}", type_=table.c.round.type)) for i in range(len(unique))))
        ).with_for_update()

    params: dict[str, Any] = {}
    for i, (transfer_id, target, round_) in enumerate(unique):
        params |= {f"t{i}": transfer_id, f"g{i}": target, f"r{i}": round_}
    for row in prepared.prepared(conn, ("journal-chains", len(unique)), build).all(conn, params):
        chains[(row["transfer_id"], row["target"], row["round"])][row["attempt"]] = _prior(row)
    return chains


def _chain_of(key: AttemptKey) -> tuple[str, str, int]:
    return (key.transfer_id, key.target, key.round)


def _prior(row: Any) -> Prior:
    return Prior(row["state"], aware(row["started_at"]), row["process"], row["http_status"], row["response"],
                 row["assigned"], row["incarnation"])


def _where(key: AttemptKey) -> Any:
    return ((table.c.transfer_id == key.transfer_id) & (table.c.target == key.target)
            & (table.c.round == key.round) & (table.c.attempt == key.attempt))
