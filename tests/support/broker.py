"""`relais run --demo-target` as a real process on the embedded bus, with operators, for operator-facing tests."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.support.processes import REPO, free_port
from tests.support.producers import TOKEN_A, write_producers, write_targets

OPERATOR_TOKEN, VIEWER_TOKEN = "e2e-operator-token", "e2e-viewer-token"
SITEFAULTS = Path(__file__).parent / "sitefaults"


@dataclass
class Broker:
    """A running broker, its demo target, and where its files are."""

    base: str
    target: str
    proc: subprocess.Popen[bytes]
    log: Path
    tmp: Path
    fault_file: Path
    worker_metrics: tuple[str, ...] = ()  # each worker process's /metrics (RELAIS_METRICS_PORT + n - 1)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait(self, condition: Callable[[], Any], timeout_s: float = 60, what: str = "condition") -> Any:
        """Poll until `condition()` is truthy; fail with the broker's log when it dies or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"broker exited\n{self.tail()}"
            try:
                value = condition()
                if value:
                    return value
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}\n{self.tail()}")

    def ops(self, method: str, path: str, token: str = OPERATOR_TOKEN, **kwargs: Any) -> httpx.Response:
        return httpx.request(method, f"{self.base}{path}", headers={"Authorization": f"Bearer {token}"},
                             timeout=30, **kwargs)

    def send(self, marker: str | None = None, *, invalid: bool = False) -> tuple[str, str]:
        """Post the example Bundle to target `demo`; returns (transfer id, the marker its JSON carries).

        `invalid`: without the Patient's identifiers (INS), so the validator rejects it.
        """
        marker = marker or f"mark-{uuid.uuid4().hex}"
        bundle = orjson.loads((REPO / "examples/bundle-ssiad.json").read_bytes())
        if invalid:
            for entry in bundle["entry"]:
                if entry["resource"]["resourceType"] == "Patient":
                    entry["resource"].pop("identifier", None)
        bundle["identifier"] = {"system": "urn:ietf:rfc:3986", "value": f"urn:relais-test:{marker}"}
        bundle.setdefault("meta", {})["tag"] = [{"system": "urn:relais:test", "code": marker}]
        answer = httpx.post(f"{self.base}/fhir", content=orjson.dumps(bundle), timeout=30,
                            headers={"Authorization": f"Bearer {TOKEN_A}", "Content-Type": "application/fhir+json",
                                     "X-Relais-Target": "demo"})
        assert answer.status_code == 202, answer.text
        return answer.headers["X-Relais-Transfer-Id"], marker

    def received(self, marker: str, *, applied_only: bool = True) -> int:
        """How many transaction POSTs carrying `marker` the demo target got (applied ones by default)."""
        got = httpx.get(f"{self.target}/_received", timeout=10).json()
        return sum(1 for r in got if marker in orjson.dumps(r.get("body")).decode()
                   and (r.get("applied") or not applied_only))

    def fault(self, body: dict[str, Any] | None) -> None:
        """Queue a fault at the demo target (None: clear them)."""
        if body is None:
            httpx.delete(f"{self.target}/_faults", timeout=10).raise_for_status()
        else:
            httpx.post(f"{self.target}/_faults", json=body, timeout=10).raise_for_status()


@contextlib.contextmanager
def running_broker(tmp: Path, extra_env: dict[str, str] | None = None) -> Iterator[Broker]:
    """Start `relais run --demo-target` in `tmp` (its own log, ledger, blobs), stop it with SIGTERM after."""
    http_port, target_port, metrics_port = free_port(), free_port(), free_port()
    ops = tmp / "operators.yaml"
    olga, victor = (hashlib.sha256(t.encode()).hexdigest() for t in (OPERATOR_TOKEN, VIEWER_TOKEN))
    ops.write_text(f"operators:\n  - {{id: olga, role: operator, token_sha256: {olga}}}\n"
                   f"  - {{id: victor, role: viewer, token_sha256: {victor}}}\n")
    fault_file = tmp / "validator-fault"
    env = {**os.environ, "RELAIS_HTTP_PORT": str(http_port), "RELAIS_EMBEDDED_LOG_PATH": str(tmp / "log.db"),
           "RELAIS_DATABASE_URL": f"sqlite+aiosqlite:///{tmp}/ledger.db", "RELAIS_BLOB_DIR": str(tmp / "blobs"),
           "RELAIS_PRODUCERS_FILE": str(write_producers(tmp / "producers.yaml")), "RELAIS_OPERATORS_FILE": str(ops),
           "RELAIS_TARGETS_FILE": str(write_targets(tmp / "t.yaml", {"demo": f"http://127.0.0.1:{target_port}/fhir"})),
           "RELAIS_RETRY_DELAYS_S": "[0.2, 0.4]", "RELAIS_MAX_ATTEMPTS": "2", "RELAIS_LOG_FORMAT": "json",
           "RELAIS_TOPIC_PARTITIONS": "2", "RELAIS_ALERT_INTERVAL_S": "1", "RELAIS_WORKERS": "1",
           "RELAIS_METRICS_PORT": str(metrics_port),
           "RELAIS_TEST_VALIDATOR_FAULT_FILE": str(fault_file),
           "PYTHONPATH": os.pathsep.join(p for p in (str(SITEFAULTS), str(REPO), os.environ.get("PYTHONPATH")) if p),
           **(extra_env or {})}
    for name in ("RELAIS_KAFKA_BOOTSTRAP", "RELAIS_OPS_TOKEN", "RELAIS_URL"):
        env.pop(name, None)
    log = tmp / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "run", "--demo-target", "--demo-target-port",
                                 str(target_port)], env=env, cwd=tmp, stdout=out, stderr=subprocess.STDOUT)
    broker = Broker(f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{target_port}", proc, log, tmp, fault_file,
                    (f"http://127.0.0.1:{metrics_port}/metrics",))
    try:
        broker.wait(lambda: httpx.get(f"{broker.base}/readyz", timeout=2).status_code == 200, 90, "readyz")
        broker.wait(lambda: httpx.get(f"{broker.target}/fhir/metadata", timeout=2).status_code == 200, 30, "target")
        yield broker
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
