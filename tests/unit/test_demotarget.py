"""The demo FHIR target: transaction responses, refusals, fault injection, records, and a real process."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from devtools.demotarget.app import ConnectionDropped, TargetState, create_app

REPO = Path(__file__).resolve().parents[2]
FHIR_JSON = {"Content-Type": "application/fhir+json"}
IDENT_SYSTEM = "urn:oid:1.2.250.1.213.1.4.8"

PATIENT = {
    "resourceType": "Patient",
    "identifier": [{"system": IDENT_SYSTEM, "value": "1234567890123"}],
    "name": [{"family": "Durand", "given": ["Alice"]}],
}
OBSERVATION = {
    "resourceType": "Observation",
    "status": "final",
    "code": {"text": "poids"},
    "identifier": [{"system": "urn:relais:test", "value": "obs-1"}],
}


def bundle(*resources: dict[str, Any], bundle_type: str = "transaction") -> dict[str, Any]:
    """A transaction Bundle whose request.url is a profile name, as some real exports fill it."""
    return {
        "resourceType": "Bundle",
        "type": bundle_type,
        "entry": [
            {
                "fullUrl": f"urn:uuid:00000000-0000-4000-8000-{i:012d}",
                "resource": r,
                "request": {"method": "POST", "url": f"TDDUI{r['resourceType']}"},
            }
            for i, r in enumerate(resources)
        ],
    }


def assert_outcome(response: httpx.Response, status: int, code: str) -> None:
    """The response is a FHIR OperationOutcome error with that status and issue code."""
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["severity"] == "error"
    assert body["issue"][0]["code"] == code
    assert body["issue"][0]["diagnostics"]


@pytest.fixture
def state() -> TargetState:
    return TargetState()


@pytest.fixture
async def client(state: TargetState) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://target") as c:
        yield c


async def post_tx(
    client: httpx.AsyncClient, request_id: str | None = None, extra_headers: dict[str, str] | None = None
) -> httpx.Response:
    """POST the standard two-entry transaction."""
    headers = {**FHIR_JSON, **(extra_headers or {})}
    if request_id:
        headers["X-Request-Id"] = request_id
    return await client.post("/fhir", json=bundle(PATIENT, OBSERVATION), headers=headers)


async def test_transaction_response_has_one_created_entry_per_entry(client: httpx.AsyncClient) -> None:
    before = datetime.now(UTC)
    response = await post_tx(client)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    assert body["resourceType"] == "Bundle"
    assert body["type"] == "transaction-response"
    entries = [e["response"] for e in body["entry"]]
    assert len(entries) == 2
    # The type comes from the resource, not from request.url ("TDDUIPatient").
    assert re.fullmatch(r"Patient/[0-9a-f]{32}/_history/1", entries[0]["location"])
    assert re.fullmatch(r"Observation/[0-9a-f]{32}/_history/1", entries[1]["location"])
    for entry in entries:
        assert entry["status"] == "201 Created"
        assert entry["etag"] == 'W/"1"'
        modified = datetime.fromisoformat(entry["lastModified"])
        assert before - timedelta(seconds=1) <= modified <= datetime.now(UTC) + timedelta(seconds=1)

    rtype, rid, _, _ = entries[0]["location"].split("/")
    read = await client.get(f"/fhir/{rtype}/{rid}")
    assert read.status_code == 200
    assert read.json()["id"] == rid
    assert read.json()["meta"]["versionId"] == "1"
    assert read.json()["name"] == PATIENT["name"]


async def test_trailing_slash_is_the_same_endpoint(client: httpx.AsyncClient) -> None:
    response = await client.post("/fhir/", json=bundle(PATIENT), headers={"Content-Type": "application/json"})
    assert response.status_code == 200
    assert len(response.json()["entry"]) == 1


async def test_search_by_identifier_finds_created_resources(client: httpx.AsyncClient) -> None:
    await post_tx(client)

    async def total(rtype: str, identifier: str) -> int:
        response = await client.get(f"/fhir/{rtype}", params={"identifier": identifier})
        assert response.status_code == 200
        assert response.json()["type"] == "searchset"
        return int(response.json()["total"])

    assert await total("Patient", f"{IDENT_SYSTEM}|1234567890123") == 1
    assert await total("Patient", "1234567890123") == 1
    assert await total("Patient", "urn:other|1234567890123") == 0
    assert await total("Observation", f"{IDENT_SYSTEM}|1234567890123") == 0
    assert await total("Observation", "urn:relais:test|obs-1") == 1


async def test_search_by_tag_finds_only_the_marked_transfer(client: httpx.AsyncClient) -> None:
    marked = {**PATIENT, "meta": {"tag": [{"system": "urn:relais:transfer", "code": "tr-1"}]}}
    await client.post("/fhir", json=bundle(marked, OBSERVATION), headers=FHIR_JSON)
    await post_tx(client)  # same identifiers, no marker

    async def total(rtype: str, tag: str) -> int:
        response = await client.get(f"/fhir/{rtype}", params={"_tag": tag, "_count": "1000"})
        assert response.status_code == 200
        return int(response.json()["total"])

    assert await total("Patient", "urn:relais:transfer|tr-1") == 1
    assert await total("Patient", "tr-1") == 1
    assert await total("Patient", "urn:relais:transfer|tr-2") == 0
    assert await total("Observation", "urn:relais:transfer|tr-1") == 0


async def test_a_target_without_search_refuses_it_with_an_outcome() -> None:
    transport = httpx.ASGITransport(app=create_app(TargetState(), search=False))
    async with httpx.AsyncClient(transport=transport, base_url="http://target") as c:
        assert_outcome(await c.get("/fhir/Patient", params={"_tag": "a|b"}), 400, "not-supported")
        assert (await c.post("/fhir", json=bundle(PATIENT), headers=FHIR_JSON)).status_code == 200


async def test_read_unknown_resource_is_404(client: httpx.AsyncClient) -> None:
    assert_outcome(await client.get("/fhir/Patient/nope"), 404, "not-found")


@pytest.mark.parametrize(
    "body",
    [
        b"not json at all",
        b"[1, 2]",
        b'{"resourceType": "Patient"}',
        b'{"resourceType": "Bundle", "type": "batch", "entry": []}',
        b'{"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {"method": "POST"}}]}',
    ],
    ids=["not-json", "not-object", "not-bundle", "batch", "entry-without-resource"],
)
async def test_invalid_transaction_is_400_operation_outcome(
    client: httpx.AsyncClient, state: TargetState, body: bytes
) -> None:
    response = await client.post("/fhir", content=body, headers=FHIR_JSON)

    assert_outcome(response, 400, "invalid")
    assert [(r.status, r.applied) for r in state.received] == [(400, False)]
    assert state.store == {}


async def test_non_json_content_type_is_415(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/fhir", content=b"<Bundle/>", headers={"Content-Type": "application/fhir+xml"}
    )
    assert_outcome(response, 415, "invalid")


async def test_fault_with_count_answers_retry_after_then_recovers(
    client: httpx.AsyncClient, state: TargetState
) -> None:
    queued = await client.post("/_faults", json={"status": 503, "count": 2, "retry_after": "2"})
    assert queued.status_code == 201

    for _ in range(2):
        response = await post_tx(client)
        assert_outcome(response, 503, "transient")
        assert response.headers["retry-after"] == "2"
    recovered = await post_tx(client)

    assert recovered.status_code == 200
    assert "retry-after" not in recovered.headers
    assert [(r.status, r.applied) for r in state.received] == [(503, False), (503, False), (200, True)]
    assert (await client.get("/_faults")).json() == []


async def test_faults_are_used_in_queue_order_with_their_own_body(client: httpx.AsyncClient) -> None:
    custom = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "business-rule", "diagnostics": "unknown establishment"}],
    }
    await client.post("/_faults", json={"status": 429, "retry_after": 1})
    await client.post("/_faults", json={"status": 422, "body": custom})

    first, second, third = [await post_tx(client) for _ in range(3)]

    assert_outcome(first, 429, "transient")
    assert first.headers["retry-after"] == "1"
    assert second.status_code == 422
    assert second.json() == custom
    assert third.status_code == 200


async def test_fault_until_cleared_leaves_control_endpoints_alone(client: httpx.AsyncClient) -> None:
    await client.post("/_faults", json={"status": 500, "count": -1})

    for _ in range(3):
        assert (await post_tx(client)).status_code == 500
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/fhir/metadata")).status_code == 200
    assert (await client.get("/_received", params={"summary": 1})).json()["total"] == 3
    assert len((await client.get("/_faults")).json()) == 1

    assert (await client.delete("/_faults")).status_code == 204
    assert (await post_tx(client)).status_code == 200


async def test_apply_then_stores_the_transaction_but_answers_504(
    client: httpx.AsyncClient, state: TargetState
) -> None:
    await client.post("/_faults", json={"apply_then": 504})

    response = await post_tx(client, "req-1")

    assert_outcome(response, 504, "transient")
    search = await client.get("/fhir/Patient", params={"identifier": f"{IDENT_SYSTEM}|1234567890123"})
    assert search.json()["total"] == 1
    summary = (await client.get("/_received", params={"summary": "1"})).json()
    assert summary == {"total": 1, "applied": 1, "by_request_id": {"req-1": 1}}
    # A blind retry creates a duplicate: exactly what the broker's duplicate probe must avoid.
    assert (await post_tx(client, "req-1")).status_code == 200
    search = await client.get("/fhir/Patient", params={"identifier": f"{IDENT_SYSTEM}|1234567890123"})
    assert search.json()["total"] == 2


async def test_delay_makes_the_target_slow(client: httpx.AsyncClient) -> None:
    await client.post("/_faults", json={"delay_s": 0.2})

    started = time.monotonic()
    response = await post_tx(client)

    assert response.status_code == 200
    assert time.monotonic() - started >= 0.2


async def test_drop_without_a_tcp_connection_raises_after_recording(
    client: httpx.AsyncClient, state: TargetState
) -> None:
    await client.post("/_faults", json={"status": "drop"})

    with pytest.raises(ConnectionDropped):
        await post_tx(client, "req-drop")

    assert [(r.request_id, r.status, r.applied) for r in state.received] == [("req-drop", "drop", False)]
    assert state.received[0].parsed_body() == bundle(PATIENT, OBSERVATION)


@pytest.mark.parametrize(
    "fault",
    [
        [503],
        {"status": 42},
        {"status": "boom"},
        {"status": 503, "apply_then": 504},
        {"status": 503, "count": 0},
        {"status": 503, "count": "3"},
        {"status": 503, "delay_s": -1},
        {"status": 503, "body": "oops"},
        {"status": 503, "colour": "red"},
    ],
)
async def test_nonsense_fault_is_refused(client: httpx.AsyncClient, state: TargetState, fault: Any) -> None:
    assert_outcome(await client.post("/_faults", json=fault), 400, "invalid")
    assert not state.faults


async def test_received_lists_bodies_and_counts_per_request_id(client: httpx.AsyncClient) -> None:
    for request_id in ("a", "a", "b", None):
        await post_tx(client, request_id, {"Authorization": "Bearer t0k3n"})

    listed = (await client.get("/_received")).json()
    assert [r["request_id"] for r in listed] == ["a", "a", "b", None]
    assert all(r["status"] == 200 for r in listed)
    assert listed[0]["body"] == bundle(PATIENT, OBSERVATION)
    assert listed[0]["headers"]["authorization"] == "Bearer t0k3n"
    assert datetime.fromisoformat(listed[0]["time"]).tzinfo is not None

    summary = (await client.get("/_received", params={"summary": 1})).json()
    assert summary == {"total": 4, "applied": 4, "by_request_id": {"a": 2, "b": 1, "": 1}}

    assert (await client.delete("/_received")).status_code == 204
    assert (await client.get("/_received")).json() == []
    assert (await client.get("/fhir/Patient")).json()["total"] == 0


async def test_metadata_and_health(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    cap = (await client.get("/fhir/metadata")).json()
    assert cap["resourceType"] == "CapabilityStatement"
    assert (cap["status"], cap["kind"], cap["fhirVersion"]) == ("active", "instance", "4.0.1")
    assert cap["rest"][0]["mode"] == "server"
    assert {"code": "transaction"} in cap["rest"][0]["interaction"]


def _read_line(stream: Any, timeout_s: float) -> str:
    """One line from a child's pipe, failing instead of hanging when the child says nothing."""
    ready, _, _ = select.select([stream], [], [], timeout_s)
    assert ready, "demo target printed nothing"
    return str(stream.readline())


