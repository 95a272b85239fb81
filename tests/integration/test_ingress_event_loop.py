"""The ingress never runs CPU-bound work on its event loop: a long `$validate` does not delay a POST /fhir.

A real uvicorn server on the embedded bus; the validation is made slow by burning CPU in pure Python
(holding the GIL as the profile engine does), so the test fails if `$validate` ran it on the loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from services.core.outcome import Issue, information
from services.core.settings import Settings
from services.ingress import validate_api
from tests.fixtures.tddui import make_bundle
from tests.support.ingress import serving
from tests.support.processes import free_port
from tests.support.producers import TOKEN_A, write_producers, write_targets

BURN_S = 2.0
HEADERS = {"Content-Type": "application/fhir+json", "Authorization": f"Bearer {TOKEN_A}"}


async def test_a_slow_validation_does_not_delay_a_concurrent_post(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    started = threading.Event()

    def slow_validation(bundle: dict[str, Any], options: Any) -> list[Issue]:
        started.set()
        deadline = time.monotonic() + BURN_S
        n = 0
        while time.monotonic() < deadline:  # CPU-bound: no sleep, no I/O
            n += sum(range(1000))
        return [information(f"burned {n}")]

    monkeypatch.setattr(validate_api, "validate_bundle", slow_validation)
    port = free_port()
    settings = Settings(producers_file=write_producers(tmp_path / "p.yaml"),
                        targets_file=write_targets(tmp_path / "t.yaml", {"essms-a": "http://127.0.0.1:9/fhir"}),
                        database_url=f"sqlite+aiosqlite:///{tmp_path}/ledger.db",
                        embedded_log_path=tmp_path / "log.db", blob_dir=tmp_path / "blobs", http_port=port)
    body = orjson.dumps(make_bundle(3, seed=1))
    async with serving(settings, f"http://127.0.0.1:{port}") as url, \
            httpx.AsyncClient(base_url=url, headers=HEADERS, timeout=30) as client:
        validating = asyncio.create_task(client.post("/fhir/Bundle/$validate", content=body))
        while not started.is_set():  # the burn has begun (in whichever thread the ingress chose)
            assert not validating.done(), validating.result().text
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        accepted = await client.post("/fhir", content=body, headers={"X-Relais-Target": "essms-a"})
        elapsed = time.monotonic() - t0
        assert accepted.status_code == 202, accepted.text
        assert not validating.done(), "the POST waited for the whole validation"
        assert elapsed < BURN_S / 2, f"POST /fhir took {elapsed:.2f} s behind a {BURN_S} s validation"
        validated = await validating
        assert validated.status_code == 200 and "burned" in validated.text
