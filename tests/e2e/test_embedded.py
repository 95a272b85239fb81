"""The embedded default: `relais run` with no Kafka at all, killed with SIGKILL mid-run, loses nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.fixtures.tddui import make_bundle
from tests.support.embedded import EmbeddedRelais
from tests.support.statuses import final_statuses

pytestmark = pytest.mark.e2e
AUTH = {"Authorization": "Bearer demo-token"}


async def test_kill_9_during_500_bundles_on_the_embedded_bus_loses_nothing(tmp_path: Path) -> None:
    relais = EmbeddedRelais(tmp_path)
    relais.start_target()
    relais.start()
    accepted: list[str] = []
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            bundles = [make_bundle(12, seed=5000 + i) for i in range(500)]  # 500 in flight matter, not their size
            await post_all(client, relais, bundles[:250], accepted, kill_after=120)  # restarts it, too
            await post_all(client, relais, bundles[250:], accepted)
            final = await final_statuses(client, relais.url, AUTH, accepted, timeout_s=300)
            assert all(f.get("type") == "batch-response" for f in final.values()), relais.log_tail()
        received = httpx.get(f"http://127.0.0.1:{relais.target_port}/_received", params={"summary": 1}).json()
        ids = {rid.split("/")[0] for rid in received["by_request_id"]}
        assert set(accepted) <= ids
        print(f"\n[embedded kill -9] {len(accepted)} accepted, all delivered; "
              f"duplicate POSTs at the target: {received['total'] - len(ids)}")
    finally:
        assert relais.stop() in (0, None), relais.log_tail()


async def post_all(client: httpx.AsyncClient, relais: EmbeddedRelais, bundles: list[dict[str, Any]],
                   accepted: list[str], kill_after: int | None = None) -> None:
    """POST every Bundle (16 at a time); SIGKILL the broker once `kill_after` were accepted.

    A POST that fails because the broker died is sent again after the restart, as a DUI would; only
    202 answers count as accepted.
    """
    queue = list(bundles)
    killed = False
    semaphore = asyncio.Semaphore(16)

    async def one(bundle: dict[str, Any]) -> dict[str, Any] | None:
        nonlocal killed
        async with semaphore:
            if killed:
                return bundle
            try:
                headers = {**AUTH, "Content-Type": "application/fhir+json", "X-Relais-Target": "demo"}
                r = await client.post(f"{relais.url}/fhir", content=orjson.dumps(bundle), headers=headers)
            except httpx.HTTPError:
                return bundle
            if r.status_code != 202:
                return bundle
            accepted.append(r.headers["X-Relais-Transfer-Id"])
            if kill_after is not None and not killed and len(accepted) >= kill_after:
                killed = True
                relais.kill9()
            return None

    leftovers = [b for b in await asyncio.gather(*(one(b) for b in queue)) if b is not None]
    if killed:
        relais.start()  # restart on the same files, as an operator (or systemd) would
    if leftovers:
        await post_all(client, relais, leftovers, accepted)

