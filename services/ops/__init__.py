"""Operators: the `/ops` API, the dashboard (`/ops/ui`), alerts and the lag reader."""

from __future__ import annotations

from typing import Any


def install(app: Any, state: Any) -> None:
    """Mount the operator API, dashboard and static files on the ingress app (`state`: its IngressState)."""
    from pathlib import Path

    from fastapi.staticfiles import StaticFiles

    from services.ops import api, dashboard
    from services.ops.auth import load_operators
    from services.ops.context import OpsContext
    from services.tracker import audit

    audit.bind(state.ledger, state.settings)  # the audit trail's MAC key (never in the database)
    app.state.operators = load_operators(state.settings)
    app.state.ops = OpsContext(state.settings, state.ledger, state.bus, state.targets)
    app.include_router(api.router, prefix="/ops")
    app.include_router(dashboard.router, prefix="/ops/ui")
    app.mount("/ops/static", StaticFiles(directory=Path(__file__).parent / "static"), name="ops-static")


async def run_alerts_stage(settings: Any, bus: Any, stop: Any) -> None:
    """The alerts loop as a stage of `relais run` / `relais alerts`: evaluate until `stop` is set."""
    from services.ops.alerts import AlertEvaluator, Thresholds, WebhookNotifier, run_alerts
    from services.ops.context import OpsContext
    from services.tracker.ledger import Ledger

    ledger = Ledger(settings.database_url)
    await ledger.create_schema()
    notifier = WebhookNotifier.from_settings(settings)
    try:
        context = OpsContext.build(settings, ledger, bus)
        await run_alerts(AlertEvaluator(Thresholds.from_settings(settings)), context.observe, notifier,
                         settings.alert_interval_s, stop)
    finally:
        await notifier.aclose()
        await ledger.close()
