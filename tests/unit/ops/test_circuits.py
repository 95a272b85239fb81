"""Circuit state reaches operators: delivery processes report transitions, the ops view shows the worst."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.core.blobstore import LocalBlobStore
from services.core.settings import Settings
from services.core.targets import Target, TargetDirectory
from services.delivery.journal import AttemptJournal
from services.delivery.logic import BreakerEvent
from services.delivery.stage import DeliveryStage
from services.tracker.ledger import Ledger
from services.tracker.opstate import circuits, record_circuit, worst_circuit

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


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
                          LocalBlobStore(tmp_path / "blobs"), AttemptJournal(ledger.engine))
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
