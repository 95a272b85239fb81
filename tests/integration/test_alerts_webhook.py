"""Alert notifications over real HTTP: retried until the receiver takes them, in order, concurrently, bounded."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.core.embedded import EmbeddedBus
from services.core.targets import load_targets
from services.ops.alerts import AlertEvaluator, Condition, Notification, Thresholds, WebhookNotifier, run_alerts
from services.ops.context import OpsContext
from services.tracker.ledger import Ledger, LedgerEvent
from tests.support.producers import write_targets
from tests.support.webhook import Receiver, listening

NOW = datetime(2025, 4, 1, tzinfo=UTC)


def note(state: str, rule: str = "target_down", subject: str = "essms-a") -> Notification:
    return Notification(state, Condition(rule, subject, state == "firing", 1, 0, "m"), NOW)  # type: ignore[arg-type]


async def wait_until(condition: object, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_a_webhook_down_when_the_alert_fires_gets_it_once_back() -> None:
    receiver = Receiver()
    notifier = WebhookNotifier(receiver.url, timeout_s=2, backoff_first_s=0.1, backoff_max_s=0.3)
    try:
        await notifier(note("firing"))  # nobody listens on that port yet
        await notifier(note("resolved"))
        await asyncio.sleep(0.5)
        async with listening(receiver):
            await wait_until(lambda: len(receiver.accepted) == 2)
        assert receiver.seen("target_down") == ["firing", "resolved"]  # the resolved never overtook its firing
    finally:
        await notifier.aclose()


async def test_a_webhook_answering_500_is_retried_with_backoff() -> None:
    receiver = Receiver(status=500)
    notifier = WebhookNotifier(receiver.url, timeout_s=2, backoff_first_s=0.1, backoff_max_s=0.2)
    try:
        async with listening(receiver):
            await notifier(note("firing", "dlq_not_empty", "dlq"))
            await wait_until(lambda: receiver.refused >= 3)
            assert receiver.accepted == []
            receiver.status = 200
            await wait_until(lambda: receiver.seen("dlq_not_empty") == ["firing"])
            await notifier.idle()
            assert receiver.seen("dlq_not_empty") == ["firing"]
    finally:
        await notifier.aclose()


async def test_one_slow_alert_delays_no_other() -> None:
    receiver = Receiver(delay_s=1.5)
    notifier = WebhookNotifier(receiver.url, timeout_s=0.5, backoff_first_s=0.1, backoff_max_s=0.2)
    try:
        async with listening(receiver):
            started = time.monotonic()
            for n in range(5):
                await notifier(note("firing", "target_down", f"t{n}"))
            assert time.monotonic() - started < 0.2  # queued, not awaited
            await asyncio.sleep(1.0)
            assert receiver.accepted == []  # each POST timed out after 0.5 s and is retried, none blocks the rest
            receiver.delay_s = 0
            await wait_until(lambda: len(receiver.accepted) >= 5)
            assert {a["subject"] for a in receiver.accepted} == {f"t{n}" for n in range(5)}
            assert time.monotonic() - started < 5
    finally:
        await notifier.aclose()


async def test_three_quick_down_up_cycles_give_one_firing_and_one_resolved(tmp_path: Path,
                                                                          make_settings: Any) -> None:
    """The real alerts loop over a real ledger, a target flapping three times, a real webhook receiver."""
    receiver = Receiver()
    targets = write_targets(tmp_path / "t.yaml", {"flappy": "http://127.0.0.1:9/fhir"})
    settings = make_settings(targets_file=targets, kafka_bootstrap=None, embedded_log_path=tmp_path / "log.db",
                             alert_webhook_url=receiver.url, alert_keep_firing_s=2.0, alert_interval_s=0.1)
    ledger = Ledger(settings.database_url)
    await ledger.create_schema()
    bus = EmbeddedBus(settings)
    await bus.start()
    notifier = WebhookNotifier(receiver.url, timeout_s=2, backoff_first_s=0.1, backoff_max_s=0.2)
    stop = asyncio.Event()
    context = OpsContext(settings, ledger, bus, load_targets(settings.targets_file))
    loop = asyncio.create_task(run_alerts(AlertEvaluator(Thresholds.from_settings(settings)), context.observe,
                                          notifier, settings.alert_interval_s, stop))
    counter = iter(range(10_000))

    async def attempt(kind: str) -> None:
        detail = {"http_status": 503 if kind != "delivered" else 200, "duration_ms": 5.0, "reason": "HTTP 503"}
        await ledger.apply(LedgerEvent(id=f"f{next(counter)}", transfer_id=f"x{next(counter)}", kind=kind,
                                       stage="delivery", time=datetime.now(UTC), target="flappy", attempt=1,
                                       detail=detail))

    try:
        async with listening(receiver):
            for _ in range(3):
                for _ in range(3):  # down: three failed attempts in a row
                    await attempt("retry_scheduled")
                await asyncio.sleep(0.5)
                await attempt("delivered")  # up again
                await asyncio.sleep(0.5)
            await wait_until(lambda: receiver.seen("target_down", "flappy") == ["firing", "resolved"])
            await asyncio.sleep(2.5)  # nothing more comes
            assert receiver.seen("target_down", "flappy") == ["firing", "resolved"]
    finally:
        stop.set()
        await loop
        await notifier.aclose()
        await bus.stop()
        await ledger.close()
