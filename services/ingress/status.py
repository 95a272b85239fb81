"""What `GET /transfers/{id}` answers, as a pure function of the ledger's view (FHIR async pattern)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.core.outcome import RELAIS_CANONICAL, information, operation_outcome
from services.tracker import logic
from services.tracker.ledger import DeliveryView, TransferView

TARGET_EXTENSION_URL = f"{RELAIS_CANONICAL}/StructureDefinition/delivery-target"
STATUS_EXTENSION_URL = f"{RELAIS_CANONICAL}/StructureDefinition/delivery-status"
ASSIGNED_EXTENSION_URL = f"{RELAIS_CANONICAL}/StructureDefinition/assigned-id"


@dataclass(frozen=True, slots=True)
class StatusAnswer:
    """An HTTP answer: status code, headers, FHIR JSON body."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def status_answer(view: TransferView) -> StatusAnswer:
    """202 + X-Progress while in flight; 200 with the final outcome once terminal."""
    if view.status not in logic.TERMINAL:
        text = logic.progress(view.stage_status, [d.status for d in view.deliveries])
        body = operation_outcome([information(f"transfer {view.id} is in progress: {text}")])
        return StatusAnswer(202, body, {"X-Progress": text, "Retry-After": "1"})
    if view.status == logic.REJECTED:
        return StatusAnswer(200, view.outcome or operation_outcome([]))
    if view.status == logic.DEAD_LETTERED and view.outcome:
        return StatusAnswer(200, view.outcome)
    return StatusAnswer(200, _per_target_bundle(view))


def _per_target_bundle(view: TransferView) -> dict[str, Any]:
    """A batch-response Bundle: one entry per target carrying its transaction-response or its failure."""
    return {
        "resourceType": "Bundle",
        "type": "batch-response",
        "entry": [_entry(d) for d in view.deliveries],
    }


def _entry(d: DeliveryView) -> dict[str, Any]:
    extensions: list[dict[str, Any]] = [{"url": TARGET_EXTENSION_URL, "valueString": d.target},
                                        {"url": STATUS_EXTENSION_URL, "valueCode": d.status}]
    if d.status == logic.DELIVERED:
        # TDDUI: the producer must learn the ids the target assigned, per resource it sent.
        extensions += [{"url": ASSIGNED_EXTENSION_URL, "extension": [
            {"url": "fullUrl", "valueUri": original}, {"url": "location", "valueUri": location}]}
            for original, location in (d.assigned or {}).items()]
        return {"extension": extensions, "resource": d.response,
                "response": {"status": f"{d.last_http_status or 200}"}}
    if d.status == logic.DELIVERED_UNCONFIRMED:
        # Applied by the target (a probe found its resources) but its transaction-response was lost.
        return {"extension": extensions, "response": {"status": "200", "outcome": d.outcome or operation_outcome(
            [information(f"{d.target} applied the transaction but its answer was lost; the resources were "
                         "found on the target by their business identifiers, the ids it assigned are not known")])}}
    outcome = d.outcome or operation_outcome([information(
        f"delivery to {d.target} failed after {d.attempts} attempt(s); an operator can replay it")])
    return {"extension": extensions,
            "response": {"status": str(d.last_http_status or 502), "outcome": outcome}}