def test_real_process_serves_transactions_and_drops_connections() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "devtools.demotarget", "--port", "0"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = _read_line(proc.stderr, 20)
        match = re.fullmatch(r"demo FHIR target listening on http://127\.0\.0\.1:(\d+)/fhir\n", line)
        assert match, line
        base = f"http://127.0.0.1:{match[1]}"
        tx = bundle(PATIENT, OBSERVATION)

        with httpx.Client(base_url=base, timeout=10) as client:
            ok = client.post("/fhir", json=tx, headers={**FHIR_JSON, "X-Request-Id": "real-1"})
            assert ok.status_code == 200
            assert ok.json()["entry"][0]["response"]["status"] == "201 Created"
            assert client.post("/_faults", json={"status": "drop"}).status_code == 201

        # A fresh connection, so the failure cannot be blamed on a stale pooled one.
        with (
            httpx.Client(base_url=base, timeout=10) as client,
            pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)),
        ):
            client.post("/fhir", json=tx, headers={**FHIR_JSON, "X-Request-Id": "real-2"})

        with httpx.Client(base_url=base, timeout=10) as client:
            received = client.get("/_received").json()
        assert [(r["request_id"], r["status"], r["applied"]) for r in received] == [
            ("real-1", 200, True),
            ("real-2", "drop", False),
        ]
        assert received[1]["body"] == tx
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.stderr is not None
        rest = proc.stderr.read()
        proc.stderr.close()
    # uvicorn exits by re-raising the SIGTERM it handled gracefully.
    assert proc.returncode in (0, -signal.SIGTERM)
    # Nothing else was written: no traceback, no uvicorn 500, and above all no health data.
    assert rest == ""
