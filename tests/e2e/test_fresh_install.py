"""The README's run command on a fresh copy: a new virtualenv, the embedded default, a Bundle sent with
`relais send` reaching the demo target. This is what a DUI vendor does first."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.support.processes import REPO, free_port, readyz, wait_until
from tests.support.producers import write_targets

pytestmark = pytest.mark.e2e
COPY_IGNORE = shutil.ignore_patterns(".venv", ".cache", "node_modules", "__pycache__", "*.db", "*.db-*", ".git",
                                     "test-artifacts", ".hypothesis", ".mypy_cache", ".ruff_cache", "*.egg-info")


def test_make_run_in_a_fresh_copy_delivers_a_bundle_sent_with_relais_send(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    copy = tmp_path / "relais"
    shutil.copytree(REPO, copy, ignore=COPY_IGNORE)
    http_port, demo_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAIS_", "VIRTUAL_ENV"))}
    env |= {"RELAIS_HTTP_PORT": str(http_port),
            "RELAIS_TARGETS_FILE": str(write_targets(tmp_path / "t.yaml", {"demo": f"http://127.0.0.1:{demo_port}/fhir"}))}
    log = (tmp_path / "make-run.log").open("wb")
    # The README's command, verbatim, plus the ports this test can use.
    proc = subprocess.Popen(["make", "run", f"DEMO_PORT={demo_port}"], cwd=copy, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # The first run installs every dependency into .venv.
        wait_until(readyz(f"http://127.0.0.1:{http_port}"), alive=lambda: proc.poll() is None,
                   explain=lambda: (tmp_path / "make-run.log").read_text()[-3000:], timeout_s=600,
                   interval_s=0.5, what="make run to be ready")

        sent = subprocess.run([str(copy / ".venv/bin/relais"), "send", "examples/bundle-ssiad.json", "--to", "demo",
                               "--url", f"http://127.0.0.1:{http_port}", "--token", "demo-token",
                               "--journal", str(tmp_path / "journal")],
                              cwd=copy, env=env, capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert "accepted: 1" in sent.stdout

        deadline = time.monotonic() + 60
        received: list[object] = []
        while time.monotonic() < deadline and not received:
            received = httpx.get(f"http://127.0.0.1:{demo_port}/_received", timeout=5).json()
            time.sleep(0.3)
        assert len(received) == 1 and received[0]["status"] == 200  # type: ignore[index]
        assert (copy / "relais-log.db").exists()  # the embedded bus: no Kafka anywhere
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # make and relais: the process group this test started
        proc.wait(60)
        log.close()
