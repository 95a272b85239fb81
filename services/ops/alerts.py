"""Alerts: state rules that fire while a problem lasts and resolve only when it clears, told reliably.

Rules (pure, `conditions`), each on a subject:

* `dlq_not_empty` (dlq): dead letters of any stage wait for an operator (more than RELAIS_ALERT_DLQ_MAX);
* `target_down` (a target): its circuit is open, or its latest attempts all failed (no success since);
* `target_slow` (a target): it answers, but its p99 latency over the last hour is over its budget
  (`latency_budget_s` in the targets file, default RELAIS_TARGET_LATENCY_BUDGET_S);
* `oldest_waiting` (a target): its oldest pending or retrying record was accepted too long ago;
* `target_waiting` (a target): too many records wait for it;
* `stage_lag` (a stage): its consumer group is too far behind;
* `storage_not_ready` (a store: the embedded log, the data disk): it cannot be written (read-only, locked,
  full), so records wait and POST /fhir answers 503;
* `storage_free_low` (a data path): less than `free_min_bytes` left, before the disk is full.

`advance` (pure) turns conditions into notifications: a rule fires once it has held for `for_s`, is
re-sent every `repeat_s` while it fires, and resolves once it has been clear for `keep_firing_s` — so
a flapping target gives one firing and one resolved, not one per flap. The `WebhookNotifier` logs
every notification and POSTs it to RELAIS_ALERT_WEBHOOK_URL: concurrently across alerts, each with a
timeout, in order per alert, retried with backoff while the receiver answers 5xx or cannot be
reached — a `resolved` never overtakes its `firing`. Run one alerts process per Relais.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

import httpx

from services.core.logging import get_logger
from services.core.metrics import (
    ALERTS_FIRING,
    DLQ_SIZE,
    OLDEST_WAITING_SECONDS,
    STORAGE_FREE_BYTES,
    TARGET_DOWN,
    TARGET_WAITING,
)
from services.core.settings import Settings
from services.core.tasks import cancel_and_wait, wait_until_set

log = get_logger(__name__)

Key = tuple[str, str]  # (rule, subject)


@dataclass(frozen=True, slots=True)
class TargetObservation:
    """One target's state, as the ledger and the delivery processes report it."""

    waiting: int = 0
    down: bool = False  # circuit open, or the latest attempts failed with no success since
    circuit: str = "closed"
    oldest_waiting_s: float | None = None
    last_error: str | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    budget_ms: float | None = None
    slow: bool = False  # p99 over budget (services.core.targets.over_latency_budget)


@dataclass(frozen=True, slots=True)
class Observation:
    """What one evaluation saw."""

    at: float  # monotonic seconds
    dlq_size: int
    lag: Mapping[str, int]  # stage -> lag
    targets: Mapping[str, TargetObservation]
    storage: Mapping[str, str | None] = field(default_factory=dict)  # store -> why it cannot be written, or None
    free_bytes: Mapping[str, int] = field(default_factory=dict)  # local data path -> bytes free


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
    """An alert starting (`firing`, or still firing when `repeat`) or ending (`resolved`)."""

    state: Literal["firing", "resolved"]
    condition: Condition
    since: datetime
    repeat: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The webhook's JSON body."""
        c = self.condition
        return {"state": self.state, "rule": c.rule, "subject": c.subject, "value": c.value,
                "threshold": c.threshold, "message": c.message, "since": self.since.isoformat(),
                "repeat": self.repeat, "source": "relais"}


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The rules' limits and the damping policy (from settings)."""

    dlq_max: int = 0
    lag_max: int = 1000
    waiting_max: int = 100
    waiting_age_s: float = 900.0
    for_s: float = 0.0
    keep_firing_s: float = 120.0
    repeat_s: float = 3600.0
    free_min_bytes: int = 512 * 1024 * 1024  # warn well before diskspace.MIN_FREE_BYTES makes a disk count as full

    @classmethod
    def from_settings(cls, settings: Settings) -> Thresholds:
        """The limits configured for this Relais."""
        return cls(settings.alert_dlq_max, settings.alert_lag_max, settings.alert_waiting_max,
                   settings.alert_waiting_age_s, settings.alert_for_s, settings.alert_keep_firing_s,
                   settings.alert_repeat_s)


