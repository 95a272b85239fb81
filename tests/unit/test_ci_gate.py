"""The CI gate of tests/conftest.py: where Kafka is required, a Kafka test that skips fails the run.

Each case runs a throwaway pytest (with and without the xdist workers `make test` uses) on a two-line test
file, so the gate is proved on the outcome pytest itself reports, not on our own bookkeeping.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.subpytest import run_pytest

SKIPPING = """
import pytest

@pytest.mark.kafka
def test_needs_a_broker():
    pytest.skip("no broker here")
"""

PASSING = """
import pytest

@pytest.mark.kafka
def test_talks_to_a_broker():
    assert True
"""


def _run(tmp_path: Path, source: str, *, required: bool, workers: int) -> subprocess.CompletedProcess[str]:
    return run_pytest(tmp_path, {"test_gate_case.py": source}, env={"RELAIS_REQUIRE_KAFKA": "1"} if required else {},
                      args=["-n", str(workers)] if workers else [])


@pytest.mark.parametrize("workers", [0, 2], ids=["one-process", "xdist"])
def test_a_skipped_kafka_test_fails_where_kafka_is_required(tmp_path: Path, workers: int) -> None:
    run = _run(tmp_path, SKIPPING, required=True, workers=workers)
    assert run.returncode == pytest.ExitCode.TESTS_FAILED, run.stdout + run.stderr
    assert "Kafka test skipped where Kafka is required" in run.stdout


def test_a_skipped_kafka_test_only_skips_locally(tmp_path: Path) -> None:
    run = _run(tmp_path, SKIPPING, required=False, workers=0)
    assert run.returncode == pytest.ExitCode.OK, run.stdout + run.stderr
    assert "1 skipped" in run.stdout


@pytest.mark.parametrize("workers", [0, 2], ids=["one-process", "xdist"])
def test_a_passing_kafka_test_passes_where_kafka_is_required(tmp_path: Path, workers: int) -> None:
    run = _run(tmp_path, PASSING, required=True, workers=workers)
    assert run.returncode == pytest.ExitCode.OK, run.stdout + run.stderr
