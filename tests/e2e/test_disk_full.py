"""`relais run` on the embedded bus with its data directory on a small, really full disk (a tmpfs).

The embedded log, the ledger and the blob store all live on the tmpfs; a filler file takes its last byte.
Outcomes are counted at the demo target by content (each Bundle's own identifier), never through the ledger.
Needs root to mount the tmpfs: skipped without it, except under CI (CI=true) where it fails instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from services.core.topics import POISON
from tests.fixtures.tddui import make_bundle
from tests.support.embedded import EmbeddedRelais
from tests.support.processes import wait_until

pytestmark = pytest.mark.e2e
HEADERS = {"Authorization": "Bearer demo-token", "Content-Type": "application/fhir+json", "X-Relais-Target": "demo"}
OPS = {"Authorization": "Bearer embedded-ops-token"}


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path`: a disk that really fills up. Unmounted on the way out."""
    path.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                       capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        if os.environ.get("CI"):
            raise AssertionError(f"cannot mount a tmpfs under CI (run the tests as root): {detail}") from exc
        pytest.skip(f"mounting a tmpfs needs root with CAP_SYS_ADMIN: {detail}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(disk: Path) -> Path:
    """Take every free byte of `disk` with a filler file; delete the file to give the space back."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for chunk in (1 << 20, 1 << 16, 4096):  # big steps, then down to tmpfs's page
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * chunk)
    finally:
        os.close(fd)
    assert os.statvfs(disk).f_bavail == 0, "the disk still has room"
    return filler


def on_disk(relais: EmbeddedRelais, disk: Path) -> None:
    """Every file `relais run` writes (log, ledger, blobs) on `disk`; its own stdout log stays off it."""
    relais.env |= {
        "RELAIS_DATABASE_URL": f"sqlite+aiosqlite:///{disk}/ledger.db",
        "RELAIS_EMBEDDED_LOG_PATH": str(disk / "log.db"),
        "RELAIS_BLOB_DIR": str(disk / "blobs"),
        "RELAIS_CLAIM_CHECK_BYTES": "1024",  # every Bundle travels as a blob: the blob store is on the full disk too
        # Two workers: the faults make stages rejoin and hand partitions over between processes, and no
        # hand-over may leave the ledger locked (issue 16).
        "RELAIS_WORKERS": "2",
    }


def identifier(bundle: Any) -> str:
    return str(bundle["identifier"]["value"])


def applied_at_target(relais: EmbeddedRelais) -> Counter[str]:
    """How many times the target applied each Bundle, by the Bundle's own identifier."""
    received = httpx.get(f"http://127.0.0.1:{relais.target_port}/_received", timeout=30).json()
    return Counter(identifier(r["body"]) for r in received if r["applied"])


def target_fault(relais: EmbeddedRelais, fault: dict[str, Any] | None) -> None:
    """Queue a fault on the demo target (until cleared), or clear every fault with None."""
    base = f"http://127.0.0.1:{relais.target_port}/_faults"
    response = httpx.delete(base, timeout=10) if fault is None else httpx.post(base, json=fault, timeout=10)
    response.raise_for_status()


def dead_letters(relais: EmbeddedRelais) -> list[dict[str, Any]]:
    response = httpx.get(f"{relais.url}/ops/dead-letters", headers=OPS, timeout=30)
    assert response.status_code == 200, response.text
    return list(response.json()["items"])


def poison_records(log_db: Path) -> int:
    """Records on the runner's poison topic: what a stage could not handle at all."""
    with sqlite3.connect(log_db, timeout=30) as conn:
        (n,) = conn.execute("SELECT count(*) FROM records WHERE topic = ?", (POISON,)).fetchone()
    return int(n)


async def post(client: httpx.AsyncClient, url: str, bundle: dict[str, Any]) -> httpx.Response | None:
    try:
        return await client.post(f"{url}/fhir", content=orjson.dumps(bundle), headers=HEADERS)
    except httpx.HTTPError:
        return None


def refusal_problem(response: httpx.Response) -> str | None:
    """What is wrong with a non-202 answer while the disk is full; None when it is a 503 OperationOutcome."""
    try:
        body = response.json()
    except ValueError:
        return f"{response.status_code} {response.headers.get('content-type')}: {response.text[:200]!r}"
    if response.status_code != 503 or not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return f"{response.status_code}: {response.text[:300]!r}"
    return None


def test_disk_full_during_retries_every_transfer_ends_delivered_or_in_the_replayable_dlq(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "48m") as disk:
        relais = EmbeddedRelais(tmp_path)
        on_disk(relais, disk)
        relais.env |= {"RELAIS_RETRY_DELAYS_S": "[0.5]", "RELAIS_MAX_ATTEMPTS": "2"}
        # No circuit breaker: every failing attempt counts, so transfers can run out of attempts.
        Path(relais.env["RELAIS_TARGETS_FILE"]).write_text(
            f"targets:\n  - id: demo\n    base_url: http://127.0.0.1:{relais.target_port}/fhir\n"
            "    breaker: {failures: 100000, probe_every_s: 30}\n", encoding="utf-8")
        relais.start_target()
        try:
            wait_until(lambda: httpx.get(f"http://127.0.0.1:{relais.target_port}/healthz", timeout=2).is_success,
                       alive=lambda: True, explain=str, timeout_s=20, what="the demo target")
            # The target is failing: every first attempt gets a 503 (to the retry tier), and the last attempts
            # take 3 s to get theirs, so the disk fills while they are in flight: their dead letters are
            # written on a full disk, and must wait for space (listed, replayable), never turn into poison.
            target_fault(relais, {"status": 503, "count": 20})
            target_fault(relais, {"status": 503, "count": -1, "delay_s": 3})
            relais.start()
            bundles = {identifier(b): b for b in (make_bundle(12, seed=31_000 + i) for i in range(20))}
            transfer_of: dict[str, str] = {}

            async def send() -> None:
                async with httpx.AsyncClient(timeout=30) as client:
                    answers = await asyncio.gather(*(post(client, relais.url, b) for b in bundles.values()))
                for key, answer in zip(bundles, answers, strict=True):
                    assert answer is not None and answer.status_code == 202, answer and answer.text
                    transfer_of[key] = answer.headers["X-Relais-Transfer-Id"]

            asyncio.run(send())
            received = lambda: httpx.get(f"http://127.0.0.1:{relais.target_port}/_received",  # noqa: E731
                                         params={"summary": 1}, timeout=10).json()["total"]
            wait_until(lambda: received() >= len(bundles) + 2, alive=relais.alive, explain=relais.log_tail,
                       timeout_s=30, interval_s=0.05, what="a failed attempt of every transfer, last attempts started")
            filler = fill(disk)  # the transfers sit in the retry tiers; some exhaust their attempts meanwhile
            target_fault(relais, None)  # the target recovers while the disk is full
            time.sleep(8)
            assert relais.alive(), relais.log_tail()
            filler.unlink()  # space returns

            def settled() -> bool:
                applied = set(applied_at_target(relais))
                dead = {d["transfer_id"] for d in dead_letters(relais)}
                return all(key in applied or transfer_of[key] in dead for key in bundles)

            wait_until(settled, alive=relais.alive, explain=relais.log_tail, timeout_s=40, interval_s=1,
                       what="every transfer delivered or in the DLQ")
            letters = dead_letters(relais)
            assert [d for d in letters if d["kind"] != "delivery"] == [], "a stage dead-lettered a record (poison)"
            assert poison_records(disk / "log.db") == 0, relais.log_tail()
            # A dead letter here died of the target's 503s (its attempts ran out), never of the full disk.
            assert all(d["last_http_status"] == 503 for d in letters), letters
            if letters:  # listed means replayable: replay them, now that the target is well
                replayed = httpx.post(f"{relais.url}/ops/dead-letters/replay", json={"target": "demo"}, headers=OPS,
                                      timeout=30)
                assert replayed.status_code == 202 and replayed.json()["count"] == len(letters), replayed.text
            wait_until(lambda: set(applied_at_target(relais)) >= set(bundles), alive=relais.alive,
                       explain=relais.log_tail, timeout_s=30, interval_s=1, what="every transfer at the target")
            applied = applied_at_target(relais)
            assert {k: n for k, n in applied.items() if n > 1} == {}, "a transfer applied twice"
            print(f"dead-lettered then replayed: {len(letters)}; delivered from the retry tiers: "
                  f"{len(bundles) - len(letters)}")
        finally:
            code = relais.stop()
        assert code == 0, relais.log_tail()


def test_disk_full_while_deliveries_flow_refuses_with_503_and_delivers_each_accepted_transfer_once(
        tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "48m") as disk:
        relais = EmbeddedRelais(tmp_path)
        on_disk(relais, disk)
        relais.start_target()
        try:
            relais.start()
            asyncio.run(_flow_with_a_full_disk(relais, disk))
        finally:
            code = relais.stop()
        assert code == 0, relais.log_tail()


async def _flow_with_a_full_disk(relais: EmbeddedRelais, disk: Path) -> None:
    bundles = [make_bundle(12, seed=41_000 + i) for i in range(160)]
    pending = list(bundles)
    accepted: set[str] = set()
    transfers: dict[str, list[str]] = {}  # each Bundle's transfer ids, from its 202s
    bad_refusals: list[str] = []
    refused_while_full = 0
    full = asyncio.Event()
    stop = asyncio.Event()
    more = asyncio.Event()  # set once the disk is full: the clients keep 40 transfers back for that moment

    async def client(client_: httpx.AsyncClient) -> None:
        nonlocal refused_while_full
        while pending and not stop.is_set():
            if len(accepted) >= len(bundles) - 40:
                await more.wait()
            bundle = pending.pop(0)
            answer = await post(client_, relais.url, bundle)
            if answer is not None and answer.status_code == 202:
                accepted.add(identifier(bundle))
                transfers.setdefault(identifier(bundle), []).append(answer.headers["X-Relais-Transfer-Id"])
                continue
            pending.append(bundle)  # refused: the DUI sends it again later
            if answer is not None:
                problem = refusal_problem(answer)
                if problem is not None:
                    bad_refusals.append(problem)
                elif full.is_set():
                    refused_while_full += 1
            await asyncio.sleep(0.3)

    async def readiness(client_: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
        answer = await client_.get(f"{relais.url}/readyz", timeout=5)
        return answer.status_code, answer.json()

    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=20)) as http:
        clients = [asyncio.create_task(client(http)) for _ in range(12)]
        began = time.monotonic()
        flowing = lambda: sum(applied_at_target(relais).values()) >= 20  # noqa: E731
        while len(accepted) < len(bundles) - 40 or not await asyncio.to_thread(flowing):
            assert time.monotonic() - began < 40, f"deliveries do not flow\n{relais.log_tail()}"
            await asyncio.sleep(0.2)  # until deliveries flow
        filler = fill(disk)
        full.set()
        more.set()
        filled = time.monotonic()
        while (ready := await readiness(http))[0] == 200:
            assert time.monotonic() - filled < 5, f"/readyz still ready 5 s after the disk filled: {ready}"
            await asyncio.sleep(0.2)
        not_ready_after = time.monotonic() - filled
        assert ready[0] == 503 and "disk" in orjson.dumps(ready[1]).decode().lower(), ready
        await asyncio.sleep(6)  # the clients keep posting against the full disk
        full.clear()
        filler.unlink()
        freed = time.monotonic()
        while (ready := await readiness(http))[0] != 200:
            assert time.monotonic() - freed < 10, f"/readyz not ready 10 s after space returned: {ready}"
            await asyncio.sleep(0.2)
        ready_after = time.monotonic() - freed
        try:
            # Less than one SQLite lock timeout (30 s) beyond the clients' own pace: no lock may outlive the fault.
            async with asyncio.timeout(40):
                await asyncio.gather(*clients)
        except TimeoutError:
            raise AssertionError(f"{len(pending)} Bundles still not accepted 40 s after space returned\n"
                                 f"{relais.log_tail()}") from None
        finally:
            stop.set()
        assert not pending, f"{len(pending)} Bundles never accepted"
    assert bad_refusals == [], f"refusals that are not a 503 OperationOutcome: {bad_refusals[:5]}"
    assert refused_while_full > 0, "no POST was refused while the disk was full"

    applied: Counter[str] = Counter()

    def delivered() -> bool:
        nonlocal applied
        applied = applied_at_target(relais)
        return set(applied) >= accepted

    await asyncio.to_thread(wait_until, delivered, alive=relais.alive, timeout_s=40, interval_s=1,
                            explain=lambda: f"{len(accepted - set(applied))} never delivered\n{relais.log_tail()}",
                            what="every accepted Bundle at the target")
    duplicates = {k: n for k, n in applied.items() if n > 1}
    assert duplicates == {}, f"applied more than once: {duplicates}; their 202s: " + str(
        {k: transfers.get(k) for k in duplicates}) + "; POSTs: " + str(
        [(r["time"], r["headers"].get("x-request-id"), r["status"]) for r in httpx.get(
            f"http://127.0.0.1:{relais.target_port}/_received", timeout=30).json()
         if identifier(r["body"]) in duplicates])
    assert set(applied) == accepted == {identifier(b) for b in bundles}
    assert poison_records(disk / "log.db") == 0
    print(f"/readyz not ready {not_ready_after:.1f}s after the disk filled, ready {ready_after:.1f}s after space "
          f"returned; {refused_while_full} POSTs refused with 503 while full")
