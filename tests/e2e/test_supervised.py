"""`relais run` as a supervised set of processes on the embedded bus: children killed, stages doubled, SIGTERM.

Outcomes are counted at the target by content (each Bundle's identifier), never through Relais's ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from services.core.embedded import EmbeddedBus
from services.core.envelope import Emit, Envelope
from services.core.settings import Settings
from services.core.topics import RECEIVED, REJECTED, VALIDATED
from tests.fixtures.tddui import make_bundle
from tests.support.embedded import EmbeddedRelais
from tests.support.processes import REPO, free_port, readyz, wait_until

pytestmark = pytest.mark.e2e
HEADERS = {"Authorization": "Bearer demo-token", "Content-Type": "application/fhir+json", "X-Relais-Target": "demo"}


def identifier(bundle: Any) -> str:
    return str(bundle["identifier"]["value"])


def applied_at_target(relais: EmbeddedRelais) -> Counter[str]:
    """How many times the target applied each Bundle, by the Bundle's own identifier."""
    received = httpx.get(f"http://127.0.0.1:{relais.target_port}/_received", timeout=60).json()
    return Counter(identifier(r["body"]) for r in received if r["applied"])


def holder_pid(log_db: Path, group: str, timeout_s: float = 20) -> int:
    """The pid of a live process holding a partition of the group (members are named host-pid-nonce)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with sqlite3.connect(log_db, timeout=30) as conn:
            rows = conn.execute("SELECT holder FROM leases WHERE grp=? AND holder IS NOT NULL ORDER BY topic, "
                                "partition", (group,)).fetchall()
        for (holder,) in rows:
            pid = int(holder.rsplit("-", 2)[1])
            with contextlib.suppress(OSError):  # gone meanwhile
                if b"services.cli" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
        time.sleep(0.2)  # a dead holder's partitions are being taken over
    raise AssertionError(f"no live process holds a partition of {group}")


async def post(client: httpx.AsyncClient, url: str, bundle: dict[str, Any]) -> bool:
    """One DUI POST; True on 202. A refused or failed POST is sent again later, as a DUI would."""
    try:
        response = await client.post(f"{url}/fhir", content=orjson.dumps(bundle), headers=HEADERS)
    except httpx.HTTPError:
        return False
    return response.status_code == 202


async def send_all(relais: EmbeddedRelais, bundles: list[dict[str, Any]], accepted: set[str],
                   during: dict[int, Any] | None = None, deadline_s: float = 60,
                   stop_when_down: bool = False) -> None:
    """POST every Bundle (8 at a time) until each got its 202; `during[n]()` runs once n were accepted.

    `stop_when_down`: once the broker has exited (a test stopped it), return with the rest unsent, as a
    DUI keeps them for later, instead of retrying until the deadline.
    """
    pending = list(bundles)
    actions = dict(during or {})
    deadline = time.monotonic() + deadline_s
    async with httpx.AsyncClient(timeout=30) as client:
        while pending and time.monotonic() < deadline:
            if stop_when_down and not relais.alive():
                return
            batch, pending = pending[:8], pending[8:]
            results = await asyncio.gather(*(post(client, relais.url, b) for b in batch))
            for bundle, ok in zip(batch, results, strict=True):
                if ok:
                    accepted.add(identifier(bundle))
                else:
                    pending.append(bundle)
            for n in [n for n in actions if len(accepted) >= n]:
                actions.pop(n)()
            if not all(results):
                await asyncio.sleep(0.5)
    assert not pending, f"{len(pending)} Bundles never accepted\n{relais.log_tail()}"


def wait_delivered(relais: EmbeddedRelais, accepted: set[str], timeout_s: float) -> Counter[str]:
    applied: Counter[str] = Counter()

    def done() -> bool:
        nonlocal applied
        applied = applied_at_target(relais)
        return accepted <= set(applied)

    wait_until(done, alive=relais.alive, explain=lambda: f"{len(accepted - set(applied))} never delivered\n"
               + relais.log_tail(), timeout_s=timeout_s, interval_s=1, what="every accepted Bundle at the target")
    return applied


def test_kill_9_of_each_child_during_500_bundles_loses_nothing(tmp_path: Path) -> None:
    relais = EmbeddedRelais(tmp_path)
    # Two workers, whatever the machine's cores: each restart hands partitions over between them mid-load.
    relais.env["RELAIS_WORKERS"] = "2"
    relais.start_target()
    relais.start()
    log_db = tmp_path / "log.db"
    killed: list[str] = []

    def kill(name: str, pid: int) -> None:
        killed.append(name)
        os.kill(pid, signal.SIGKILL)

    try:
        accepted: set[str] = set()
        bundles = [make_bundle(12, seed=7000 + i) for i in range(500)]  # 500 in flight matter, not their size
        asyncio.run(send_all(relais, bundles, accepted, during={
            100: lambda: kill("ingress", relais.children()["ingress"]),
            200: lambda: kill("validator", holder_pid(log_db, "relais-validator")),
            300: lambda: kill("delivery", holder_pid(log_db, "relais-delivery")),
        }, deadline_s=80))
        assert killed == ["ingress", "validator", "delivery"]
        # A bound, not the property: two restarts re-balance the work, and the suite runs two test files at once.
        applied = wait_delivered(relais, accepted, timeout_s=150)
        restarts = relais.log_tail(10**9).count("child died; restarting")
        assert restarts >= 3, relais.log_tail()
        assert len(accepted) == 500
        # The killed delivery process's in-flight POSTs are in doubt (journaled before each POST) and resolved
        # by the marker probe, never re-sent blindly.
        duplicates = {k: n for k, n in applied.items() if n > 1}
        assert not duplicates, f"{len(duplicates)} Bundles applied more than once at the target"
    finally:
        assert relais.stop() == 0, relais.log_tail()


def test_sigterm_under_load_exits_0_within_the_grace_period_and_loses_nothing(tmp_path: Path) -> None:
    relais = EmbeddedRelais(tmp_path)
    relais.env["RELAIS_SHUTDOWN_GRACE_S"] = "10"
    relais.env["RELAIS_WORKERS"] = "2"
    relais.start_target()
    relais.start()
    accepted: set[str] = set()
    bundles = [make_bundle(12, seed=9000 + i) for i in range(160)]
    stopped: dict[str, float] = {}

    def sigterm() -> None:
        assert relais.proc is not None
        relais.proc.send_signal(signal.SIGTERM)
        began = time.monotonic()
        stopped["code"] = relais.proc.wait(30)
        stopped["took"] = time.monotonic() - began

    # The broker stops under load; the DUI keeps what was not accepted for later.
    asyncio.run(send_all(relais, bundles[:120], accepted, during={80: sigterm}, deadline_s=40, stop_when_down=True))
    assert stopped.get("code") == 0, relais.log_tail()
    assert stopped["took"] < 10 + 10, f"stopping took {stopped['took']:.1f}s"
    relais.start()  # the same files, as an operator (or systemd) would
    try:
        rest = [b for b in bundles if identifier(b) not in accepted]
        asyncio.run(send_all(relais, rest, accepted, deadline_s=40))
        applied = wait_delivered(relais, accepted, timeout_s=60)
        assert set(applied) >= accepted and len(accepted) == 160
    finally:
        assert relais.stop() == 0, relais.log_tail()


def test_two_processes_of_one_stage_handle_each_record_once_and_survive_the_holder(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAIS_")}
    env |= {"RELAIS_EMBEDDED_LOG_PATH": str(tmp_path / "log.db"), "RELAIS_DATABASE_URL":
            f"sqlite+aiosqlite:///{tmp_path}/ledger.db", "RELAIS_LOG_FORMAT": "json"}
    settings = Settings(embedded_log_path=tmp_path / "log.db")
    first, count = 40, 340

    async def publish(numbers: range) -> None:
        bus = EmbeddedBus(settings)
        await bus.start()
        await bus.publish([Emit(RECEIVED, f"t{n}".encode(), Envelope(
            type="fr.relais.transfer.received", source="/test", transfer_id=f"t{n}",
            data=orjson.dumps(make_bundle(30, seed=n)), producer="p", extra={"targets": "demo"}))
            for n in numbers])
        await bus.stop()

    async def outputs() -> list[str]:
        bus = EmbeddedBus(settings)
        sub = bus.subscribe(f"reader-{time.monotonic_ns()}", [VALIDATED, REJECTED])
        await sub.start()
        ids: list[str] = []
        for _ in range(10):
            got = await sub.poll(1000, 0.1)
            ids += [r.envelope.transfer_id for r in got]
        await sub.stop()
        await bus.stop()
        return ids

    def holders() -> set[int]:
        with sqlite3.connect(tmp_path / "log.db", timeout=30) as conn:
            return {int(h.rsplit("-", 2)[1]) for (h,) in conn.execute(
                "SELECT holder FROM leases WHERE grp='relais-validator' AND holder IS NOT NULL")}

    asyncio.run(publish(range(first)))
    logs = [(tmp_path / f"validator-{n}.log").open("wb") for n in (1, 2)]
    procs = [subprocess.Popen([sys.executable, "-m", "services.cli", "validator"], env=env, cwd=REPO,
                              stdout=log, stderr=subprocess.STDOUT) for log in logs]
    tails = lambda: "\n".join((tmp_path / f"validator-{n}.log").read_text()[-1500:] for n in (1, 2))  # noqa: E731
    all_alive = lambda: all(p.poll() is None for p in procs)  # noqa: E731
    try:
        seen: list[str] = []

        def progressed(n: int) -> bool:
            nonlocal seen
            seen = asyncio.run(outputs())
            return len(seen) >= n

        wait_until(lambda: progressed(first), alive=all_alive, explain=tails, timeout_s=60, what="the first records")
        wait_until(lambda: holders() == {p.pid for p in procs}, alive=all_alive, explain=tails, timeout_s=30,
                   what="the two processes to share the partitions")
        asyncio.run(publish(range(first, count)))
        wait_until(lambda: progressed(first + 60), alive=all_alive, explain=tails, timeout_s=60,
                   what="both to handle the second wave")
        victim = next(p for p in procs if p.pid == holder_pid(tmp_path / "log.db", "relais-validator"))
        survivor = next(p for p in procs if p is not victim)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        wait_until(lambda: progressed(count), alive=lambda: survivor.poll() is None, explain=tails,
                   timeout_s=60, what="the survivor to handle every record")
        # The survivor takes the dead holder's partitions at its next heartbeat (a dead process: at once); it may
        # have handled every record before then, when the dead one's partitions had nothing left.
        wait_until(lambda: holders() == {survivor.pid}, alive=lambda: survivor.poll() is None, explain=tails,
                   timeout_s=30, what="the survivor to hold every partition")
        assert sorted(seen) == sorted(f"t{n}" for n in range(count)), "a record was handled twice or never"
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)
        for log in logs:
            log.close()


def test_a_child_refusing_its_configuration_stops_the_broker_with_exit_2_naming_it(tmp_path: Path) -> None:
    relais = EmbeddedRelais(tmp_path)
    del relais.env["RELAIS_PRODUCERS_FILE"]  # the ingress refuses to start without authentication
    proc = subprocess.run([sys.executable, "-m", "services.cli", "run", "--workers", "1"], env=relais.env, cwd=REPO,
                          capture_output=True, text=True, timeout=80)
    assert proc.returncode == 2, proc.stderr[-3000:]  # bad configuration, as for a single process
    assert "child ingress refused its configuration" in proc.stderr
    assert "RELAIS_PRODUCERS_FILE" in proc.stderr  # the child's own one-line reason


def test_operator_commands_work_beside_a_running_broker(tmp_path: Path) -> None:
    relais = EmbeddedRelais(tmp_path)
    metrics_port = free_port()
    relais.env |= {"RELAIS_WORKERS": "2", "RELAIS_METRICS_PORT": str(metrics_port)}
    relais.start()
    try:
        for port in (metrics_port, metrics_port + 1):  # each worker answers /readyz on its own port
            wait_until(readyz(f"http://127.0.0.1:{port}"), alive=relais.alive, explain=relais.log_tail,
                       what=f"worker /readyz on {port}")
            ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
            assert ready.status_code == 200 and ready.json()["stages"]["delivery"] is True, ready.text
        def relais_cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "services.cli", *args], env=relais.env, cwd=REPO,
                                  capture_output=True, text=True, timeout=60)

        paused = relais_cli("targets", "pause", "demo", "--reason", "maintenance")
        assert paused.returncode == 0, paused.stderr
        # The replay opens the embedded log to publish: beside the broker it must not be refused.
        replay = relais_cli("dlq", "replay", "--target", "demo")
        assert replay.returncode == 1 and "nothing matched" in replay.stderr, replay.stderr
        assert relais_cli("targets", "resume", "demo").returncode == 0
    finally:
        assert relais.stop() == 0, relais.log_tail()
