"""Every valid transaction-response shape counts as delivered, with the ids the target assigned.

FHIR servers differ in how they answer a transaction: `"201 Created"` (HAPI) or a bare `"201"`
(Medplum), locations absolute or relative, with or without `/_history/vid` (Medplum: relative,
none). Relais must accept them all and report each location as the server wrote it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from services.core.blobstore import LocalBlobStore
from services.core.envelope import Envelope, Record
from services.core.settings import Settings
from services.core.targets import Target, TargetDirectory
from services.core.topics import DELIVERIES, DELIVERIES_DLQ, EVENTS
from services.delivery.journal import AttemptJournal
from services.delivery.repair import assigned_ids
from services.delivery.stage import DeliveryStage, _is_transaction_response
from services.tracker.ledger import Ledger
from tests.fixtures.tddui import make_bundle
from tests.support.scripted_target import Answer, ScriptedTarget, Seen

BASE = "http://fhir.test/fhir"


def medplum_entry(rtype: str, rid: str) -> dict[str, Any]:
    """One entry as Medplum 4.5.2 answers it (tests/e2e/test_medplum.py meets the real thing)."""
    return {"response": {"status": "201", "location": f"{rtype}/{rid}", "outcome": {
        "resourceType": "OperationOutcome", "id": "created",
        "issue": [{"severity": "information", "code": "informational", "details": {"text": "Created"}}]}},
        "resource": {"resourceType": rtype, "id": rid}}


SHAPES: dict[str, Callable[[str, str], dict[str, Any]]] = {
    "medplum: '201', relative, no _history": medplum_entry,
    "hapi: '201 Created', absolute, _history": lambda t, i: {"response": {
        "status": "201 Created", "location": f"{BASE}/{t}/{i}/_history/1", "etag": 'W/"1"'}},
    "'201 Created', relative, _history": lambda t, i: {"response": {
        "status": "201 Created", "location": f"{t}/{i}/_history/1"}},
    "'201', absolute, no _history": lambda t, i: {"response": {"status": "201", "location": f"{BASE}/{t}/{i}"}},
}


def response_for(bundle: dict[str, Any], shape: Callable[[str, str], dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction-response",
            "entry": [shape(e["resource"]["resourceType"], f"new-{n}") for n, e in enumerate(bundle["entry"])]}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_a_transaction_response_of_any_valid_shape_is_one(shape: Callable[[str, str], dict[str, Any]]) -> None:
    bundle = make_bundle(4, seed=3)
    response = response_for(bundle, shape)
    assert _is_transaction_response(response)
    full_urls = [e["fullUrl"] for e in bundle["entry"]]
    assert assigned_ids(full_urls, response) == {
        u: a["response"]["location"] for u, a in zip(full_urls, response["entry"], strict=True)}


@pytest.mark.parametrize("body", [None, {}, {"resourceType": "Bundle", "type": "batch-response"},
                                  {"resourceType": "OperationOutcome"}, {"resourceType": "Bundle"}])
def test_anything_else_is_not_a_transaction_response(body: dict[str, Any] | None) -> None:
    assert not _is_transaction_response(body)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
async def test_delivery_reports_delivered_with_each_location_as_the_target_wrote_it(
        tmp_path: Path, shape: Callable[[str, str], dict[str, Any]]) -> None:
    bundle = make_bundle(5, seed=4, published_style=True)
    seen: list[dict[str, Any]] = []

    def answer(request: Seen) -> Answer:
        sent = request.json()
        seen.append(sent)
        return Answer(200, json=response_for(sent, shape))

    emits = await deliver(tmp_path, bundle, answer)
    assert len(seen) == 1
    assert [e["request"]["url"] for e in seen[0]["entry"]] == [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert not [e for e in emits if e.topic == DELIVERIES_DLQ]
    (delivered,) = [orjson.loads(e.envelope.data) for e in emits
                    if e.topic == EVENTS and e.envelope.type == "fr.relais.event.delivered"]
    expected = response_for(seen[0], shape)
    assert delivered["assigned"] == {
        sent["fullUrl"]: answered["response"]["location"]
        for sent, answered in zip(bundle["entry"], expected["entry"], strict=True)}


async def test_a_2xx_without_a_transaction_response_is_not_delivered(tmp_path: Path) -> None:
    emits = await deliver(tmp_path, make_bundle(3, seed=5),
                          lambda _: Answer(200, json={"resourceType": "OperationOutcome", "issue": []}))
    assert [e for e in emits if e.topic == DELIVERIES_DLQ]
    assert not [e for e in emits if e.envelope.type == "fr.relais.event.delivered"]


async def deliver(tmp_path: Path, bundle: dict[str, Any],
                  answer: Callable[[Seen], Answer]) -> list[Any]:
    async with ScriptedTarget(answer) as server:
        return await _deliver(tmp_path, bundle, server)


async def _deliver(tmp_path: Path, bundle: dict[str, Any], server: ScriptedTarget) -> list[Any]:
    # Conditional create off: no CapabilityStatement read (this process may or may not have one cached for "t").
    target = Target(id="t", base_url=server.base_url, conditional_create="off")
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/l.db", retry_delays_s=[0.2, 0.5],
                        max_attempts=2, auth_disabled=True, log_format="console")
    ledger = Ledger(settings.database_url)
    await ledger.create_schema()
    stage = DeliveryStage(settings, TargetDirectory(targets=[target]), LocalBlobStore(tmp_path / "blobs"),
                          AttemptJournal(ledger))
    env = Envelope(type="fr.relais.delivery", source="/relais/router", transfer_id="tr-1",
                   data=orjson.dumps(bundle), producer="p", target="t")
    try:
        return list(await stage.handle(Record(DELIVERIES, 0, 0, b"tr-1", env)))
    finally:
        await stage.aclose()
        await ledger.close()


async def test_a_transaction_run_as_a_batch_with_a_failed_entry_is_not_delivered(tmp_path: Path) -> None:
    # Medplum without transactions enabled answers 200 transaction-response with per-entry statuses.
    partial = {"resourceType": "Bundle", "type": "transaction-response", "entry": [
        {"response": {"status": "400", "outcome": {"resourceType": "OperationOutcome", "issue": []}}},
        {"response": {"status": "201", "location": "Patient/1"}},
        {"response": {"status": "201", "location": "Encounter/2"}}]}
    emits = await deliver(tmp_path, make_bundle(3, seed=6), lambda _: Answer(200, json=partial))
    assert [e for e in emits if e.topic == DELIVERIES_DLQ]
    assert not [e for e in emits if e.envelope.type == "fr.relais.event.delivered"]
