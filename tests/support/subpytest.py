"""A throwaway pytest run in a subprocess, loaded with our tests/conftest.py: how the suite's own gates (the CI
Kafka gate, the outcome count) are proved on the exit status and summary pytest itself gives."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MARKERS = "[pytest]\nmarkers =\n    kafka: needs a broker\n"


def run_pytest(tmp_path: Path, files: Mapping[str, str], *, env: Mapping[str, str] | None = None,
               args: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """pytest on `files` (name -> text), written to `tmp_path`; CI and RELAIS_REQUIRE_KAFKA only as `env` sets them."""
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "pytest.ini").write_text(MARKERS)
    clean = {k: v for k, v in os.environ.items() if k not in ("CI", "RELAIS_REQUIRE_KAFKA", "PYTEST_ADDOPTS")}
    argv = [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-q", "-p", "no:cacheprovider",
            "--rootdir", str(tmp_path), "-c", str(tmp_path / "pytest.ini"), *args, str(tmp_path)]
    return subprocess.run(argv, cwd=tmp_path, env={**clean, "PYTHONPATH": str(REPO), **(env or {})},
                          capture_output=True, text=True, timeout=120)
