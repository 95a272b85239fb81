"""`relais targets ...` and `relais ledger purge` against a real SQLite ledger."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from services.cli import main
from tests.support.producers import write_targets


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RELAIS_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path}/l.db")
    monkeypatch.setenv("RELAIS_TARGETS_FILE", str(write_targets(tmp_path / "t.yaml", {"a": "http://x.invalid/fhir"})))
    monkeypatch.setenv("RELAIS_EMBEDDED_LOG_PATH", str(tmp_path / "log.db"))
    return tmp_path


def test_targets_pause_list_resume(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["targets", "pause", "a", "--reason", "maintenance"]) == 0
    assert orjson.loads(capsys.readouterr().out)["paused"] is True
    assert main(["targets", "list"]) == 0
    listed = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(t["target"], t["paused"], t["circuit"]) for t in listed] == [("a", True, "closed")]
    assert main(["targets", "resume", "a"]) == 0
    assert orjson.loads(capsys.readouterr().out)["paused"] is False
    assert main(["targets", "pause", "nope"]) == 2


def test_ledger_purge(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ledger", "purge", "--days", "30"]) == 0
    assert "purged 0 transfer(s)" in capsys.readouterr().out
