"""The same POST three times with one Idempotency-Key, and once more after a restart: one transfer, one
delivery at the target (counted there, by content); a different body under that key: 422."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import orjson
import pytest

from tests.fixtures.tddui import make_bundle
from tests.support.embedded import EmbeddedRelais

pytestmark = pytest.mark.e2e
HEADERS = {"Authorization": "Bearer demo-token", "Content-Type": "application/fhir+json", "X-Relais-Target": "demo",
           "Idempotency-Key": '"dui-export-2025-05-01-0042"'}


def test_one_key_is_one_transfer_and_one_delivery_across_retries_and_a_restart(tmp_path: Path) -> None:
    relais = EmbeddedRelais(tmp_path)
    relais.start_target()
    relais.start()
    bundle = make_bundle(6, seed=61_000)
    body = orjson.dumps(bundle)
    try:
        answers = [httpx.post(f"{relais.url}/fhir", content=body, headers=HEADERS, timeout=30) for _ in range(3)]
        assert relais.proc is not None
        relais.proc.terminate()
        relais.proc.wait(60)
        relais.start()  # a restart: keys live in the ledger database
        answers.append(httpx.post(f"{relais.url}/fhir", content=body, headers=HEADERS, timeout=30))
        different = httpx.post(f"{relais.url}/fhir", content=orjson.dumps(make_bundle(6, seed=61_001)),
                               headers=HEADERS, timeout=30)
        assert [a.status_code for a in answers] == [202] * 4, [a.text for a in answers]
        assert len({a.headers["Content-Location"] for a in answers}) == 1
        assert different.status_code == 422 and different.json()["resourceType"] == "OperationOutcome"

        location = answers[0].headers["Content-Location"]
        deadline = time.monotonic() + 60
        status = httpx.get(location, headers=HEADERS, timeout=10)
        while status.status_code == 202 and time.monotonic() < deadline:
            time.sleep(0.3)
            status = httpx.get(location, headers=HEADERS, timeout=10)
        assert status.status_code == 200 and status.headers["X-Relais-Status"] == "delivered", status.text
        time.sleep(2)  # anything sent twice would have arrived by now (retry tiers of 0.5-2 s)
        received = httpx.get(f"http://127.0.0.1:{relais.target_port}/_received", timeout=10).json()
        same = [r for r in received if r["body"]["identifier"] == bundle["identifier"]]
        assert len(same) == 1, [r["request_id"] for r in same]
    finally:
        relais.stop()
