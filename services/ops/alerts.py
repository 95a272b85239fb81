"""Alerts: rules on dead-letter growth, lag per stage and waiting records per target — no floods.

Each evaluation turns observations into *conditions* (pure), then compares them with what is already
firing (pure): a condition that starts fires once, one that lasts says nothing more, one that ends
resolves once. Notifications go to the log and, when RELAIS_ALERT_WEBHOOK_URL is set, to a webhook
(JSON POST). Run one alerts process per Relais (`relais alerts`, or within `relais run`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import httpx

from services.core.logging import get_logger
from services.core.metrics import ALERTS_FIRING, DLQ_SIZE, TARGET_WAITING
from services.core.settings import Settings

log = get_logger(__name__)

Key = tuple[str, str]  # (rule, subject)


@dataclass(frozen=True, slots=True)
class Observation:
    """What one evaluation saw."""

    at: float  # monotonic seconds
    dlq_size: int
    lag: Mapping[str, int]  # stage -> lag
    waiting: Mapping[str, int]  # target -> pending or retrying deliveries


@dataclass(frozen=True, slots=True)
class Condition:
    """One rule's verdict on one subject (a stage, a target, the DLQ)."""

    rule: str
    subject: str
    active: bool
    value: float
    threshold: float
    message: str

    @property
    def key(self) -> Key:
        """(rule, subject)."""
        return (self.rule, self.subject)


@dataclass(frozen=True, slots=True)
class Notification:
    """An alert starting (`firing`) or ending (`resolved`)."""

    state: Literal["firing", "resolved"]
    condition: Condition
    since: datetime

    def as_dict(self) -> dict[str, Any]:
        """The webhook's JSON body."""
        c = self.condition
        return {"state": self.state, "rule": c.rule, "subject": c.subject, "value": c.value,
                "threshold": c.threshold, "message": c.message, "since": self.since.isoformat(),
                "source": "relais"}


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The rules' limits (from settings)."""

    dlq_growth: int
    window_s: float
    lag_max: int
    waiting_max: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Thresholds:
        """The limits configured for this Relais."""
        return cls(settings.alert_dlq_growth, settings.alert_window_s, settings.alert_lag_max,
                   settings.alert_waiting_max)


def conditions(history: Iterable[Observation], now: Observation, limits: Thresholds) -> list[Condition]:
    """Every rule's verdict for `now`, given earlier observations (for the growth rule)."""
    in_window = [o for o in history if now.at - o.at <= limits.window_s]
    baseline = min((o.dlq_size for o in in_window), default=now.dlq_size)
    growth = now.dlq_size - baseline
    out = [Condition("dlq_growth", "dlq", growth >= limits.dlq_growth, growth, limits.dlq_growth,
                     f"{growth} new dead letter(s) in the last {limits.window_s:g}s (now {now.dlq_size})")]
    out += [Condition("stage_lag", stage, lag > limits.lag_max, lag, limits.lag_max,
                      f"stage {stage} is {lag} record(s) behind")
            for stage, lag in sorted(now.lag.items())]
    out += [Condition("target_waiting", target, n > limits.waiting_max, n, limits.waiting_max,
                      f"{n} record(s) waiting for target {target}")
            for target, n in sorted(now.waiting.items())]
    return out


def transitions(firing: Mapping[Key, datetime], current: Iterable[Condition],
                now: datetime) -> tuple[dict[Key, datetime], list[Notification]]:
    """What fires and what resolves: only changes notify. A firing subject no longer observed resolves."""
    seen = {c.key: c for c in current}
    still: dict[Key, datetime] = {}
    notes: list[Notification] = []
    for key, cond in seen.items():
        if cond.active:
            still[key] = firing.get(key, now)
            if key not in firing:
                notes.append(Notification("firing", cond, now))
        elif key in firing:
            notes.append(Notification("resolved", cond, firing[key]))
    for key, since in firing.items():
        if key not in seen:
            gone = Condition(key[0], key[1], False, 0, 0, f"{key[1]} no longer observed")
            notes.append(Notification("resolved", gone, since))
    return still, notes


Observe = Callable[[], Awaitable[Observation]]
Notify = Callable[[Notification], Awaitable[None]]


@dataclass
class AlertEvaluator:
    """Keeps what fires between evaluations and the recent history of the growth rule."""

    limits: Thresholds
    firing: dict[Key, datetime] = field(default_factory=dict)
    history: deque[Observation] = field(default_factory=lambda: deque(maxlen=10_000))

    def step(self, obs: Observation, now: datetime | None = None) -> list[Notification]:
        """Evaluate one observation; returns the notifications to send."""
        current = conditions(self.history, obs, self.limits)
        self.history.append(obs)
        while self.history and obs.at - self.history[0].at > self.limits.window_s:
            self.history.popleft()
        self.firing, notes = transitions(self.firing, current, now or datetime.now(UTC))
        DLQ_SIZE.set(obs.dlq_size)
        for target, n in obs.waiting.items():
            TARGET_WAITING.labels(target).set(n)
        for c in current:
            ALERTS_FIRING.labels(c.rule, c.subject).set(1 if c.key in self.firing else 0)
        return notes


class WebhookNotifier:
    """Logs every notification and POSTs it to the webhook when one is configured."""

    def __init__(self, url: str | None, *, timeout_s: float = 5.0) -> None:
        self.url = url
        self.client = httpx.AsyncClient(timeout=timeout_s) if url else None

    async def __call__(self, note: Notification) -> None:
        """Send one notification; a webhook failure is logged, never fatal."""
        c = note.condition
        (log.warning if note.state == "firing" else log.info)(
            f"alert {note.state}", rule=c.rule, subject=c.subject, value=c.value, threshold=c.threshold,
            alert=c.message)
        if self.client is None or self.url is None:
            return
        try:
            answer = await self.client.post(self.url, json=note.as_dict())
            if answer.status_code >= 300:
                log.warning("alert webhook refused the notification", status=answer.status_code, rule=c.rule)
        except httpx.HTTPError as exc:
            log.warning("alert webhook unreachable", error=str(exc), rule=c.rule)

    async def aclose(self) -> None:
        """Close the HTTP client; safe twice."""
        if self.client is not None:
            await self.client.aclose()


async def run_alerts(evaluator: AlertEvaluator, observe: Observe, notify: Notify, interval_s: float,
                     stop: asyncio.Event) -> None:
    """Evaluate every `interval_s` until `stop`; an observation failure skips one cycle (logged)."""
    while not stop.is_set():
        try:
            obs = await observe()
        except Exception as exc:  # noqa: BLE001 - the ledger or Kafka being down must not kill the loop
            log.warning("alert evaluation skipped: cannot observe", error=str(exc))
        else:
            for note in evaluator.step(obs):
                await notify(note)
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
        except TimeoutError:
            pass
