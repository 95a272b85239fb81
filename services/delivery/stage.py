"""Delivery stage: `deliveries` and its retry tiers → the target, a retry tier, or `deliveries.dlq`.

Per target, in memory and per delivery process (replicas do not share it): a circuit breaker, a
concurrency limit and the HTTP client with its credentials. A record that cannot be attempted now
(circuit open, target paused, not yet due) is *parked*: re-published to a retry tier with a later
`not_before`, its attempt count unchanged, so it neither burns attempts nor holds up the records
behind it in its partition (which may be for healthy targets).
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Hashable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from services.core.blobstore import (
    X_BLOB,
    X_BLOB_SHA256,
    X_BLOB_SIZE,
    BlobIntegrityError,
    BlobRef,
    BlobStore,
    resolve_payload,
)
from services.core.bus import Partition
from services.core.clock import aware
from services.core.envelope import Emit, Envelope, Record, event
from services.core.errors import LetGo, TransientError
from services.core.fate import Fate
from services.core.logging import get_logger
from services.core.metrics import DELIVERIES as DELIVERY_COUNT
from services.core.metrics import DELIVERIES_IN_DOUBT as DELIVERY_IN_DOUBT
from services.core.metrics import DELIVERY_SECONDS
from services.core.outcome import error, operation_outcome
from services.core.settings import Settings
from services.core.targets import Target, TargetDirectory
from services.core.tasks import cancel_and_wait
from services.core.topics import DELIVERIES, DELIVERIES_DLQ, RETRY_PREFIX, delivery_topics, retry_topic
from services.delivery import conditional
from services.delivery.capability import conditional_types_for
from services.delivery.client import Attempt, TargetClient
from services.delivery.gate import GateClosed, MovedOut, TargetGate
from services.delivery.journal import (
    DELIVERED,
    IN_DOUBT,
    NOT_APPLIED,
    AttemptJournal,
    AttemptKey,
    ClaimVerdict,
    Prior,
    in_flight_s,
)
from services.delivery.latency import LatencyWindow
from services.delivery.logic import (
    Breaker,
    BreakerEvent,
    Decision,
    Failure,
    breaker_after,
    breaker_allows,
    classify,
    decide,
    park_tier,
    parse_retry_after,
    too_slow,
)
from services.delivery.marker import ProbePlan, Verdict, mark_transfer, probe_plan
from services.delivery.order import LaneOrder
from services.delivery.repair import assigned_ids, original_full_urls, repair_transaction
from services.delivery.turns import Turns

log = get_logger(__name__)

DELIVERED_EVENTS = uuid.UUID("5b0f6f1e-3c1a-4c57-9d7e-2f1d1e0c6a11")  # the namespace of `delivered_event_id`
# Envelope attributes the delivery stage keeps between attempts (never restored on replay).
X_DUE, X_PROBE = "due", "probe"
X_FIRST_FAILURE, X_LAST_FAILURE, X_REASON, X_HTTP_STATUS = "firstfailure", "lastfailure", "reason", "httpstatus"
X_SEQ = "laneseq"  # the record's offset in `deliveries`: its place in its lane, kept while it waits in retry tiers
FAILURE_ATTRIBUTES = frozenset({X_DUE, X_PROBE, X_SEQ, X_FIRST_FAILURE, X_LAST_FAILURE, X_REASON, X_HTTP_STATUS,
                                "origtopic", "origpartition", "origoffset", X_BLOB, X_BLOB_SHA256, X_BLOB_SIZE})


JOURNAL_PURGE_EVERY_S = 3600.0
# A lane's head is forgotten once overdue by this long at least: a rebalance (Kafka: up to its 10 s timeout
# plus the hand-over) stops retry tiers from being read meanwhile, and a head forgotten then is overtaken.
ORDER_STALE_MIN_S = 60.0
BUSY_RECHECK_S = 1.0  # how soon a record whose attempt may be in flight elsewhere looks at its outcome again
OVERFLOW_RECHECK_S = 0.5  # the soonest a record past its target's backlog bound comes back (else: parked again)
CROWDED_MIN_WAIT_S = 1.0  # `crowding` moves out only records that have waited this long for their slot
LET_OUT_FORGET_S = 60.0  # a record moved out for crowding stops counting (`crowding`) after this at most


class _StaleCopy(Exception):
    """A later attempt of the record's transfer exists: this copy of the record has nothing left to do."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """What one attempt sends: the marked payload, the events about it, the producer's fullUrls, the probe plan."""

    payload: bytes
    emits: list[Emit]
    full_urls: list[str | None]
    plan: ProbePlan


@dataclass
class TargetRuntime:
    """One target's live state in this process."""

    target: Target
    client: TargetClient
    gate: TargetGate  # its concurrency slots and its own bounded waiting area
    latency: LatencyWindow
    overflow: str  # "wait" | "refuse": what happens past the gate's bounds
    breaker: Breaker = field(default_factory=Breaker)
    prober: asyncio.Task[None] | None = None


