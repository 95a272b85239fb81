"""The alerts loop as a stage of `relais run` / `relais alerts`: evaluate the rules until stopped."""

from __future__ import annotations

import asyncio

from services.ops.alerts import AlertEvaluator, Thresholds, WebhookNotifier, run_alerts
from services.ops.context import OpsContext


async def run_alerts_stage(context: OpsContext, stop: asyncio.Event) -> None:
    """Observe through `context` every RELAIS_ALERT_INTERVAL_S and notify (log, webhook) until `stop` is set."""
    settings = context.settings
    notifier = WebhookNotifier.from_settings(settings)
    try:
        await run_alerts(AlertEvaluator(Thresholds.from_settings(settings)), context.observe, notifier,
                         settings.alert_interval_s, stop)
    finally:
        await notifier.aclose()
