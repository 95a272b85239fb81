"""`relais run --demo-target`: every stage in one process delivers a Bundle to the demo target."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest

from services.core.settings import Settings
from services.delivery.marker import mark_transfer
from tests.support.processes import REPO, free_port, readyz, wait_until
from tests.support.producers import write_targets

pytestmark = [pytest.mark.e2e, pytest.mark.kafka]


def test_relais_run_delivers_to_the_demo_target_and_stops_on_sigterm(kafka_bootstrap: str, tmp_path: Path) -> None:
    http_port, target_port = free_port(), free_port()
    env = {
        **os.environ,
        "RELAIS_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "RELAIS_TOPIC_PREFIX": f"run{uuid.uuid4().hex[:8]}.",
        "RELAIS_TOPIC_PARTITIONS": "2",
        "RELAIS_HTTP_PORT": str(http_port),
        "RELAIS_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/ledger.db",
        "RELAIS_PRODUCERS_FILE": str(REPO / "deploy/dev/producers.yaml"),
        "RELAIS_TARGETS_FILE": str(write_targets(tmp_path / "t.yaml", {"demo": f"http://127.0.0.1:{target_port}/fhir"})),
    }
    log = (tmp_path / "run.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "run", "--demo-target",
                             "--demo-target-port", str(target_port)], env=env, cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http_port}"
    auth = {"Authorization": "Bearer demo-token"}
    try:
        _wait(readyz(base), proc, tmp_path)
        bundle = orjson.loads((REPO / "examples/bundle-ssiad.json").read_bytes())
        response = httpx.post(f"{base}/fhir", content=orjson.dumps(bundle), timeout=30,
                              headers={**auth, "Content-Type": "application/fhir+json", "X-Relais-Target": "demo"})
        assert response.status_code == 202, response.text
        status_url = response.headers["Content-Location"]
        _wait(lambda: httpx.get(status_url, headers=auth, timeout=5).status_code == 200, proc, tmp_path)
        result = httpx.get(status_url, headers=auth, timeout=5).json()
        assert result["entry"][0]["resource"]["type"] == "transaction-response"
        received = httpx.get(f"http://127.0.0.1:{target_port}/_received", timeout=5).json()
        marked = mark_transfer(bundle, Settings().transfer_tag_system, response.headers["X-Relais-Transfer-Id"])
        assert [r["body"] for r in received] == [marked]  # the Bundle sent, each resource marked with its transfer
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        log.close()
    assert code == 0, (tmp_path / "run.log").read_text()[-3000:]


def _wait(condition: Callable[[], object], proc: subprocess.Popen[bytes], tmp_path: Path) -> None:
    wait_until(condition, alive=lambda: proc.poll() is None, timeout_s=90,
               explain=lambda: (tmp_path / "run.log").read_text()[-3000:])
