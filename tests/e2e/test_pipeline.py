"""End to end, as separate OS processes: DUI → ingress → validator → router → delivery → target ESSMS.

A real Kafka, a real HTTP target (devtools.demotarget), `relais <stage>` processes and a SQLite
ledger shared by tracker and ingress. The crash test SIGKILLs stages mid-run and restarts them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from services.core.settings import Settings
from services.delivery.marker import mark_transfer
from tests.fixtures.tddui import make_bundle
from tests.support.processes import Broker, DemoTarget
from tests.support.producers import TOKEN_A, write_producers, write_targets
from tests.support.statuses import final_statuses

pytestmark = [pytest.mark.e2e, pytest.mark.kafka]
AUTH = {"Authorization": f"Bearer {TOKEN_A}", "Content-Type": "application/fhir+json"}


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoTarget]:
    t = DemoTarget(tmp_path_factory.mktemp("target") / "target.log").start()
    yield t
    t.stop()


@pytest.fixture(scope="module")
def broker(kafka_bootstrap: str, target: DemoTarget, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    work = tmp_path_factory.mktemp("broker")
    env = {
        "RELAIS_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "RELAIS_TOPIC_PREFIX": f"e2e{uuid.uuid4().hex[:8]}.",
        "RELAIS_TOPIC_PARTITIONS": "3",
        "RELAIS_DATABASE_URL": f"sqlite+aiosqlite:///{work}/ledger.db",
        "RELAIS_PRODUCERS_FILE": str(write_producers(work / "producers.yaml")),
        "RELAIS_TARGETS_FILE": str(write_targets(work / "targets.yaml", {"essms-a": target.fhir})),
        "RELAIS_RETRY_DELAYS_S": "[0.5, 1, 2]",
        "RELAIS_MAX_ATTEMPTS": "8",
    }
    b = Broker(work, env).start()
    yield b
    b.stop()


async def post(client: httpx.AsyncClient, broker: Broker, bundle: dict[str, Any], target: str = "essms-a") -> str:
    response = await client.post(f"{broker.url}/fhir", content=orjson.dumps(bundle),
                                 headers={**AUTH, "X-Relais-Target": target})
    assert response.status_code == 202, response.text
    return response.headers["X-Relais-Transfer-Id"]


async def final_status(client: httpx.AsyncClient, broker: Broker, transfer_id: str,
                       timeout_s: float = 120) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = await client.get(f"{broker.url}/fhir/_transfer/{transfer_id}", headers=AUTH)
        if response.status_code == 200:
            return response
        assert response.status_code == 202, response.text  # a 202 is a promise: never 404
        await asyncio.sleep(0.2)
    raise AssertionError(f"transfer {transfer_id} not final after {timeout_s}s\n{broker.tails()}")


async def test_valid_bundle_reaches_the_target_and_status_turns_200(broker: Broker, target: DemoTarget) -> None:
    bundle = make_bundle(30, seed=7)
    async with httpx.AsyncClient(timeout=30) as client:
        transfer_id = await post(client, broker, bundle)
        in_flight = await client.get(f"{broker.url}/fhir/_transfer/{transfer_id}", headers=AUTH)
        response = await final_status(client, broker, transfer_id)
    assert in_flight.status_code in (200, 202)
    result = response.json()
    assert result["resourceType"] == "Bundle" and result["type"] == "batch-response"
    [entry] = result["entry"]
    assert {"url": "https://relais.esms.fr/fhir/StructureDefinition/delivery-target",
            "valueString": "essms-a"} in entry["extension"]
    answer = entry["resource"]
    assert answer["type"] == "transaction-response"
    assert len(answer["entry"]) == 30
    assert all(e["response"]["status"].startswith("201") for e in answer["entry"])

    delivered = [r for r in target.received() if r["request_id"] == f"{transfer_id}/essms-a"]
    assert len(delivered) == 1
    # The same JSON the DUI sent, each resource marked with its transfer (what a probe searches for).
    assert delivered[0]["body"] == mark_transfer(bundle, Settings().transfer_tag_system, transfer_id)


async def test_kill_9_of_each_worker_during_200_bundles_loses_nothing(
        broker: Broker, target: DemoTarget, capsys: pytest.CaptureFixture[str]) -> None:
    count = 200
    bundles = [make_bundle(12, seed=1000 + i) for i in range(count)]
    transfer_ids: list[str] = []
    async with httpx.AsyncClient(timeout=60) as client:
        semaphore = asyncio.Semaphore(16)

        async def send(bundle: dict[str, Any]) -> str:
            async with semaphore:
                return await post(client, broker, bundle)

        # Crash each worker in turn while Bundles are still arriving, then bring it back.
        for batch_no, stage in enumerate(("validator", "router", "delivery", None)):
            batch = bundles[batch_no * 50:(batch_no + 1) * 50]
            sending = asyncio.gather(*(send(b) for b in batch))
            if stage:
                await asyncio.sleep(0.3)
                broker.kill(stage)
                await asyncio.sleep(0.5)
                broker.restart(stage)
            transfer_ids += await sending

        final = await final_statuses(client, broker.url, AUTH, transfer_ids, timeout_s=180)

    statuses = [final[t] for t in transfer_ids]

    assert len(set(transfer_ids)) == count
    not_delivered = [t for t, r in zip(transfer_ids, statuses, strict=True) if r.get("type") != "batch-response"
                     or r["entry"][0]["extension"][1]["valueCode"] != "delivered"]
    assert not not_delivered, f"{len(not_delivered)} transfer(s) not delivered\n{broker.tails()}"

    by_request: dict[str, int] = target.summary()["by_request_id"]  # type: ignore[assignment]
    ours = {f"{t}/essms-a" for t in transfer_ids}
    delivered_counts = {rid: n for rid, n in by_request.items() if rid in ours}
    assert set(delivered_counts) == ours  # every transfer reached the target at least once
    duplicates = sum(n - 1 for n in delivered_counts.values())
    with capsys.disabled():
        print(f"\n[e2e kill -9] {count} transfers delivered; duplicate POSTs at the target: {duplicates}")
