"""GET /transfers/{id}: 202 + X-Progress while in flight, 200 with the final word once terminal."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from services.core.outcome import error, operation_outcome, warning
from services.ingress.status import STATUS_EXTENSION_URL, TARGET_EXTENSION_URL, accepted_answer, status_answer
from services.tracker.ledger import DeliveryView, TransferView

T0 = datetime(2025, 5, 1, 8, 0, tzinfo=UTC)
REJECTION = operation_outcome([error("required", "INS missing", "Bundle.entry[1].resource.identifier",
                                     rule="tddui-patient-ins")])
TARGET_OO = operation_outcome([error("invalid", "unknown code", "Bundle.entry[2]")])


def tx_response(*locations: str) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction-response",
            "entry": [{"response": {"status": "201 Created", "location": loc}} for loc in locations]}


def delivery(target: str, status: str, *, attempts: int = 1, response: dict[str, Any] | None = None,
             outcome: dict[str, Any] | None = None, http: int | None = None) -> DeliveryView:
    return DeliveryView(target, status, attempts, response, outcome, http)


def view(status: str, stage: str, *deliveries: DeliveryView,
         outcome: dict[str, Any] | None = None) -> TransferView:
    return TransferView(id="tr-1", producer="dui-acme", status=status, stage_status=stage,
                        targets=[d.target for d in deliveries], outcome=outcome, created_at=T0, updated_at=T0,
                        deliveries=list(deliveries))


def extensions(entry: dict[str, Any]) -> dict[str, str]:
    return {e["url"]: e.get("valueString", e.get("valueCode")) for e in entry["extension"]}


@pytest.mark.parametrize(("transfer", "progress"), [
    (view("accepted", "accepted"), "accepted"),
    (view("validated", "validated"), "validated"),
    (view("routed", "routed"), "routed"),
    (view("delivering", "routed", delivery("a", "pending", attempts=0), delivery("b", "pending", attempts=0)),
     "delivering: 0/2 target(s) done"),
    (view("delivering", "routed", delivery("a", "delivered"), delivery("b", "retrying", attempts=2)),
     "delivering: 1/2 target(s) done, 1 retrying"),
])
def test_in_flight_is_202_with_progress(transfer: TransferView, progress: str) -> None:
    answer = status_answer(transfer)
    assert answer.status == 202
    assert answer.headers["X-Progress"] == progress
    assert answer.headers["Retry-After"].isdigit()
    assert answer.body["resourceType"] == "OperationOutcome"
    issue = answer.body["issue"][0]
    assert issue["severity"] == "information"
    assert "tr-1" in issue["diagnostics"] and progress in issue["diagnostics"]


def test_rejected_is_422_with_the_outcome_of_every_error() -> None:
    """FHIR asynchronous pattern: a request that failed ends in a 4xx with its OperationOutcome."""
    answer = status_answer(view("rejected", "rejected", outcome=REJECTION))
    assert answer.status == 422
    assert answer.body == REJECTION
    assert answer.headers["X-Relais-Status"] == "rejected"


def test_rejected_without_outcome_still_answers_an_operation_outcome() -> None:
    answer = status_answer(view("rejected", "rejected"))
    assert answer.status == 422
    assert answer.body["resourceType"] == "OperationOutcome" and answer.body["issue"]


def test_failed_transfer_is_200_with_its_outcome() -> None:
    failure = operation_outcome([error("exception", "validator could not process this transfer")])
    answer = status_answer(view("dead-lettered", "dead-lettered", outcome=failure))
    assert (answer.status, answer.body) == (200, failure)


def test_delivered_is_a_batch_response_with_each_targets_transaction_response() -> None:
    a, b = tx_response("Patient/1/_history/1"), tx_response("Patient/77/_history/1", "Encounter/5/_history/1")
    answer = status_answer(view("delivered", "routed",
                                delivery("essms-a", "delivered", response=a, http=200),
                                delivery("sidoba", "delivered", attempts=3, response=b, http=201)))
    assert answer.status == 200
    body = answer.body
    assert (body["resourceType"], body["type"]) == ("Bundle", "batch-response")
    assert len(body["entry"]) == 2
    first, second = body["entry"]
    assert extensions(first) == {TARGET_EXTENSION_URL: "essms-a", STATUS_EXTENSION_URL: "delivered"}
    assert first["resource"] == a and first["response"]["status"].startswith("200")
    assert extensions(second) == {TARGET_EXTENSION_URL: "sidoba", STATUS_EXTENSION_URL: "delivered"}
    assert second["resource"] == b and second["response"]["status"].startswith("201")
    assert "outcome" not in first["response"]


def test_delivered_without_recorded_http_status_says_200() -> None:
    entry = status_answer(view("delivered", "routed", delivery("a", "delivered", response=tx_response())))\
        .body["entry"][0]
    assert entry["response"]["status"].startswith("200")


@pytest.mark.parametrize(("dead", "status", "diagnostics"), [
    (delivery("sidoba", "dead-lettered", attempts=1, outcome=TARGET_OO, http=422), "422", "unknown code"),
    (delivery("sidoba", "dead-lettered", attempts=8, http=503), "503", "8 attempt(s)"),
    (delivery("sidoba", "dead-lettered", attempts=8), "502", "8 attempt(s)"),
])
def test_dead_lettered_per_target_has_an_entry_with_its_outcome(dead: DeliveryView, status: str,
                                                                 diagnostics: str) -> None:
    ok = delivery("essms-a", "delivered", response=tx_response("Patient/1"), http=200)
    answer = status_answer(view("dead-lettered", "routed", ok, dead))
    assert answer.status == 200
    assert answer.body["type"] == "batch-response"
    good, bad = answer.body["entry"]
    assert good["resource"]["type"] == "transaction-response"
    assert extensions(bad) == {TARGET_EXTENSION_URL: "sidoba", STATUS_EXTENSION_URL: "dead-lettered"}
    assert "resource" not in bad
    assert bad["response"]["status"].startswith(status)
    outcome = bad["response"]["outcome"]
    assert outcome["resourceType"] == "OperationOutcome"
    assert diagnostics in outcome["issue"][0]["diagnostics"]


def test_accepted_but_not_yet_tracked_is_202_in_progress() -> None:
    answer = accepted_answer("tr-9")
    assert answer.status == 202
    assert answer.headers["X-Relais-Status"] == "accepted" and answer.headers["X-Progress"] == "accepted"
    assert "tr-9" in answer.body["issue"][0]["diagnostics"]


def test_delivered_answer_carries_validation_warnings_and_the_targets_repairs() -> None:
    notes = [
        ("validated", None, {"warnings": 1, "outcome": operation_outcome([
            warning("invalid", "reference outside the Bundle", "Bundle.entry[2].resource.subject",
                    rule="relais-ref-outside")])}),
        ("repaired", "essms-a", {"changes": {"request-url": 1}, "examples": [
            {"expression": "Bundle.entry[0].request.url", "before": "TDDUIPatient", "after": "Patient"}]}),
        ("repaired", "sidoba", {"changes": {"request-url": 1}, "examples": [
            {"expression": "Bundle.entry[5].request.url", "before": "X", "after": "Encounter"}]}),
    ]
    answer = status_answer(view("delivered", "routed",
                                delivery("essms-a", "delivered", response=tx_response("Patient/1"), http=200),
                                delivery("sidoba", "delivered", response=tx_response("Patient/2"), http=200)), notes)
    assert answer.status == 200 and answer.headers["X-Relais-Status"] == "delivered"
    first, second = answer.body["entry"]
    issues = first["response"]["outcome"]["issue"]
    assert [(i["severity"], i["expression"]) for i in issues] == [
        ("warning", ["Bundle.entry[2].resource.subject"]), ("warning", ["Bundle.entry[0].request.url"])]
    assert "TDDUIPatient" in issues[1]["diagnostics"]
    assert [i["expression"] for i in second["response"]["outcome"]["issue"]] == [
        ["Bundle.entry[2].resource.subject"], ["Bundle.entry[5].request.url"]]