class DeliveryStage:
    """Delivers each (transfer, target) record; retries and waits happen in retry topics, not here."""

    name = "delivery"

    def __init__(self, settings: Settings, directory: TargetDirectory, blobs: BlobStore, journal: AttemptJournal, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.journal = journal
        # Journal rows of attempts whose outcome is not committed yet, by record position.
        self._open: dict[tuple[str, int, int], AttemptKey] = {}
        # Records moved out of a target's waiting area because the records in hand were crowded (`crowding`), by
        # record position, until committed: when moved out (clock).
        self._let_out: dict[tuple[str, int, int], float] = {}
        self._next_purge = 0.0
        self.directory = directory
        self.blobs = blobs
        self.clock = clock
        self.tiers = tuple(settings.retry_delays_s)
        self.topics: Sequence[str] = delivery_topics(settings)
        self.runtimes = {t.id: self._runtime(t, settings) for t in directory.targets if t.enabled}
        # Records waiting in retry tiers, per lane: a person's later Bundles wait behind them.
        longest = max([*self.tiers, *(d for rt in self.runtimes.values() for d in rt.target.retry.delays_s or ())])
        self.order = LaneOrder(stale_s=max(longest * 2, ORDER_STALE_MIN_S))
        # Records for slow targets give way to other targets' records (issue 15).
        self.turns = Turns()
        # Targets an operator paused (ops API → ledger `target_state`); refreshed by `watch_pauses`.
        self.paused_by_operator: frozenset[str] = frozenset()
        # Where breaker transitions are reported for operators (None: nowhere; set by the launcher).
        self.report_circuit: Callable[[str, str, int], Awaitable[None]] | None = None
        self._reports: set[asyncio.Task[None]] = set()

    @staticmethod
    def _runtime(t: Target, settings: Settings) -> TargetRuntime:
        gate = TargetGate(t.max_concurrency, t.backlog.records if t.backlog.records is not None
                          else settings.target_backlog_records, t.backlog.wait_s or settings.target_backlog_wait_s)
        return TargetRuntime(t, TargetClient(t), gate,
                             LatencyWindow(t.latency_budget_s or settings.target_latency_budget_s),
                             t.backlog.overflow or settings.target_backlog_overflow)

    async def watch_pauses(self, read: Callable[[], Awaitable[frozenset[str]]], every_s: float = 5.0) -> None:
        """Keep `paused_by_operator` current; on a read error keep the last known value and try again."""
        while True:
            try:
                self.paused_by_operator = await read()
            except Exception as exc:  # noqa: BLE001 - a ledger hiccup must not stop deliveries
                log.warning("cannot read paused targets; keeping the last known set", error=str(exc))
            await asyncio.sleep(every_s)

    def stopping(self) -> None:
        """The runner stops polling: records waiting for a target's slot leave now (read again later)."""
        for rt in self.runtimes.values():
            rt.gate.close()

    def releasing(self, partitions: Collection[Partition]) -> None:
        """`partitions` are being handed over: their records waiting for a target's slot leave now, unattempted,
        so the hand-over does not wait for a slow target (their next holder reads them again)."""
        left = sum(rt.gate.release(partitions) for rt in self.runtimes.values())
        if left:
            log.info("records waiting for a target's slot let go for a hand-over", records=left)

    def crowding(self, excess: int) -> None:
        """The runner's records in hand are `excess` past half their bound: the records that have waited longest for
        a target's slot move out to a retry tier, so their partitions commit and the poll goes on.

        A waiting record holds its partition's commit, and with it every record handled behind it, for any target:
        several slow targets' waiting areas, each within its own bound, could otherwise fill the records in hand
        and stop the poll for everyone (issue 15: sustained, five targets answering in 5 s beside a quick one took
        its p50 from 3 ms to 17 s). Those moved out already count until their partition commits past them (or
        for LET_OUT_FORGET_S at most: a partition rewound or handed over never commits them here)."""
        now = self.clock()
        self._let_out = {p: t for p, t in self._let_out.items() if now - t < LET_OUT_FORGET_S}
        count = excess - len(self._let_out)
        if count <= 0:
            return
        # Only records that have waited a while: one about to get its slot (a quick target's) holds no commit long.
        settled = asyncio.get_running_loop().time() - CROWDED_MIN_WAIT_S
        waiting = sorted(((since, id(rt), rt.gate, future) for rt in self.runtimes.values()
                          for since, future in rt.gate.waiters_since() if since <= settled), key=lambda w: (w[0], w[1]))
        for _, _, gate, future in waiting[:count]:
            gate.let_out(future)
        if waiting:
            log.info("records in hand crowded; the longest-waiting records for a target's slot move to a retry tier",
                     records=min(count, len(waiting)), waiting=len(waiting))

    async def aclose(self) -> None:
        """Stop probes and close every target's connections; safe twice."""
        for rt in self.runtimes.values():
            if rt.prober is not None:
                await cancel_and_wait(rt.prober)
                rt.prober = None
            await rt.client.aclose()

    def breaker(self, target_id: str) -> Breaker | None:
        """A target's breaker state (for tests and operators)."""
        rt = self.runtimes.get(target_id)
        return rt.breaker if rt else None

    # --- the record ------------------------------------------------------------------------
    def lane(self, record: Record) -> Hashable:
        """Records are keyed by target + person: each such pair is a lane, handled in order, beside the others.

        So a slow target, or one person's slow transaction, holds only its own lane (the runner commits
        a partition up to its first unfinished record).
        """
        return record.key

    async def handle(self, record: Record) -> Sequence[Emit]:
        """Attempt the delivery now, or park it until it may be attempted (or until its lane's earlier ones are)."""
        env = record.envelope
        lane = _order_lane(record)
        seq = _seq(record)
        now = datetime.now(UTC)
        held = self.order.hold_until(lane, env.transfer_id, now, seq)
        if held is not None:
            return [self._park(record, env, (held - now).total_seconds())]
        try:
            emits = await self._handle(record, env)
        except TransientError:
            raise  # it stays where it is and comes back: still the lane's head
        except _StaleCopy:
            return []  # the copy that carries the transfer on keeps its place in the lane
        except Exception:
            self.order.settled(lane, env.transfer_id, None)  # it leaves the lane (poison topic): the next one goes
            raise
        waiting = next((e.envelope for e in emits if e.topic.startswith(RETRY_PREFIX)
                        and e.envelope.transfer_id == env.transfer_id), None)
        self.order.settled(lane, env.transfer_id, None if waiting is None else _waiting_until(waiting, now), seq)
        return emits

    async def assigned(self, gained: Collection[Partition], lost: Collection[Partition],
                       pending: Callable[[Sequence[Partition]], Awaitable[list[Record]]]) -> None:
        """This process took partitions over, or gave some up: learn the records waiting in the gained retry tiers.

        The bus hands a partition number over whole (`deliveries` and every retry tier), so the records a lane
        has waiting in retry tiers are all in the gained partitions: a later Bundle of that lane read from
        `deliveries` here waits behind them, as it would have in the process that parked them.
        """
        self._let_out = {p: t for p, t in self._let_out.items() if Partition(p[0], p[1]) not in lost}
        gone = {p.partition for p in lost} - {p.partition for p in gained}
        self.order.forget(lambda lane: isinstance(lane, tuple) and lane[2] in gone)
        tiers = [p for p in gained if p.topic.startswith(RETRY_PREFIX)]
        if not tiers:
            return
        now = datetime.now(UTC)
        waiting = await pending(tiers)
        for record in sorted(waiting, key=_seq):
            self.order.learn(_order_lane(record), record.envelope.transfer_id,
                             _waiting_until(record.envelope, now), _seq(record))
        if waiting:
            log.info("records waiting in retry tiers learnt from partitions taken over", records=len(waiting),
                     partitions=sorted({p.partition for p in tiers}))

    async def _handle(self, record: Record, env: Envelope) -> list[Emit]:
        rt = self.runtimes.get(env.target or "")
        if rt is None:
            return await self._dead_letter(record, env, env.attempt, Attempt(None, error="unknown target", sent=False),
                                           Decision(Fate.DEAD_LETTER, f"target '{env.target}' is not configured "
                                                    "or is disabled"))
        due = _moment(env.extra.get(X_DUE))
        now = datetime.now(UTC)
        if due is not None and due > now:
            return [self._park(record, env, (due - now).total_seconds())]
        if rt.target.paused or rt.target.id in self.paused_by_operator:
            return [self._park(record, env, rt.target.breaker.probe_every_s)]
        # A slow target's record starts by giving way: its steps up to its gate's waiting area (or its attempt)
        # would otherwise run before a quick target's record that came in the same poll.
        await self.turns.give_way(rt.target.id)
        with self.turns.in_progress(rt.target.id):  # waiting for its target's slot included
            return await self._in_turn(record, env, rt)

    async def _in_turn(self, record: Record, env: Envelope, rt: TargetRuntime) -> list[Emit]:
        try:
            entered = await rt.gate.enter(Partition(record.topic, record.partition))
        except GateClosed:
            raise LetGo("this record left its target's waiting area unattempted (delivery is stopping, or its "
                        "partition is handed over) and is read again") from None
        except MovedOut:
            self._let_out[_position(record)] = self.clock()
            DELIVERY_COUNT.labels(rt.target.id, "overflow").inc()
            return [self._park_for_slot(record, env, rt)]
        if not entered:
            return await self._overflow(record, env, rt)
        try:
            if not breaker_allows(rt.breaker):
                self._ensure_prober(rt)
                # Come back about when the next probe may have closed the circuit.
                return [self._park(record, env, max(rt.breaker.next_probe_at - self.clock(), 0) + 0.05)]
            return await self._attempt(record, env, rt)
        finally:
            rt.gate.leave()

    async def _overflow(self, record: Record, env: Envelope, rt: TargetRuntime) -> list[Emit]:
        """The target's waiting area is full, or the record waited there too long: move it out, durably."""
        gate = rt.gate
        DELIVERY_COUNT.labels(rt.target.id, "overflow").inc()
        if rt.overflow == "refuse":
            reason = (f"target '{rt.target.id}' is busy: its backlog is full ({gate.waiting} waiting for "
                      f"{gate.slots} slot(s), at most {gate.records}, each at most {gate.wait_s:g}s) and its "
                      "backlog.overflow is refuse; replay this dead letter once the target has caught up")
            return await self._dead_letter(record, env, env.attempt, Attempt(None, error=reason, sent=False),
                                           Decision(Fate.DEAD_LETTER, reason))
        log.info("target backlog full; record parked in a retry tier", waiting=gate.waiting)
        return [self._park_for_slot(record, env, rt)]

    def _park_for_slot(self, record: Record, env: Envelope, rt: TargetRuntime) -> Emit:
        """Park a record that could not wait in memory for its target's slot (its target's backlog is full, or the
        stage's records in hand are crowded): it comes back about when the records ahead of it should be done.

        At the target's recent pace (one not heard from yet: as if it answered in OVERFLOW_RECHECK_S), never a
        retry tier's delay (10 s by default) at least: a quick target sat idle meanwhile, 5 s at a time in bursts
        of 1,200 for one target."""
        gate = rt.gate
        ahead = gate.waiting + gate.busy
        wait_s = max(ahead / gate.slots * rt.latency.p50(default=OVERFLOW_RECHECK_S), OVERFLOW_RECHECK_S)
        return self._park(record, env, wait_s)

    async def _attempt(self, record: Record, env: Envelope, rt: TargetRuntime) -> list[Emit]:
        target = rt.target
        # Before each CPU-bound step of a slow target's record: other targets' records in progress go first
        # (bounded); looked at each time, so a target that has just answered quickly again waits no more.
        await self.turns.give_way(target.id)
        try:
            payload = await resolve_payload(self.blobs, env.data, env.extra)
        except BlobIntegrityError as exc:
            return await self._dead_letter(record, env, env.attempt, Attempt(None, error=str(exc), sent=False),
                                           Decision(Fate.DEAD_LETTER, f"claim check failed: {exc}"), inline=False)
        key = AttemptKey.next_of(env)
        attempt_no = key.attempt
        out = self._outgoing(env, target, payload, attempt_no, await conditional_types_for(rt.client))
        # No record of the attempt, no attempt (TransientError: it waits).
        await self.turns.give_way(target.id)
        claim = await self.journal.claim(key, in_flight_s(target))
        if claim.verdict is ClaimVerdict.SUPERSEDED:
            log.info("a later attempt of this transfer exists: this copy of its record is dropped",
                     later_attempt=None if claim.prior is None else claim.prior.state)
            raise _StaleCopy
        if claim.verdict is ClaimVerdict.BUSY:
            # Started elsewhere (a partition's previous holder, or a copy of this record) and maybe in flight.
            log.info("attempt possibly in flight elsewhere; waiting for its outcome")
            return [self._park(record, env, BUSY_RECHECK_S)]
        self._open[_position(record)] = key
        if claim.verdict is not ClaimVerdict.GO:
            assert claim.prior is not None
            return out.emits + await self._after_crash(record, env, rt, key, claim.prior, out)
        if env.extra.get(X_PROBE) == "1" and target.ambiguous == "probe":
            probed = await self._probe(record, env, rt, key, out)
            if probed is not None:
                return probed
        await self.turns.give_way(target.id)
        with self.turns.awaiting_answer(target.id):
            attempt = await rt.client.post_transaction(out.payload, request_id(env))
        DELIVERY_SECONDS.labels(target.id).observe(attempt.duration_s)
        if attempt.sent:  # a call that never left says nothing of the target's pace
            rt.latency.add(attempt.duration_s)
            self.turns.observed(target.id, rt.latency.floor() or 0.0)
        failure = classify(attempt.status, sent=attempt.sent)
        state = NOT_APPLIED
        if failure is Failure.NONE and not _is_transaction_response(attempt.json()):
            failure = Failure.PERMANENT  # a 2xx that does not say what was created proves nothing
            attempt = Attempt(attempt.status, attempt.body,
                              error="2xx without a transaction-response Bundle whose every entry succeeded")
            state = IN_DOUBT  # something may have been applied
        self._learn(rt, BreakerEvent.FAILURE if failure in (Failure.TRANSIENT, Failure.AMBIGUOUS)
                    else BreakerEvent.SUCCESS)
        slow_call_s = target.breaker.slow_call_s
        if slow_call_s is not None and too_slow(rt.latency.slow_rate(slow_call_s), target.breaker.slow_call_rate):
            self._learn(rt, BreakerEvent.SLOW)
            rt.latency.clear()  # judged afresh once a probe has closed it
        if failure is Failure.NONE:
            response = attempt.json()
            await self.journal.finish(key, DELIVERED, attempt.status, response, assigned_ids(out.full_urls, response))
        else:
            await self.journal.finish(key, IN_DOUBT if failure is Failure.AMBIGUOUS else state, attempt.status)
        return out.emits + await self._after(record, env, rt, attempt_no, attempt, failure, out.payload,
                                             full_urls=out.full_urls)

    async def _after_crash(self, record: Record, env: Envelope, rt: TargetRuntime, key: AttemptKey, prior: Prior,
                           out: Outgoing) -> list[Emit]:
        """The record's attempt was made before, but its outcome never reached the bus (a crash)."""
        done = env.evolve(attempt=key.attempt)
        if prior.state == DELIVERED:
            # The target answered and the answer was journaled: the outcome is known, nothing to resend.
            DELIVERY_COUNT.labels(rt.target.id, Fate.DELIVERED.value).inc()
            return [event(done, "delivered", self.name, event_id=delivered_event_id(env), detail={
                "http_status": prior.http_status, "response": prior.response, "assigned": prior.assigned or {},
                "recovered": "the outcome was journaled before a delivery process stopped"})]
        DELIVERY_IN_DOUBT.labels(rt.target.id).inc()
        await self.journal.finish(key, IN_DOUBT, prior.http_status)
        reason = (f"attempt {key.attempt} was in flight when delivery process {prior.process} stopped (started "
                  f"{prior.started_at.isoformat()}): the target may have applied it")
        log.warning("delivery in doubt after a crash; resolved like an ambiguous failure",
                    policy=rt.target.ambiguous, in_doubt_attempt=key.attempt)
        doubt = event(done, "in_doubt", self.name, {"reason": reason, "policy": rt.target.ambiguous,
                                                    "started_at": prior.started_at.isoformat()})
        attempt = Attempt(prior.http_status, error=reason, sent=True)
        return [doubt, *await self._after(record, env, rt, key.attempt, attempt, Failure.AMBIGUOUS, out.payload,
                                          full_urls=out.full_urls)]

    async def _probe(self, record: Record, env: Envelope, rt: TargetRuntime, key: AttemptKey,
                     out: Outgoing) -> list[Emit] | None:
        """Search the target for this transfer's marker; None when it is absent (send it, under the claim)."""
        target, attempt_no = rt.target, key.attempt
        result = await rt.client.probe(out.plan, self.settings.transfer_tag_system, env.transfer_id)
        if result.verdict is Verdict.ABSENT:
            log.info("ambiguous attempt had not been applied; sending again")
            return None
        # The claimed attempt ends here: what the probe found is its outcome for any copy of this record.
        await self.journal.finish(key, {Verdict.APPLIED: DELIVERED, Verdict.PARTIAL: IN_DOUBT,
                                        Verdict.UNPROBEABLE: IN_DOUBT}.get(result.verdict, NOT_APPLIED))
        if result.verdict is Verdict.APPLIED:
            self._learn(rt, BreakerEvent.SUCCESS)
            DELIVERY_COUNT.labels(target.id, "delivered-unconfirmed").inc()
            log.info("ambiguous attempt had been applied; not re-sent", found=len(result.found))
            reason = (f"an earlier attempt got no answer; the target holds every resource this transfer creates, "
                      f"marked with it ({result.reason}), so it was not sent again; its transaction-response is lost")
            return [*out.emits, event(env.evolve(attempt=attempt_no), "delivered_unconfirmed", self.name, {
                "found": list(result.found), "reason": reason, "outcome": {
                    "resourceType": "OperationOutcome",
                    "issue": [{"severity": "information", "code": "informational", "diagnostics": reason}]}})]
        if result.verdict is Verdict.PARTIAL:
            reason = (f"an earlier attempt got no answer and the target holds only part of this transfer "
                      f"({result.reason}; marked {self.settings.transfer_tag_system}|{env.transfer_id}): check those "
                      "resources at the target, remove or complete them, then replay or discard this dead letter")
            return out.emits + await self._dead_letter(record, env, attempt_no, Attempt(None, error=reason),
                                                       Decision(Fate.DEAD_LETTER, reason), payload=out.payload)
        if result.verdict is Verdict.UNPROBEABLE:
            earlier = env.extra.get(X_REASON) or "an earlier attempt got no answer"
            return out.emits + await self._dead_letter(
                record, env, attempt_no, Attempt(None, error=result.reason),
                Decision(Fate.DEAD_LETTER, f"{earlier}; {result.reason}, so whether it was applied is unknown: "
                         "check the target for resources tagged "
                         f"{self.settings.transfer_tag_system}|{env.transfer_id}, then replay or discard"),
                payload=out.payload)
        # The target cannot even answer a search now: wait, and probe again next time.
        self._learn(rt, BreakerEvent.FAILURE)
        failed = result.attempt or Attempt(None, error=result.reason)
        failure = Failure.TRANSIENT if failed.status is None else classify(failed.status)
        return out.emits + await self._after(record, env, rt, attempt_no, failed,
                                             Failure.TRANSIENT if failure is not Failure.PERMANENT else failure,
                                             out.payload, probe=True)

    def _outgoing(self, env: Envelope, target: Target, payload: bytes, attempt_no: int,
                  conditional_types: frozenset[str] | None = frozenset()) -> Outgoing:
        """The payload this target gets: repaired per its policy, made conditional where the target creates
        conditionally (`conditional_types`: None every type, empty none), and marked with the transfer.

        The first attempt records what the repair changed (the marker is not a repair: it is always there).
        """
        try:
            bundle = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return Outgoing(payload, [], [], ProbePlan((), {}))
        if not isinstance(bundle, dict):
            return Outgoing(payload, [], [], ProbePlan((), {}))
        originals = original_full_urls(bundle)
        repaired = repair_transaction(bundle, request_url=target.repair.request_url,
                                      references=target.repair.references)
        emits = []
        if repaired.changes and attempt_no == 1:
            kinds = Counter(c.kind for c in repaired.changes)
            emits.append(event(env, "repaired", self.name, {
                "changes": dict(kinds),
                "examples": [{"expression": c.expression, "before": c.before, "after": c.after}
                             for c in repaired.changes[:20]],
            }))
        if conditional_types is None or conditional_types:
            conditional.make_conditional(repaired.bundle, conditional_types)  # a resend then creates nothing twice
        marked = mark_transfer(repaired.bundle, self.settings.transfer_tag_system, env.transfer_id)
        return Outgoing(orjson.dumps(marked), emits, originals, probe_plan(marked))

    async def committed(self, records: Sequence[Record]) -> None:
        """The records' outcomes are on the bus: close their journal rows (and now and then purge old ones)."""
        for r in records:
            self._let_out.pop(_position(r), None)
        keys = [k for k in (self._open.pop(_position(r), None) for r in records) if k is not None]
        await self.journal.close(keys)
        now = self.clock()
        if now >= self._next_purge:
            self._next_purge = now + JOURNAL_PURGE_EVERY_S
            await self.journal.purge(self.settings.topic_retention_days * 86400)

    async def _after(self, record: Record, env: Envelope, rt: TargetRuntime, attempt_no: int, attempt: Attempt,
                     failure: Failure, payload: bytes, *, probe: bool = False,
                     full_urls: list[str | None] | None = None) -> list[Emit]:
        target = rt.target
        first_failure = _moment(env.extra.get(X_FIRST_FAILURE))
        age = (datetime.now(UTC) - first_failure).total_seconds() if first_failure else 0.0
        decision = decide(
            failure, attempt_no, max_attempts=target.retry.max_attempts or self.settings.max_attempts,
            tiers_s=target.retry.delays_s or self.tiers, retry_after_s=parse_retry_after(attempt.retry_after),
            reason=attempt.error or attempt.describe(), jitter=target.retry.jitter, age_s=age,
            max_age_s=target.retry.max_age_s, ambiguous=target.ambiguous,
        )
        if decision.fate is not Fate.DEAD_LETTER:  # dead letters are counted once, in _dead_letter
            DELIVERY_COUNT.labels(target.id, decision.fate.value).inc()
        detail: dict[str, Any] = {"http_status": attempt.status, "duration_ms": round(attempt.duration_s * 1000, 1)}
        done = env.evolve(attempt=attempt_no)
        if decision.fate is Fate.DELIVERED:
            response = attempt.json()
            return [event(done, "delivered", self.name, event_id=delivered_event_id(env), detail={
                **detail, "response": response, "assigned": assigned_ids(full_urls or [], response)})]
        now = datetime.now(UTC).isoformat()
        extra = {**env.extra, X_FIRST_FAILURE: env.extra.get(X_FIRST_FAILURE) or now, X_LAST_FAILURE: now,
                 X_REASON: decision.reason[:500], X_HTTP_STATUS: str(attempt.status or "")}
        extra.pop(X_DUE, None)
        if decision.probe or probe:
            extra[X_PROBE] = "1"
        failed = env.evolve(attempt=attempt_no, extra=extra)
        if decision.fate is Fate.RETRY:
            parked = self._park(record, failed, decision.delay_s)
            due = parked.envelope.extra.get(X_DUE) or (parked.envelope.not_before or datetime.now(UTC)).isoformat()
            return [parked, event(done, "retry_scheduled", self.name, {
                **detail, "reason": decision.reason, "outcome": _outcome(attempt), "not_before": due,
                "probe": extra.get(X_PROBE) == "1"})]
        return await self._dead_letter(record, failed, attempt_no, attempt, decision, payload=payload)

    # --- parking and dead letters --------------------------------------------------------
    def _park(self, record: Record, env: Envelope, wait_s: float) -> Emit:
        """Re-publish to the retry tier that suits `wait_s`; the attempt count does not change."""
        wait_s = max(wait_s, 0.0)
        tier = park_tier(wait_s, self.tiers)
        now = datetime.now(UTC)
        extra = dict(env.extra)
        extra.pop(X_DUE, None)
        if wait_s <= self.tiers[tier - 1] * 1.5:
            not_before = now + timedelta(seconds=wait_s)
        else:
            # Longer than the tier's delay: come back at the tier's pace, then park again if not due.
            not_before = now + timedelta(seconds=self.tiers[tier - 1])
            extra[X_DUE] = (now + timedelta(seconds=wait_s)).isoformat()
        if record.topic == DELIVERIES:
            extra.setdefault(X_SEQ, str(record.offset))
        parked = env.evolve(not_before=not_before, extra=extra)
        return Emit(retry_topic(tier), record.key, parked)

    async def _dead_letter(self, record: Record, env: Envelope, attempt_no: int, attempt: Attempt,
                           decision: Decision, *, payload: bytes | None = None, inline: bool = True) -> list[Emit]:
        """The record to `deliveries.dlq` with everything an operator needs; its payload in the blob store."""
        DELIVERY_COUNT.labels(env.target or "", "dead-letter").inc()
        ref = BlobRef.from_extra(env.extra)
        if ref is None and inline:
            # Replay reads the payload from the blob store: the dead letter is a claim check too.
            ref = await self.blobs.put(payload if payload is not None else env.data)
        now = datetime.now(UTC).isoformat()
        extra = {**env.extra, X_FIRST_FAILURE: env.extra.get(X_FIRST_FAILURE) or now, X_LAST_FAILURE: now,
                 X_REASON: decision.reason[:500], X_HTTP_STATUS: str(attempt.status or ""),
                 "origtopic": record.topic, "origpartition": str(record.partition), "origoffset": str(record.offset)}
        extra.pop(X_DUE, None)
        if ref is not None:
            extra |= ref.to_extra()
        dead = env.evolve(attempt=attempt_no, not_before=None, extra=extra, data=b"" if ref else env.data)
        detail = {
            "http_status": attempt.status, "reason": decision.reason,
            "outcome": _outcome(attempt) or operation_outcome([error("exception", decision.reason[:2000], "Bundle")]),
            "attempts": attempt_no, "first_failure": extra[X_FIRST_FAILURE], "last_failure": now,
            "orig_topic": record.topic, "orig_partition": record.partition, "orig_offset": record.offset,
            "key": (record.key or b"").decode(errors="replace"),
            "blob": {"uri": ref.uri, "sha256": ref.sha256, "size": ref.size} if ref else None,
            "extra": {k: v for k, v in env.extra.items() if k not in FAILURE_ATTRIBUTES},
        }
        return [Emit(DELIVERIES_DLQ, record.key, dead),
                event(env.evolve(attempt=attempt_no), "dead_lettered", self.name, detail)]

    # --- the breaker ---------------------------------------------------------------------
    def _learn(self, rt: TargetRuntime, what: BreakerEvent) -> None:
        before = rt.breaker
        rt.breaker = breaker_after(before, what, self.clock(), threshold=rt.target.breaker.failures,
                                   probe_every_s=rt.target.breaker.probe_every_s)
        if before.circuit is not rt.breaker.circuit:
            log.warning("target circuit changed", target=rt.target.id, circuit=rt.breaker.circuit.value,
                        failures=rt.breaker.failures)
            self._report(rt.target.id, rt.breaker.circuit.value, rt.breaker.failures)
            if not breaker_allows(rt.breaker):
                self._ensure_prober(rt)

    def _report(self, target: str, circuit: str, failures: int) -> None:
        """Tell operators, without making the record wait for it (a failed report is only logged)."""
        if self.report_circuit is None:
            return

        async def send() -> None:
            try:
                await self.report_circuit(target, circuit, failures)  # type: ignore[misc]
            except Exception as exc:  # noqa: BLE001 - operators' view must never block deliveries
                log.warning("cannot report circuit state", target=target, error=str(exc))

        task = asyncio.create_task(send())
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    def _ensure_prober(self, rt: TargetRuntime) -> None:
        if rt.prober is None or rt.prober.done():
            rt.prober = asyncio.create_task(self._probe_until_closed(rt), name=f"probe-{rt.target.id}")

    async def _probe_until_closed(self, rt: TargetRuntime) -> None:
        """While the circuit is open, ask the target's /metadata now and then; records are not used."""
        while not breaker_allows(rt.breaker):
            await asyncio.sleep(max(rt.breaker.next_probe_at - self.clock(), 0.0))
            if breaker_allows(rt.breaker):
                return
            ok = await rt.client.health()
            self._learn(rt, BreakerEvent.PROBE_OK if ok else BreakerEvent.PROBE_FAILED)


def _order_lane(record: Record) -> tuple[str | None, bytes | None, int]:
    """The lane whose order `LaneOrder` keeps: target + person, and the partition number that holds them all."""
    return (record.envelope.target, record.key, record.partition)


def _seq(record: Record) -> float:
    """The record's place in its lane: its offset in `deliveries` (inf for a retry record parked without one)."""
    text = record.envelope.extra.get(X_SEQ)
    if text and text.isdigit():
        return float(text)
    return float(record.offset) if record.topic == DELIVERIES else math.inf


def _waiting_until(env: Envelope, now: datetime) -> datetime:
    """When a record waiting in a retry tier wants its next attempt."""
    return _moment(env.extra.get(X_DUE)) or env.not_before or now


def delivered_event_id(env: Envelope) -> str:
    """The id of the event saying a delivery record's transfer reached its target: one per (transfer, target,
    round), as one chain of attempts delivers once (services/delivery/journal.py), whichever copy reports it."""
    key = AttemptKey.next_of(env)
    return str(uuid.uuid5(DELIVERED_EVENTS, f"{key.transfer_id}|{key.target}|{key.round}"))


def request_id(env: Envelope) -> str:
    """The X-Request-Id of every attempt at one (transfer, target): a target can spot a repeat."""
    return f"{env.transfer_id}/{env.target}"


def _position(record: Record) -> tuple[str, int, int]:
    return (record.topic, record.partition, record.offset)


def _outcome(attempt: Attempt) -> dict[str, Any] | None:
    answer = attempt.json()
    return answer if answer and answer.get("resourceType") == "OperationOutcome" else None


def _moment(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return aware(moment)


def _is_transaction_response(body: dict[str, Any] | None) -> bool:
    """A transaction-response whose every entry succeeded ("201", "201 Created", ...).

    Some servers run a transaction as a batch and answer 200 with failed entries inside; that is a
    partial application, not a delivery, and must not be reported as one.
    """
    if not body or body.get("resourceType") != "Bundle" or body.get("type") != "transaction-response":
        return False
    entries = body.get("entry") or []
    return all(isinstance(e, dict) and str((e.get("response") or {}).get("status", "")).strip().startswith("2")
               for e in entries)
