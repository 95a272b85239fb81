"""Slowness is a health signal (issue 15): p99 over budget shows degraded, fires target_slow, may open the breaker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path

from services.core.settings import Settings
from services.core.targets import TargetDirectory, over_latency_budget
from services.delivery.logic import Breaker, BreakerEvent, Circuit, breaker_after, too_slow
from services.launcher import make_bus
from services.ops.alerts import Observation, TargetObservation, Thresholds, conditions
from services.ops.context import OpsContext
from services.tracker.ledger import Ledger, LedgerEvent

_ids = count(1)


def delivered(target: str, ms: float, ago_s: float) -> LedgerEvent:
    n = next(_ids)
    return LedgerEvent(id=f"e{n}", transfer_id=f"t{n}", kind="delivered", stage="delivery",
                       time=datetime.now(UTC) - timedelta(seconds=ago_s), producer="dui-a", target=target,
                       attempt=1, detail={"http_status": 201, "duration_ms": ms})



async def test_a_target_over_its_budget_is_degraded_with_its_p50_and_p99(ledger: Ledger, tmp_path: Path) -> None:
    for n in range(6):
        for target, ms in (("slow", 3000.0), ("patient", 3000.0), ("fast", 50.0)):
            await ledger.apply(delivered(target, ms + n, ago_s=60 - n))
    settings = Settings(target_latency_budget_s=1.0, embedded_log_path=tmp_path / "log.db")
    directory = TargetDirectory.model_validate({"targets": [
        {"id": "slow", "base_url": "http://127.0.0.1:1/fhir"},
        {"id": "patient", "base_url": "http://127.0.0.1:2/fhir", "latency_budget_s": 10},  # its own budget
        {"id": "fast", "base_url": "http://127.0.0.1:3/fhir"}]})
    context = OpsContext(settings, ledger, make_bus(settings), directory)
    view = {t["target"]: t for t in await context.targets_view()}
    assert view["slow"]["health"] == "degraded" and view["slow"]["slow"] is True
    assert view["slow"]["p50_ms"] >= 3000 and view["slow"]["p99_ms"] >= 3000
    assert view["slow"]["latency_budget_ms"] == 1000
    assert view["patient"]["health"] == "ok" and view["patient"]["latency_budget_ms"] == 10000
    assert view["fast"]["health"] == "ok" and view["fast"]["slow"] is False


def test_target_slow_fires_while_p99_is_over_budget() -> None:
    limits = Thresholds()
    slow = TargetObservation(p50_ms=2900, p99_ms=3100, budget_ms=1000, slow=True)
    fired = [c for c in conditions(Observation(0, 0, {}, {"essms-a": slow}), limits) if c.active]
    assert [c.rule for c in fired] == ["target_slow"]
    assert "p50 2900 ms, p99 3100 ms (budget 1000 ms)" in fired[0].message
    ok = TargetObservation(p50_ms=20, p99_ms=40, budget_ms=1000)
    assert not [c for c in conditions(Observation(0, 0, {}, {"essms-a": ok}), limits) if c.active]


def test_over_budget_needs_a_few_calls() -> None:
    assert not over_latency_budget(5.0, 4, 1.0)
    assert over_latency_budget(5.0, 5, 1.0)
    assert not over_latency_budget(None, 50, 1.0) and not over_latency_budget(0.9, 50, 1.0)


def test_a_slow_call_rate_at_its_threshold_opens_the_breaker() -> None:
    assert not too_slow(None, 0.5) and not too_slow(0.4, 0.5) and too_slow(0.5, 0.5)
    opened = breaker_after(Breaker(), BreakerEvent.SLOW, 100.0, threshold=5, probe_every_s=30)
    assert opened.circuit is Circuit.OPEN and opened.next_probe_at == 130.0
    assert breaker_after(opened, BreakerEvent.SLOW, 120.0, threshold=5, probe_every_s=30) == opened
