"""A real FHIR server for end-to-end tests: Medplum's FHIR router over its in-memory repository.

`tests/medplum/server.mjs` run by Node 20 on a free loopback port, its packages installed from
`tests/medplum/package-lock.json` with `npm ci` when `node_modules` is missing (`.ci/run` does it
up front). Locally the tests skip when Node or npm is absent, or the install fails; in CI (CI=true)
they fail instead. The server is stopped by its PID.

    from tests.support.medplum import medplum_server  # the fixture, in the test module
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.support.processes import REPO

REQUIRED = os.environ.get("CI", "").lower() in ("1", "true", "yes")
MEDPLUM_DIR = REPO / "tests" / "medplum"
_READY = re.compile(rb"medplum listening on (http://127\.0\.0\.1:(\d+)/fhir)")


def _unavailable(why: str) -> None:
    message = f"no Medplum FHIR server for the tests: {why} (needs Node 20 and npm; .ci/run installs them)"
    if REQUIRED:
        pytest.fail(message + "; the Medplum tests are required in CI")
    pytest.skip(message)


def ensure_installed() -> str:
    """The `node` executable, with tests/medplum's packages installed; skips (fails in CI) otherwise."""
    node = shutil.which("node")
    if node is None:
        _unavailable("no `node` on PATH")
    assert node is not None
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    major = re.match(r"v(\d+)\.", version)
    if major is None or int(major[1]) < 20:
        _unavailable(f"`node` is {version or 'unknown'}; @medplum 4.5.2 needs Node 20.19+")
    if not (MEDPLUM_DIR / "node_modules" / "@medplum" / "fhir-router" / "package.json").is_file():
        npm = shutil.which("npm")
        if npm is None:
            _unavailable("no `npm` on PATH to install tests/medplum's packages")
        assert npm is not None
        try:
            subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=MEDPLUM_DIR, check=True,
                           capture_output=True, timeout=600)
        except subprocess.CalledProcessError as exc:
            _unavailable(f"`npm ci` in tests/medplum failed: {(exc.stderr or b'').decode(errors='replace')[-1500:]}")
        except subprocess.TimeoutExpired:
            _unavailable("`npm ci` in tests/medplum took more than 10 minutes")
    return node


@dataclass
class MedplumServer:
    """A running server: `base_url` is its FHIR base (…/fhir)."""

    proc: subprocess.Popen[bytes]
    base_url: str
    port: int
    output: list[bytes] = field(default_factory=list)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        """GET `path` relative to the FHIR base (`Patient/123`, `metadata`, `Encounter?subject=…`)."""
        return httpx.get(f"{self.base_url}/{path.lstrip('/')}", headers={"Accept": "application/fhir+json"},
                         timeout=30, **kwargs)

    def read(self, reference: str) -> dict[str, Any] | None:
        """The resource a `Type/id` reference names, or None when the server does not have it."""
        answer = self.get(reference)
        return answer.json() if answer.status_code == 200 else None

    def log_tail(self) -> str:
        return b"".join(self.output).decode(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def start_medplum(timeout_s: float = 60.0) -> MedplumServer:
    """Start `node tests/medplum/server.mjs 0` and wait for its `listening` line."""
    node = ensure_installed()
    proc = subprocess.Popen([node, str(MEDPLUM_DIR / "server.mjs"), "0"], cwd=MEDPLUM_DIR,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    output: list[bytes] = []
    found: list[re.Match[bytes]] = []
    ready = threading.Event()

    def pump() -> None:  # keep draining its output so the server never blocks on a full pipe
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, b""):
            output.append(line)
            match = _READY.search(line)
            if match and not ready.is_set():
                found.append(match)
                ready.set()
        ready.set()  # EOF: it died

    threading.Thread(target=pump, name="medplum-output", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not ready.wait(0.1):
        if time.monotonic() > deadline:
            break
    if not found:
        server = MedplumServer(proc, "", 0, output)
        server.stop()
        tail = b"".join(output).decode(errors="replace")[-2000:]
        # The packages are installed; a server that cannot start is a bug here, never a skip.
        raise AssertionError(f"tests/medplum/server.mjs never became ready (exit {proc.poll()}):\n{tail}")
    return MedplumServer(proc, found[0][1].decode(), int(found[0][2]), output)


@pytest.fixture
def medplum_server() -> Iterator[MedplumServer]:
    """A fresh, empty Medplum FHIR server for one test; stopped (by PID) afterwards."""
    server = start_medplum()
    try:
        yield server
    finally:
        server.stop()
