"""Delivery stage: `deliveries` and its retry tiers → the target, a retry tier, or `deliveries.dlq`.

Per target, in memory and per delivery process (replicas do not share it): a circuit breaker, a
concurrency limit and the HTTP client with its credentials. A record that cannot be attempted now
(circuit open, target paused, not yet due) is *parked*: re-published to a retry tier with a later
`not_before`, its attempt count unchanged, so it neither burns attempts nor holds up the records
behind it in its partition (which may be for healthy targets).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
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
from services.core.envelope import Emit, Envelope, Record, event
from services.core.logging import get_logger
from services.core.metrics import DELIVERIES as DELIVERY_COUNT
from services.core.settings import Settings
from services.core.targets import Target, TargetDirectory
from services.core.topics import DELIVERIES, DELIVERIES_DLQ, retry_topic
from services.delivery.capability import conditional_payload
from services.delivery.client import Attempt, TargetClient
from services.delivery.logic import (
    Breaker,
    BreakerEvent,
    Decision,
    Failure,
    Fate,
    breaker_after,
    breaker_allows,
    classify,
    decide,
    park_tier,
    parse_retry_after,
)
from services.delivery.repair import assigned_ids, original_full_urls, repair_transaction

log = get_logger(__name__)

# Envelope attributes the delivery stage keeps between attempts (never restored on replay).
X_DUE, X_PROBE, X_SENT_AT = "due", "probe", "sentat"
X_FIRST_FAILURE, X_LAST_FAILURE, X_REASON, X_HTTP_STATUS = "firstfailure", "lastfailure", "reason", "httpstatus"
FAILURE_ATTRIBUTES = frozenset({X_DUE, X_PROBE, X_SENT_AT, X_FIRST_FAILURE, X_LAST_FAILURE, X_REASON, X_HTTP_STATUS,
                                "origtopic", "origpartition", "origoffset", X_BLOB, X_BLOB_SHA256, X_BLOB_SIZE})


@dataclass
class TargetRuntime:
    """One target's live state in this process."""

    target: Target
    client: TargetClient
    semaphore: asyncio.Semaphore
    breaker: Breaker = field(default_factory=Breaker)
    prober: asyncio.Task[None] | None = None