def conditions(now: Observation, limits: Thresholds) -> list[Condition]:
    """Every rule's verdict on what is observed now: each describes a state, not a change."""
    out = [Condition("dlq_not_empty", "dlq", now.dlq_size > limits.dlq_max, now.dlq_size, limits.dlq_max,
                     f"{now.dlq_size} dead letter(s) wait for an operator (relais dlq list)")]
    out += [Condition("stage_lag", stage, lag > limits.lag_max, lag, limits.lag_max,
                      f"stage {stage} is {lag} record(s) behind")
            for stage, lag in sorted(now.lag.items())]
    for target, t in sorted(now.targets.items()):
        why = f"circuit {t.circuit}" if t.circuit == "open" else f"last error: {t.last_error or 'unknown'}"
        out.append(Condition("target_down", target, t.down, 1 if t.down else 0, 0,
                             f"target {target} is down ({why})" if t.down else f"target {target} is up"))
        out.append(Condition("target_waiting", target, t.waiting > limits.waiting_max, t.waiting, limits.waiting_max,
                             f"{t.waiting} record(s) waiting for target {target}"))
        out.append(Condition("target_slow", target, t.slow, t.p99_ms or 0, t.budget_ms or 0,
                             f"target {target} is slow: p50 {t.p50_ms or 0:.0f} ms, p99 {t.p99_ms or 0:.0f} ms "
                             f"(budget {t.budget_ms or 0:.0f} ms)" if t.slow else f"target {target} is within "
                             "its latency budget"))
        age = t.oldest_waiting_s or 0.0
        out.append(Condition("oldest_waiting", target, age > limits.waiting_age_s, round(age, 1),
                             limits.waiting_age_s, f"the oldest record waiting for target {target} was accepted "
                             f"{age:.0f}s ago"))
    for store, problem in sorted(now.storage.items()):
        out.append(Condition("storage_not_ready", store, problem is not None, 1 if problem else 0, 0,
                             f"{store} cannot be written: {problem}" if problem else f"{store} takes writes"))
    for path, free in sorted(now.free_bytes.items()):
        out.append(Condition("storage_free_low", path, free < limits.free_min_bytes, free, limits.free_min_bytes,
                             f"{free // (1024 * 1024)} MiB free for {path}; free space there before it fills "
                             "(records then wait and POST /fhir answers 503)"))
    return out


@dataclass(frozen=True, slots=True)
class AlertState:
    """Where one (rule, subject) stands between evaluations."""

    phase: Literal["pending", "firing"]
    active_since: float  # monotonic
    condition: Condition
    fired_at: datetime | None = None
    last_sent: float = 0.0  # monotonic
    clear_since: float | None = None  # monotonic; None while the condition holds


def advance(states: Mapping[Key, AlertState], current: Iterable[Condition], at: float, now: datetime,
            limits: Thresholds) -> tuple[dict[Key, AlertState], list[Notification]]:
    """The alerts' states after `current` is observed at monotonic time `at`, and what to notify."""
    seen = {c.key: c for c in current}
    for key, state in states.items():  # a subject no longer observed counts as clear
        if key not in seen:
            seen[key] = replace(state.condition, active=False, message=f"{key[1]} no longer observed")
    out: dict[Key, AlertState] = {}
    notes: list[Notification] = []
    for key, cond in seen.items():
        known = states.get(key)
        if cond.active:
            state = AlertState("pending", at, cond) if known is None else replace(known, condition=cond,
                                                                                    clear_since=None)
            if state.phase == "pending" and at - state.active_since >= limits.for_s:
                state = replace(state, phase="firing", fired_at=now, last_sent=at)
                notes.append(Notification("firing", cond, now))
            elif (state.phase == "firing" and state.fired_at is not None and limits.repeat_s > 0
                  and at - state.last_sent >= limits.repeat_s):
                notes.append(Notification("firing", cond, state.fired_at, repeat=True))
                state = replace(state, last_sent=at)
            out[key] = state
        elif known is not None and known.phase == "firing" and known.fired_at is not None:
            clear_since = known.clear_since if known.clear_since is not None else at
            if at - clear_since >= limits.keep_firing_s:
                notes.append(Notification("resolved", cond, known.fired_at))
            else:
                out[key] = replace(known, condition=replace(known.condition, message=cond.message),
                                   clear_since=clear_since)
        # a pending alert whose condition cleared never fired: it is simply forgotten
    return out, notes


Observe = Callable[[], Awaitable[Observation]]
Notify = Callable[[Notification], Awaitable[None]]


