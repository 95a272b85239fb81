"""The DUI's contract with a FHIR client library: fhirpy (sync and async) posts, polls the status URL it
was given, and reads the final answer — with no workaround: no 404 to tolerate, no URL to rewrite.

`relais run` (embedded log) delivers to the demo target. The official-style example (profile names
in request.url) is delivered with Relais's repairs, and its final answer carries them as warnings;
an invalid Bundle ends in 422 with the OperationOutcome of its errors (FHIR's asynchronous pattern).
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from fhirpy import AsyncFHIRClient, SyncFHIRClient
from fhirpy.base.exceptions import OperationOutcome

from services.ingress.status import STATUS_URL_EXTENSION
from tests.support.embedded import EmbeddedRelais
from tests.support.processes import REPO

pytestmark = pytest.mark.e2e
EXAMPLE = orjson.loads((REPO / "examples" / "bundle-published-style.json").read_bytes())
HEADERS = {"X-Relais-Target": "demo"}
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def relais(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRelais]:
    running = EmbeddedRelais(tmp_path_factory.mktemp("fhirpy"))
    running.start_target()
    running.start()
    yield running
    running.stop()


def status_url(accepted: Any) -> str:
    """The status URL a 202's OperationOutcome carries (the same as its Content-Location)."""
    assert accepted["resourceType"] == "OperationOutcome", accepted
    [url] = [e["valueUrl"] for e in accepted["extension"] if e["url"] == STATUS_URL_EXTENSION]
    return str(url)


def invalid_bundle() -> dict[str, Any]:
    bundle = copy.deepcopy(EXAMPLE)
    bundle.pop("identifier")
    bundle["entry"][1]["request"]["method"] = "PUT"  # TDDUI exports only create
    return bundle


def check_delivered(final: Any) -> None:
    assert final["resourceType"] == "Bundle" and final["type"] == "batch-response", final
    [entry] = final["entry"]
    assert entry["resource"]["type"] == "transaction-response"
    warnings = entry["response"]["outcome"]["issue"]
    assert {"Bundle.entry[0].request.url"} <= {x for w in warnings for x in w.get("expression", [])}, warnings
    assert all(w["severity"] in ("warning", "information") for w in warnings)


def test_fhirpy_sync_client_posts_polls_and_reads_the_final_answer(relais: EmbeddedRelais) -> None:
    client = SyncFHIRClient(f"{relais.url}/fhir", authorization="Bearer demo-token", extra_headers=HEADERS)
    url = status_url(client.execute("", method="post", data=EXAMPLE))
    deadline = time.monotonic() + TIMEOUT_S
    answer = client.execute(url, method="get")  # at once: in progress, never "not found"
    while answer["resourceType"] == "OperationOutcome" and time.monotonic() < deadline:
        assert answer["issue"][0]["severity"] == "information", answer
        time.sleep(0.5)
        answer = client.execute(url, method="get")
    check_delivered(answer)

    rejected = status_url(client.execute("", method="post", data=invalid_bundle()))
    with pytest.raises(OperationOutcome) as refused:
        while time.monotonic() < deadline:
            client.execute(rejected, method="get")  # 202 until the validator rejects it: then 422
            time.sleep(0.5)
    issues = refused.value.resource["issue"]
    assert any(i["severity"] == "error" and i.get("expression") for i in issues), issues


async def test_fhirpy_async_client_posts_polls_and_reads_the_final_answer(relais: EmbeddedRelais) -> None:
    client = AsyncFHIRClient(f"{relais.url}/fhir", authorization="Bearer demo-token", extra_headers=HEADERS)
    url = status_url(await client.execute("", method="post", data=EXAMPLE))
    deadline = time.monotonic() + TIMEOUT_S
    answer = await client.execute(url, method="get")
    while answer["resourceType"] == "OperationOutcome" and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        answer = await client.execute(url, method="get")
    check_delivered(answer)

    rejected = status_url(await client.execute("", method="post", data=invalid_bundle()))
    with pytest.raises(OperationOutcome):
        while time.monotonic() < deadline:
            await client.execute(rejected, method="get")
            await asyncio.sleep(0.5)

