"""Operator commands without a broker: `ledger purge` (direct database access), one-line errors, the status view."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli import main
from services.ops.cli import render_status, status_exit_code
from tests.support.processes import free_port


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RELAIS_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path}/l.db")
    monkeypatch.setenv("RELAIS_EMBEDDED_LOG_PATH", str(tmp_path / "log.db"))
    monkeypatch.setenv("RELAIS_URL", f"http://127.0.0.1:{free_port()}")  # nobody listens there
    monkeypatch.setenv("RELAIS_OPS_TOKEN", "some-token")
    return tmp_path


def test_ledger_purge(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ledger", "purge", "--days", "30"]) == 0
    assert "purged 0 transfer(s)" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["dlq", "list"], ["dlq", "replay", "t/a"], ["targets", "pause", "a"],
                                  ["targets", "list"], ["status", "t1"], ["ledger", "transfers"]])
def test_broker_down_is_one_line_and_exit_3(env: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot reach the Relais broker" in err and "Traceback" not in err


def test_unreadable_token_file_and_bad_id_are_usage_errors(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dlq", "list", "--token-file", str(env / "missing")]) == 2
    assert "cannot read the token file" in capsys.readouterr().err
    assert main(["dlq", "show", "no-slash"]) == 2
    assert "TRANSFER_ID/TARGET" in capsys.readouterr().err


def test_status_view_and_exit_codes() -> None:
    outcome = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "required", "diagnostics": "missing INS",
         "expression": ["Bundle.entry[1].resource.identifier"],
         "extension": [{"url": "https://relais.esms.fr/fhir/StructureDefinition/issue-rule",
                        "valueString": "tddui-patient-ins"}]}]}
    tl = {"id": "t1", "status": "dead-lettered", "producer": "dui-a", "created_at": "2026-01-01T00:00:00+00:00",
          "duration_ms": 1200.0, "steps": [
              {"kind": "validated", "stage": "validator", "target": None, "detail": {"outcome": {
                  "resourceType": "OperationOutcome", "issue": [{"severity": "warning", "code": "value",
                                                                 "diagnostics": "url repaired",
                                                                 "expression": ["Bundle.entry[0].request.url"]}]}}},
              {"kind": "dead_lettered", "stage": "delivery", "target": "a", "detail": {"reason": "HTTP 422"}}],
          "deliveries": [{"target": "a", "status": "dead-lettered", "attempts": 1, "last_http_status": 422,
                          "outcome": outcome, "assigned": None},
                         {"target": "b", "status": "delivered", "attempts": 2, "last_http_status": 200,
                          "outcome": None, "assigned": {"urn:uuid:1": "Patient/9/_history/1"}}]}
    text = render_status(tl)
    assert "transfer t1: dead-lettered" in text
    assert "warning  Bundle.entry[0].request.url  url repaired" in text
    assert "target a: dead-lettered, 1 attempt(s), last HTTP 422" in text and "last reason: HTTP 422" in text
    assert "Bundle.entry[1].resource.identifier  missing INS  [tddui-patient-ins]" in text
    assert "id assigned: urn:uuid:1 -> Patient/9/_history/1" in text
    assert [status_exit_code(s) for s in ("delivered", "delivering", "accepted", "rejected", "dead-lettered")] == \
        [0, 10, 10, 11, 12]