@dataclass
class AlertEvaluator:
    """Keeps the alerts' states between evaluations and exports them as metrics."""

    limits: Thresholds
    states: dict[Key, AlertState] = field(default_factory=dict)

    @property
    def firing(self) -> dict[Key, datetime]:
        """Alerts firing now, with the time each started."""
        return {k: s.fired_at for k, s in self.states.items() if s.phase == "firing" and s.fired_at is not None}

    def step(self, obs: Observation, now: datetime | None = None) -> list[Notification]:
        """Evaluate one observation; returns the notifications to send."""
        current = conditions(obs, self.limits)
        self.states, notes = advance(self.states, current, obs.at, now or datetime.now(UTC), self.limits)
        DLQ_SIZE.set(obs.dlq_size)
        for target, t in obs.targets.items():
            TARGET_WAITING.labels(target).set(t.waiting)
            TARGET_DOWN.labels(target).set(1 if t.down else 0)
            OLDEST_WAITING_SECONDS.labels(target).set(t.oldest_waiting_s or 0)
        for path, free in obs.free_bytes.items():
            STORAGE_FREE_BYTES.labels(path).set(free)
        firing = self.firing
        for c in current:
            ALERTS_FIRING.labels(c.rule, c.subject).set(1 if c.key in firing else 0)
        return notes


class WebhookNotifier:
    """Logs every notification; POSTs it to the webhook, concurrently per alert, retried until accepted."""

    def __init__(self, url: str | None, *, timeout_s: float = 5.0, backoff_max_s: float = 60.0,
                 backoff_first_s: float = 1.0) -> None:
        self.url = url
        self.backoff_first_s = backoff_first_s
        self.backoff_max_s = backoff_max_s
        self.client = httpx.AsyncClient(timeout=timeout_s) if url else None
        self._queues: dict[Key, asyncio.Queue[Notification]] = {}
        self._workers: dict[Key, asyncio.Task[None]] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookNotifier:
        """The notifier RELAIS_ALERT_WEBHOOK_* describe."""
        return cls(settings.alert_webhook_url, timeout_s=settings.alert_webhook_timeout_s,
                   backoff_max_s=settings.alert_webhook_backoff_max_s)

    async def __call__(self, note: Notification) -> None:
        """Log `note` and queue it for the webhook; returns at once (delivery goes on in the background)."""
        c = note.condition
        (log.warning if note.state == "firing" else log.info)(
            f"alert {note.state}", rule=c.rule, subject=c.subject, value=c.value, threshold=c.threshold,
            alert=c.message, repeat=note.repeat)
        if self.client is None:
            return
        queue = self._queues.setdefault(c.key, asyncio.Queue())
        if note.repeat and not queue.empty():
            return  # the receiver has not even had the earlier one yet: a reminder adds nothing
        queue.put_nowait(note)
        worker = self._workers.get(c.key)
        if worker is None or worker.done():
            self._workers[c.key] = asyncio.create_task(self._drain(c.key, queue), name=f"alert-{c.rule}-{c.subject}")

    async def _drain(self, key: Key, queue: asyncio.Queue[Notification]) -> None:
        """Send one alert's notifications in order, each until the receiver accepts it."""
        while not queue.empty():
            note = queue.get_nowait()
            delay = self.backoff_first_s
            while not await self._post(note):
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max_s)

    async def _post(self, note: Notification) -> bool:
        assert self.client is not None and self.url is not None
        c = note.condition
        try:
            answer = await self.client.post(self.url, json=note.as_dict())
        except httpx.HTTPError as exc:
            log.warning("alert webhook unreachable; will retry", error=type(exc).__name__, rule=c.rule,
                        subject=c.subject)
            return False
        if answer.status_code >= 500 or answer.status_code in (408, 429):
            log.warning("alert webhook failed; will retry", status=answer.status_code, rule=c.rule, subject=c.subject)
            return False
        if answer.status_code >= 300:
            log.error("alert webhook refused the notification; not retried (fix the receiver)",
                      status=answer.status_code, rule=c.rule, subject=c.subject)
        return True

    async def idle(self) -> None:
        """Wait until every queued notification was accepted (tests, graceful stop)."""
        while any(not w.done() for w in self._workers.values()):
            await asyncio.gather(*self._workers.values(), return_exceptions=True)

    async def aclose(self) -> None:
        """Stop retrying and close the HTTP client; safe twice."""
        for worker in self._workers.values():
            await cancel_and_wait(worker)
        self._workers.clear()
        if self.client is not None:
            await self.client.aclose()
            self.client = None


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
        await wait_until_set(stop, interval_s)


async def run_alerts_stage(settings: Settings, observe: Observe, stop: asyncio.Event) -> None:
    """The alerts stage of `relais run` / `relais alerts`: `run_alerts` with the rules, thresholds and webhook of
    `settings`, every RELAIS_ALERT_INTERVAL_S, until `stop` is set."""
    notifier = WebhookNotifier.from_settings(settings)
    try:
        await run_alerts(AlertEvaluator(Thresholds.from_settings(settings)), observe, notifier,
                         settings.alert_interval_s, stop)
    finally:
        await notifier.aclose()
