"""A 202 is a promise: the status URL answers 202 or the final word at once, on any replica, tracker or not.

Two ingress replicas share one ledger database and one bus (Kafka, then the embedded log). Each
POST goes to one replica and its Content-Location is read at once from the other, while the
tracker is first absent, then running, then stopped again: never a 404.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import orjson
import pytest
from fastapi import FastAPI

from services.app import create_app
from services.core.bus import Bus
from services.core.buses import make_bus
from services.core.runner import run_stage
from services.core.settings import Settings
from services.tracker.ledger import Ledger
from services.tracker.stage import TrackerStage
from tests.fixtures.tddui import make_bundle
from tests.support.producers import TOKEN_A, write_producers, write_targets

POSTS = 200


@contextlib.asynccontextmanager
async def started_bus(settings: Settings) -> AsyncIterator[Bus]:
    """One bus for the test's replicas and tracker (the embedded log has one owner per process)."""
    bus = make_bus(settings)
    await bus.start()
    try:
        yield bus
    finally:
        await bus.stop()


@contextlib.asynccontextmanager
async def replica(settings: Settings, name: str, bus: Bus) -> AsyncIterator[httpx.AsyncClient]:
    """An ingress app with its own Ledger object on the shared ledger database; on Kafka, its own
    producer too (the embedded log has one owner per process, so replicas share it there)."""
    own_bus = settings.kafka_bootstrap is not None
    app: FastAPI = create_app(settings, make_bus(settings) if own_bus else bus, Ledger(settings.database_url),
                              manage_bus=own_bus)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://{name}") as client:
            for _ in range(300):
                if (await client.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            yield client


@contextlib.asynccontextmanager
async def tracker(settings: Settings, bus: Bus) -> AsyncIterator[None]:
    ledger, stop = Ledger(settings.database_url), asyncio.Event()
    await ledger.create_schema()
    task = asyncio.create_task(run_stage(TrackerStage(ledger), bus, settings, stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await ledger.close()


async def test_status_url_never_404s_after_a_202(bus_settings: Callable[..., Settings], tmp_path: Path) -> None:
    settings = bus_settings(producers_file=write_producers(tmp_path / "producers.yaml"), auth_disabled=False,
                            targets_file=write_targets(tmp_path / "targets.yaml", {"essms-a": "http://127.0.0.1:9/fhir"}))
    headers = {"Content-Type": "application/fhir+json", "Authorization": f"Bearer {TOKEN_A}",
               "X-Relais-Target": "essms-a"}
    answers: list[int] = []
    async with started_bus(settings) as bus, replica(settings, "replica-a", bus) as a, \
            replica(settings, "replica-b", bus) as b:
        pair = (a, b)
        stack = contextlib.AsyncExitStack()
        for i in range(POSTS):
            if i == POSTS // 3:
                await stack.enter_async_context(tracker(settings, bus))  # the tracker catches up for a while...
            if i == 2 * POSTS // 3:
                await stack.aclose()  # ...then stops again
            posted = await pair[i % 2].post("/fhir", content=orjson.dumps(make_bundle(3, seed=i)), headers=headers)
            assert posted.status_code == 202, posted.text
            location = posted.headers["Content-Location"]
            assert location.endswith(f"/fhir/_transfer/{posted.headers['X-Relais-Transfer-Id']}")
            assert posted.json()["extension"][0]["valueUrl"] == location
            path = httpx.URL(location).path
            status = await pair[(i + 1) % 2].get(path, headers={"Authorization": f"Bearer {TOKEN_A}"})
            answers.append(status.status_code)
            assert status.status_code != 404, (i, status.text)
            alias = await pair[i % 2].get(f"/transfers/{posted.headers['X-Relais-Transfer-Id']}",
                                          headers={"Authorization": f"Bearer {TOKEN_A}"})
            assert alias.status_code == status.status_code or alias.status_code in (200, 202)
        await stack.aclose()
    assert answers.count(404) == 0
    assert set(answers) <= {200, 202}, answers


@pytest.mark.parametrize("who", ["another producer", "nobody"])
async def test_a_transfer_is_not_shown_to_another_producer(make_settings: Callable[..., Settings], tmp_path: Path,
                                                           who: str) -> None:
    from tests.support.producers import TOKEN_B

    settings = make_settings(producers_file=write_producers(tmp_path / "producers.yaml"), auth_disabled=False,
                             embedded_log_path=tmp_path / "log.db",
                             targets_file=write_targets(tmp_path / "t.yaml", {"essms-a": "http://127.0.0.1:9/fhir"}))
    async with started_bus(settings) as bus, replica(settings, "relais", bus) as client:
        posted = await client.post("/fhir", content=orjson.dumps(make_bundle(3, seed=1)), headers={
            "Content-Type": "application/fhir+json", "Authorization": f"Bearer {TOKEN_A}",
            "X-Relais-Target": "essms-a"})
        assert posted.status_code == 202
        path = httpx.URL(posted.headers["Content-Location"]).path
        token = TOKEN_B if who != "nobody" else TOKEN_A
        other = await client.get(path if who != "nobody" else "/fhir/_transfer/unknown-id",
                                 headers={"Authorization": f"Bearer {token}"})
    assert other.status_code == 404
    assert other.json()["resourceType"] == "OperationOutcome"


def _count(metrics: str, route: str, status: str) -> float:
    prefix = f'relais_ingress_requests_total{{route="{route}",status="{status}"}} '
    return sum(float(line[len(prefix):]) for line in metrics.splitlines() if line.startswith(prefix))


async def test_requests_are_counted_by_route_template_and_status(make_settings: Callable[..., Settings],
                                                                 tmp_path: Path) -> None:
    settings = make_settings(embedded_log_path=tmp_path / "log.db",
                             targets_file=write_targets(tmp_path / "t.yaml", {"essms-a": "http://127.0.0.1:9/fhir"}))
    headers = {"Content-Type": "application/fhir+json", "X-Relais-Target": "essms-a"}
    async with started_bus(settings) as bus, replica(settings, "relais", bus) as client:
        before = (await client.get("/metrics")).text
        posted = await client.post("/fhir", content=orjson.dumps(make_bundle(3, seed=2)), headers=headers)
        for _ in range(3):
            await client.get(httpx.URL(posted.headers["Content-Location"]).path)
        await client.post("/fhir", content=b"{", headers=headers)
        after = (await client.get("/metrics")).text
    assert _count(after, "/fhir", "202") - _count(before, "/fhir", "202") == 1
    assert _count(after, "/fhir", "400") - _count(before, "/fhir", "400") == 1
    assert _count(after, "/fhir/_transfer/{transfer_id}", "202") - \
        _count(before, "/fhir/_transfer/{transfer_id}", "202") == 3
