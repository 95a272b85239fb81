"""The broker as separate OS processes, as production runs it: start, SIGKILL, restart, by PID."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from devtools.devkafka.local import free_port

REPO = Path(__file__).resolve().parents[2]
WORKERS = ("validator", "router", "delivery", "tracker")


def wait_until(condition: Callable[[], object], *, alive: Callable[[], bool], explain: Callable[[], str],
               timeout_s: float = 60, interval_s: float = 0.2, what: str = "condition") -> None:
    """Poll `condition` until it holds; fail at once, with `explain()`, if the process under test died.

    A condition that raises httpx.HTTPError (the server is not listening yet) counts as not holding.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise AssertionError(f"process exited before {what}\n{explain()}")
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}\n{explain()}")


def readyz(base_url: str) -> Callable[[], bool]:
    """The condition "GET {base_url}/readyz answers 200"."""
    return lambda: httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(self.argv, env=self.env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.kill(self.popen.pid, sig)
            self.popen.wait(30)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class DemoTarget:
    """devtools.demotarget as a real HTTP server process."""

    log: Path
    proc: subprocess.Popen[bytes] | None = None
    base_url: str = ""

    def start(self) -> DemoTarget:
        self.proc = subprocess.Popen([sys.executable, "-m", "devtools.demotarget", "--port", "0"], cwd=REPO,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline().decode()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/fhir", line)
        assert match, f"demo target did not start: {line!r}"
        self.base_url = f"http://127.0.0.1:{match.group(1)}"
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    @property
    def fhir(self) -> str:
        return f"{self.base_url}/fhir"

    def received(self) -> list[dict[str, object]]:
        return httpx.get(f"{self.base_url}/_received", timeout=30).json()  # type: ignore[no-any-return]

    def summary(self) -> dict[str, object]:
        return httpx.get(f"{self.base_url}/_received", params={"summary": 1}, timeout=30).json()  # type: ignore[no-any-return]

    def fault(self, **spec: object) -> None:
        httpx.post(f"{self.base_url}/_faults", json=spec, timeout=10).raise_for_status()


@dataclass
class Broker:
    """Ingress + each worker as its own `relais <stage>` process, sharing one Kafka and one ledger."""

    workdir: Path
    env: Mapping[str, str]
    procs: dict[str, Proc] = field(default_factory=dict)
    http_port: int = 0

    def start(self) -> Broker:
        self.http_port = free_port()
        for name in ("ingress", *WORKERS):
            env = {**os.environ, **self.env, "RELAIS_HTTP_PORT": str(self.http_port),
                   "RELAIS_INSTANCE_ID": f"e2e-{name}", "RELAIS_LOG_FORMAT": "json"}
            self.procs[name] = Proc(name, [sys.executable, "-m", "services.cli", name], env,
                                    self.workdir / f"{name}.log")
            self.procs[name].start()
        self.wait_ready()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def wait_ready(self, timeout_s: float = 60) -> None:
        wait_until(readyz(self.url), alive=lambda: all(p.alive() for p in self.procs.values()),
                   explain=lambda: f"exited: {[p.name for p in self.procs.values() if not p.alive()]}\n"
                   + self.tails(), timeout_s=timeout_s, what="ingress to be ready")

    def kill(self, name: str) -> None:
        """SIGKILL a stage: no shutdown code runs, as in a crash."""
        self.procs[name].kill(signal.SIGKILL)

    def restart(self, name: str) -> None:
        self.procs[name].kill(signal.SIGKILL)
        self.procs[name].start()

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.kill(signal.SIGTERM)

    def tails(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.tail()}" for p in self.procs.values())
