"""A target's health as operators see it. Circuit state: delivery processes report transitions, the ops view shows
the worst. Slowness (issue 15): p99 over budget shows degraded, fires target_slow, may open the breaker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path

import pytest

from services.core.blobstore import LocalBlobStore
from services.core.buses import make_bus
from services.core.settings import Settings
from services.core.targets import Target, TargetDirectory, over_latency_budget
from services.delivery.journal import AttemptJournal
from services.delivery.logic import Breaker, BreakerEvent, Circuit, breaker_after, too_slow
from services.delivery.stage import DeliveryStage
from services.ops.alerts import Observation, TargetObservation, Thresholds, conditions
from services.ops.context import OpsContext
from services.tracker.ledger import Ledger, LedgerEvent
from services.tracker.opstate import circuits, record_circuit, worst_circuit

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
_ids = count(1)


@pytest.mark.parametrize(("reports", "expected"), [
    ([], None),
    ([("closed", NOW)], "closed"),
    ([("closed", NOW), ("open", NOW)], "open"),             # two processes disagree: show the worst
    ([("open", NOW - timedelta(hours=2)), ("closed", NOW)], "closed"),  # a stale report is ignored
    ([("open", NOW - timedelta(hours=2))], None),
    ([("weird", NOW)], None),
])
def test_worst_circuit(reports: list[tuple[str, datetime]], expected: str | None) -> None:
    assert worst_circuit(reports, NOW) == expected


async def test_reports_are_kept_per_process_and_read_back(ledger: Ledger) -> None:
    await record_circuit(ledger, "essms-a", "open", 5, process="delivery-1")
    await record_circuit(ledger, "essms-a", "closed", 0, process="delivery-2")
    await record_circuit(ledger, "essms-b", "open", 5, process="delivery-1")
    await record_circuit(ledger, "essms-b", "closed", 0, process="delivery-1")  # same process: replaced
    assert await circuits(ledger) == {"essms-a": "open", "essms-b": "closed"}


async def test_delivery_reports_breaker_transitions(ledger: Ledger, tmp_path: Path) -> None:
    target = Target(id="t", base_url="http://127.0.0.1:9/fhir")
    stage = DeliveryStage(Settings(auth_disabled=True), TargetDirectory(targets=[target]),
                          LocalBlobStore(tmp_path / "blobs"), AttemptJournal(ledger))
    reported: list[tuple[str, str, int]] = []

    async def report(target_id: str, circuit: str, failures: int) -> None:
        reported.append((target_id, circuit, failures))
        await record_circuit(ledger, target_id, circuit, failures, process="p")

    stage.report_circuit = report
    runtime = stage.runtimes["t"]
    try:
        for _ in range(target.breaker.failures):
            stage._learn(runtime, BreakerEvent.FAILURE)
        for task in list(stage._reports):
            await task
    finally:
        await stage.aclose()
    assert reported == [("t", "open", target.breaker.failures)]
    assert await circuits(ledger) == {"t": "open"}


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
