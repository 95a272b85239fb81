"""Delivery stage: `deliveries` and its retry tiers → the target, a retry tier, or `deliveries.dlq`."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from services.core.envelope import Emit, Envelope, Record, event
from services.core.metrics import DELIVERIES as DELIVERY_COUNT
from services.core.settings import Settings
from services.core.targets import TargetDirectory
from services.core.topics import DELIVERIES, DELIVERIES_DLQ, retry_topic
from services.delivery.client import Attempt, post_transaction
from services.delivery.logic import Decision, Failure, Fate, classify, decide, parse_retry_after


class DeliveryStage:
    """Delivers each (transfer, target) record; retries wait in retry topics without blocking others."""

    name = "delivery"

    def __init__(self, settings: Settings, directory: TargetDirectory, client: httpx.AsyncClient) -> None:
        self.settings = settings
        self.directory = directory
        self.client = client
        self.topics: Sequence[str] = (DELIVERIES, *(retry_topic(n) for n in
                                                     range(1, len(settings.retry_delays_s) + 1)))

    async def handle(self, record: Record) -> Sequence[Emit]:
        """One attempt at one target, then the record's fate."""
        env = record.envelope
        attempt_no = env.attempt + 1
        target = self.directory.get(env.target or "")
        if target is None:
            decision = Decision(Fate.DEAD_LETTER, f"target '{env.target}' is not configured")
            attempt = Attempt(None, error="unknown target")
        else:
            attempt = await post_transaction(self.client, target, env.data, request_id(env))
            failure = classify(attempt.status)
            if failure is Failure.NONE and not _is_transaction_response(attempt.json()):
                failure = Failure.PERMANENT  # a 2xx that does not say what was created proves nothing
                attempt = Attempt(attempt.status, attempt.body, error="2xx without a transaction-response Bundle")
            decision = decide(
                failure, attempt_no, max_attempts=self.settings.max_attempts, tiers_s=self.settings.retry_delays_s,
                retry_after_s=parse_retry_after(attempt.retry_after), reason=attempt.error or attempt.describe(),
            )
        DELIVERY_COUNT.labels(env.target or "", decision.fate.value).inc()
        return self._emits(record, env, attempt_no, attempt, decision)

    def _emits(self, record: Record, env: Envelope, attempt_no: int, attempt: Attempt,
               decision: Decision) -> list[Emit]:
        detail: dict[str, Any] = {"http_status": attempt.status, "duration_ms": round(attempt.duration_s * 1000, 1)}
        done = env.evolve(attempt=attempt_no)
        if decision.fate is Fate.DELIVERED:
            return [event(done, "delivered", self.name, {**detail, "response": attempt.json()})]
        answer = attempt.json()
        outcome = answer if answer and answer.get("resourceType") == "OperationOutcome" else None
        detail |= {"reason": decision.reason, "outcome": outcome}
        first_failure = env.extra.get("firstfailure") or datetime.now(UTC).isoformat()
        extra = {**env.extra, "firstfailure": first_failure, "reason": decision.reason[:500],
                 "httpstatus": str(attempt.status or "")}
        if decision.fate is Fate.RETRY:
            due = datetime.now(UTC) + timedelta(seconds=decision.delay_s)
            retry = env.evolve(attempt=attempt_no, not_before=due, extra=extra)
            return [Emit(retry_topic(decision.tier), record.key, retry),
                    event(done, "retry_scheduled", self.name, {**detail, "not_before": due.isoformat()})]
        extra |= {"origtopic": record.topic, "origpartition": str(record.partition),
                  "origoffset": str(record.offset)}
        dead = env.evolve(attempt=attempt_no, not_before=None, extra=extra)
        return [Emit(DELIVERIES_DLQ, record.key, dead), event(done, "dead_lettered", self.name, detail)]


def request_id(env: Envelope) -> str:
    """The X-Request-Id of every attempt at one (transfer, target): a target can spot a repeat."""
    return f"{env.transfer_id}/{env.target}"


def _is_transaction_response(body: dict[str, Any] | None) -> bool:
    return bool(body) and body.get("resourceType") == "Bundle" and body.get("type") == "transaction-response"  # type: ignore[union-attr]
