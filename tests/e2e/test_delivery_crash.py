"""Nothing delivered twice: `kill -9` of the delivery process while Bundles are in flight to a real target.

Each run sends 300 Bundles (one person each) to a demo target that answers every transaction after
0.2 s, so POSTs are always in flight when the process dies. The delivery process is SIGKILLed three
times at random moments, each time once deliveries are flowing again. Outcomes are counted at the
target, by content: how many times each person's Bundle was applied.

* Against a target that supports `_tag` search, every Bundle is applied exactly once: attempts the
  crash left in doubt are probed for the transfer's marker, never re-sent blindly.
* Against a target without search, in-doubt deliveries follow the target's policy (default probe →
  the probe is refused → dead letter, which the transfer's status says), and nothing is applied twice.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.fixtures.tddui import make_bundle, patient_identifier
from tests.support.embedded import EmbeddedRelais
from tests.support.processes import REPO, Broker
from tests.support.producers import TOKEN_A, write_producers, write_targets
from tests.support.statuses import final_statuses

pytestmark = pytest.mark.e2e
COUNT, KILLS = 300, 3
SLOW = {"delay_s": 0.2, "count": -1}  # every transaction answered after 0.2 s: POSTs are in flight


class Target:
    """The demo target as a process on a known port; `search=False` refuses every search."""

    def __init__(self, port: int, log: Path, *, search: bool = True) -> None:
        args = [sys.executable, "-m", "devtools.demotarget", "--port", str(port), *([] if search else ["--no-search"])]
        self.base = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log.open("ab"))
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{self.base}/healthz", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and self.proc.poll() is None, "demo target did not start"
                time.sleep(0.1)
        httpx.post(f"{self.base}/_faults", json=SLOW, timeout=5).raise_for_status()

    def posts(self) -> int:
        return int(httpx.get(f"{self.base}/_received", params={"summary": 1}, timeout=30).json()["total"])

    def applied_per_person(self) -> Counter[tuple[str, str]]:
        """How many times the target applied each person's Bundle, read from what it stored."""
        rows = httpx.get(f"{self.base}/_received", timeout=120).json()
        return Counter(patient_identifier(r["body"]) for r in rows if r["applied"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def bundles(seed: int) -> list[dict[str, Any]]:
    return [make_bundle(12, seed=seed + i) for i in range(COUNT)]


async def kill_while_delivering(target: Target, kill: Callable[[], None], restart: Callable[[], None]) -> None:
    """SIGKILL the delivery process KILLS times, each at a random moment once deliveries flow again."""
    rng = random.Random()
    for _ in range(KILLS):
        flowing_from = await asyncio.to_thread(target.posts)
        for _ in range(600):  # at most a minute
            if await asyncio.to_thread(target.posts) >= flowing_from + 6:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(rng.uniform(0.0, 1.5))
        await asyncio.to_thread(kill)
        await asyncio.to_thread(restart)


def status_of(entry: dict[str, Any]) -> str:
    return next(e["valueCode"] for e in entry["extension"] if e.get("valueCode"))


# --- the embedded bus: `relais run` is the delivery process ------------------------------------------

@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[Callable[[bool], tuple[EmbeddedRelais, Target]]]:
    started: list[tuple[EmbeddedRelais, Target]] = []

    def start(search: bool) -> tuple[EmbeddedRelais, Target]:
        relais = EmbeddedRelais(tmp_path)
        target = Target(relais.target_port, tmp_path / "target.log", search=search)
        relais.start()
        started.append((relais, target))
        return relais, target

    yield start
    for relais, target in started:
        relais.stop()
        target.stop()


async def post_all_embedded(relais: EmbeddedRelais, items: list[dict[str, Any]]) -> list[str]:
    headers = {"Authorization": "Bearer demo-token", "Content-Type": "application/fhir+json",
               "X-Relais-Target": "demo"}
    semaphore = asyncio.Semaphore(16)  # sixteen DUIs at once
    async with httpx.AsyncClient(timeout=30) as client:
        async def one(bundle: dict[str, Any]) -> str:
            async with semaphore:
                r = await client.post(f"{relais.url}/fhir", content=orjson.dumps(bundle), headers=headers)
                assert r.status_code == 202, r.text
                return str(r.headers["X-Relais-Transfer-Id"])
        return list(await asyncio.gather(*(one(b) for b in items)))


async def run_embedded(relais: EmbeddedRelais, target: Target, items: list[dict[str, Any]]) -> dict[str, Any]:
    # Every Bundle is accepted first, so a lost 202 cannot make a second transfer of the same person:
    # what is counted at the target is delivery's doing alone.
    ids = await post_all_embedded(relais, items)
    await kill_while_delivering(target, relais.kill9, relais.start)
    async with httpx.AsyncClient(timeout=30) as client:
        return {t: s["entry"][0] for t, s in (await final_statuses(
            client, relais.url, {"Authorization": "Bearer demo-token"}, ids)).items()}


async def test_kill_9_three_times_on_the_embedded_bus_delivers_each_bundle_exactly_once(
        embedded: Callable[[bool], tuple[EmbeddedRelais, Target]], capsys: pytest.CaptureFixture[str]) -> None:
    relais, target = embedded(True)
    items = bundles(7000)
    statuses = await run_embedded(relais, target, items)
    applied = target.applied_per_person()
    counts = Counter(status_of(e) for e in statuses.values())
    with capsys.disabled():
        print(f"\n[embedded kill -9 x{KILLS}] statuses {dict(counts)}; POSTs {target.posts()}; "
              f"duplicates {sum(n - 1 for n in applied.values())}")
    assert set(counts) <= {"delivered", "delivered-unconfirmed"}, counts
    assert {patient_identifier(b) for b in items} == set(applied)  # all 300 at the target
    assert sum(n - 1 for n in applied.values()) == 0  # and none twice


async def test_in_doubt_deliveries_at_a_target_without_search_follow_the_policy_and_show_in_the_status(
        embedded: Callable[[bool], tuple[EmbeddedRelais, Target]], capsys: pytest.CaptureFixture[str]) -> None:
    relais, target = embedded(False)
    items = bundles(8000)
    statuses = await run_embedded(relais, target, items)
    applied = target.applied_per_person()
    counts = Counter(status_of(e) for e in statuses.values())
    in_doubt = [e for e in statuses.values() if status_of(e) == "dead-lettered"
                and "was in flight when delivery process" in orjson.dumps(e["response"]["outcome"]).decode()]
    with capsys.disabled():
        print(f"\n[embedded kill -9 x{KILLS}, target without search] statuses {dict(counts)}; "
              f"in doubt (dead-lettered, policy probe → unprobeable) {len(in_doubt)}; "
              f"duplicates {sum(n - 1 for n in applied.values())}")
    assert set(counts) <= {"delivered", "dead-lettered"}, counts
    assert counts["dead-lettered"] == len(in_doubt) > 0  # every dead letter is an in-doubt one, and says so
    assert sum(n - 1 for n in applied.values()) == 0  # in doubt is never re-sent blindly
    assert counts["delivered"] + len(in_doubt) == COUNT
    assert len(applied) >= counts["delivered"]


# --- Kafka: the delivery stage as its own process --------------------------------------------------------

@pytest.mark.kafka
async def test_kill_9_of_the_delivery_process_three_times_on_kafka_delivers_each_bundle_exactly_once(
        kafka_bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.support.processes import free_port

    target = Target(free_port(), tmp_path / "target.log")
    env = {
        "RELAIS_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "RELAIS_TOPIC_PREFIX": f"crash{uuid.uuid4().hex[:8]}.",
        "RELAIS_TOPIC_PARTITIONS": "6",
        "RELAIS_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/ledger.db",
        "RELAIS_BLOB_DIR": str(tmp_path / "blobs"),
        "RELAIS_PRODUCERS_FILE": str(write_producers(tmp_path / "producers.yaml")),
        "RELAIS_TARGETS_FILE": str(write_targets(tmp_path / "targets.yaml", {"essms-a": f"{target.base}/fhir"})),
        "RELAIS_RETRY_DELAYS_S": "[0.5, 1, 2]",
    }
    broker = Broker(tmp_path, env).start()
    headers = {"Authorization": f"Bearer {TOKEN_A}", "Content-Type": "application/fhir+json",
               "X-Relais-Target": "essms-a"}
    items = bundles(9000)
    try:
        async with httpx.AsyncClient(timeout=60) as client:
            semaphore = asyncio.Semaphore(16)

            async def one(bundle: dict[str, Any]) -> str:
                async with semaphore:
                    r = await client.post(f"{broker.url}/fhir", content=orjson.dumps(bundle), headers=headers)
                    assert r.status_code == 202, r.text
                    return str(r.headers["X-Relais-Transfer-Id"])

            # The delivery process dies while Bundles still arrive (ingress stays up: no 202 is lost).
            sending = asyncio.gather(*(one(b) for b in items))
            await kill_while_delivering(target, lambda: broker.kill("delivery"), lambda: broker.restart("delivery"))
            ids = list(await sending)
            statuses = {t: s["entry"][0] for t, s in (await final_statuses(
                client, broker.url, {"Authorization": f"Bearer {TOKEN_A}"}, ids)).items()}
        applied = target.applied_per_person()
        counts = Counter(status_of(e) for e in statuses.values())
        with capsys.disabled():
            print(f"\n[kafka kill -9 x{KILLS} of delivery] statuses {dict(counts)}; POSTs {target.posts()}; "
                  f"duplicates {sum(n - 1 for n in applied.values())}")
        assert set(counts) <= {"delivered", "delivered-unconfirmed"}, (counts, broker.tails())
        assert {patient_identifier(b) for b in items} == set(applied)
        assert sum(n - 1 for n in applied.values()) == 0
    finally:
        broker.stop()
        target.stop()