class DeliveryStage:
    """Delivers each (transfer, target) record; retries and waits happen in retry topics, not here."""

    name = "delivery"

    def __init__(self, settings: Settings, directory: TargetDirectory, blobs: BlobStore, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.directory = directory
        self.blobs = blobs
        self.clock = clock
        self.tiers = tuple(settings.retry_delays_s)
        self.topics: Sequence[str] = (DELIVERIES, *(retry_topic(n) for n in range(1, len(self.tiers) + 1)))
        self.runtimes = {
            t.id: TargetRuntime(t, TargetClient(t), asyncio.Semaphore(t.max_concurrency))
            for t in directory.targets if t.enabled
        }
        # Targets an operator paused (ops API → ledger `target_state`); refreshed by `watch_pauses`.
        self.paused_by_operator: frozenset[str] = frozenset()
        # Where breaker transitions are reported for operators (None: nowhere; set by the launcher).
        self.report_circuit: Callable[[str, str, int], Awaitable[None]] | None = None
        self._reports: set[asyncio.Task[None]] = set()

    async def watch_pauses(self, read: Callable[[], Awaitable[frozenset[str]]], every_s: float = 5.0) -> None:
        """Keep `paused_by_operator` current; on a read error keep the last known value and try again."""
        while True:
            try:
                self.paused_by_operator = await read()
            except Exception as exc:  # noqa: BLE001 - a ledger hiccup must not stop deliveries
                log.warning("cannot read paused targets; keeping the last known set", error=str(exc))
            await asyncio.sleep(every_s)

    async def aclose(self) -> None:
        """Stop probes and close every target's connections; safe twice."""
        for rt in self.runtimes.values():
            if rt.prober is not None:
                rt.prober.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await rt.prober
                rt.prober = None
            await rt.client.aclose()

    def breaker(self, target_id: str) -> Breaker | None:
        """A target's breaker state (for tests and operators)."""
        rt = self.runtimes.get(target_id)
        return rt.breaker if rt else None

    # --- the record ------------------------------------------------------------------------
    async def handle(self, record: Record) -> Sequence[Emit]:
        """Attempt the delivery now, or park it until it may be attempted."""
        env = record.envelope
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
        async with rt.semaphore:
            if not breaker_allows(rt.breaker):
                self._ensure_prober(rt)
                # Come back about when the next probe may have closed the circuit.
                return [self._park(record, env, max(rt.breaker.next_probe_at - self.clock(), 0) + 0.05)]
            return await self._attempt(record, env, rt)

    async def _attempt(self, record: Record, env: Envelope, rt: TargetRuntime) -> list[Emit]:
        target = rt.target
        try:
            payload = await resolve_payload(self.blobs, env.data, env.extra)
        except BlobIntegrityError as exc:
            return await self._dead_letter(record, env, env.attempt, Attempt(None, error=str(exc), sent=False),
                                           Decision(Fate.DEAD_LETTER, f"claim check failed: {exc}"), inline=False)
        attempt_no = env.attempt + 1
        payload, repair_emits, full_urls = self._repair(env, target, payload, attempt_no)
        payload = await conditional_payload(rt.client, payload)  # conditional create (dui-contract)
        sent_at = datetime.now(UTC)
        probing = env.extra.get(X_PROBE) == "1" and target.ambiguous == "probe"
        if probing:
            first_sent = _moment(env.extra.get(X_SENT_AT)) or sent_at
            result = await rt.client.probe(payload, first_sent, self.settings.probe_clock_skew_s)
            if result.verdict == "applied":
                self._learn(rt, BreakerEvent.SUCCESS)
                DELIVERY_COUNT.labels(target.id, "delivered-unconfirmed").inc()
                log.info("ambiguous attempt had been applied; not re-sent", found=len(result.found))
                reason = (f"an earlier attempt got no answer; the target holds the Bundle's resources "
                          f"({', '.join(result.found)}), created since, so it was not sent again; its "
                          "transaction-response is lost")
                return [event(env.evolve(attempt=attempt_no), "delivered_unconfirmed", self.name, {
                    "found": list(result.found), "reason": reason, "outcome": {
                        "resourceType": "OperationOutcome",
                        "issue": [{"severity": "information", "code": "informational", "diagnostics": reason}]}})]
            if result.verdict == "unprobeable":
                return await self._dead_letter(record, env, attempt_no, Attempt(None, error=result.reason),
                                               Decision(Fate.DEAD_LETTER, f"ambiguous failure and {result.reason}; "
                                                        "an operator must check the target"), payload=payload)
            if result.verdict == "failed" and result.attempt is not None:
                # The target cannot even answer a search: wait, and probe again next time.
                self._learn(rt, BreakerEvent.FAILURE)
                failure = Failure.TRANSIENT if result.attempt.status is None else classify(result.attempt.status)
                return await self._after(record, env, rt, attempt_no, result.attempt,
                                         Failure.TRANSIENT if failure is not Failure.PERMANENT else failure,
                                         payload, probe=True)
        attempt = await rt.client.post_transaction(payload, request_id(env))
        failure = classify(attempt.status, sent=attempt.sent)
        if failure is Failure.NONE and not _is_transaction_response(attempt.json()):
            failure = Failure.PERMANENT  # a 2xx that does not say what was created proves nothing
            attempt = Attempt(attempt.status, attempt.body,
                              error="2xx without a transaction-response Bundle whose every entry succeeded")
        self._learn(rt, BreakerEvent.FAILURE if failure in (Failure.TRANSIENT, Failure.AMBIGUOUS)
                    else BreakerEvent.SUCCESS)
        sent = sent_at if failure is Failure.AMBIGUOUS else None
        return repair_emits + await self._after(record, env, rt, attempt_no, attempt, failure, payload, sent_at=sent,
                                                full_urls=full_urls)

    def _repair(self, env: Envelope, target: Target, payload: bytes,
                attempt_no: int) -> tuple[bytes, list[Emit], list[str | None]]:
        """The payload this target gets: repaired per its policy; the first attempt records what changed."""
        try:
            bundle = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return payload, [], []
        if not isinstance(bundle, dict):
            return payload, [], []
        originals = original_full_urls(bundle)
        repaired = repair_transaction(bundle, request_url=target.repair.request_url,
                                      references=target.repair.references)
        if not repaired.changes:
            return payload, [], originals  # untouched: the producer's bytes go out as they came
        emits = []
        if attempt_no == 1:
            kinds = Counter(c.kind for c in repaired.changes)
            emits.append(event(env, "repaired", self.name, {
                "changes": dict(kinds),
                "examples": [{"expression": c.expression, "before": c.before, "after": c.after}
                             for c in repaired.changes[:20]],
            }))
        return orjson.dumps(repaired.bundle), emits, originals

    async def _after(self, record: Record, env: Envelope, rt: TargetRuntime, attempt_no: int, attempt: Attempt,
                     failure: Failure, payload: bytes, *, probe: bool = False,
                     sent_at: datetime | None = None, full_urls: list[str | None] | None = None) -> list[Emit]:
        target = rt.target
        first_failure = _moment(env.extra.get(X_FIRST_FAILURE))
        age = (datetime.now(UTC) - first_failure).total_seconds() if first_failure else 0.0
        decision = decide(
            failure, attempt_no, max_attempts=target.retry.max_attempts or self.settings.max_attempts,
            tiers_s=target.retry.delays_s or self.tiers, retry_after_s=parse_retry_after(attempt.retry_after),
            reason=attempt.error or attempt.describe(), jitter=target.retry.jitter, age_s=age,
            max_age_s=target.retry.max_age_s, ambiguous=target.ambiguous,
        )
        DELIVERY_COUNT.labels(target.id, decision.fate.value).inc()
        detail: dict[str, Any] = {"http_status": attempt.status, "duration_ms": round(attempt.duration_s * 1000, 1)}
        done = env.evolve(attempt=attempt_no)
        if decision.fate is Fate.DELIVERED:
            response = attempt.json()
            return [event(done, "delivered", self.name, {
                **detail, "response": response, "assigned": assigned_ids(full_urls or [], response)})]
        now = datetime.now(UTC).isoformat()
        extra = {**env.extra, X_FIRST_FAILURE: env.extra.get(X_FIRST_FAILURE) or now, X_LAST_FAILURE: now,
                 X_REASON: decision.reason[:500], X_HTTP_STATUS: str(attempt.status or "")}
        extra.pop(X_DUE, None)
        if decision.probe or probe:
            extra[X_PROBE] = "1"
            extra[X_SENT_AT] = env.extra.get(X_SENT_AT) or (sent_at or datetime.now(UTC)).isoformat()
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
            "http_status": attempt.status, "reason": decision.reason, "outcome": _outcome(attempt),
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


def request_id(env: Envelope) -> str:
    """The X-Request-Id of every attempt at one (transfer, target): a target can spot a repeat."""
    return f"{env.transfer_id}/{env.target}"


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
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


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
