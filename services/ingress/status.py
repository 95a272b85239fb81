"""What the status URL answers, as a pure function of the ledger's view (FHIR asynchronous pattern).

In flight: 202 + `X-Progress`. Rejected: 422 with the OperationOutcome of every error (a failed
asynchronous request ends in 4xx). Delivered or dead-lettered: 200 with a batch-response Bundle, one
entry per target; a delivered target's entry carries, in `response.outcome`, the warnings the producer
should know (the validator's, and the envelope repairs Relais made for that target). Every answer says
the transfer's state in `X-Relais-Status` for scripts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from services.core.outcome import RELAIS_CANONICAL, Issue, information, operation_outcome
from services.tracker import logic
from services.tracker.ledger import DeliveryView, TransferView

TARGET_EXTENSION_URL = f"{RELAIS_CANONICAL}/StructureDefinition/delivery-target"
STATUS_EXTENSION_URL = f"{RELAIS_CANONICAL}/StructureDefinition/delivery-status"
ASSIGNED_EXTENSION_URL = f"{RELAIS_CANONICAL}/StructureDefinition/assigned-id"
# The 202's OperationOutcome carries the status URL too, for FHIR clients that do not show headers.
STATUS_URL_EXTENSION = f"{RELAIS_CANONICAL}/StructureDefinition/transfer-status-url"
STATUS_PATH = "/fhir/_transfer"  # under the FHIR base: clients treat it as one of the server's own URLs
STATE_HEADER = "X-Relais-Status"
REJECTED_STATUS = 422

# (event kind, target, detail) as Ledger.warnings returns them.
Note = tuple[str, str | None, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class StatusAnswer:
    """An HTTP answer: status code, headers, FHIR JSON body."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def accepted_answer(transfer_id: str) -> StatusAnswer:
    """A transfer ingress accepted that the tracker has not projected yet: in progress, never 404."""
    return _in_progress(transfer_id, logic.ACCEPTED, logic.ACCEPTED)


def status_answer(view: TransferView, notes: Sequence[Note] = ()) -> StatusAnswer:
    """202 + X-Progress while in flight; the final outcome once terminal (422 when rejected)."""
    if view.status not in logic.TERMINAL:
        return _in_progress(view.id, logic.progress(view.stage_status, [d.status for d in view.deliveries]),
                            view.status)
    final = {STATE_HEADER: view.status}
    if view.status == logic.REJECTED:
        return StatusAnswer(REJECTED_STATUS, view.outcome or operation_outcome([]), final)
    if view.status == logic.DEAD_LETTERED and view.outcome:
        return StatusAnswer(200, view.outcome, final)
    return StatusAnswer(200, _per_target_bundle(view, notes), final)


def _in_progress(transfer_id: str, text: str, state: str) -> StatusAnswer:
    body = operation_outcome([information(f"transfer {transfer_id} is in progress: {text}")])
    return StatusAnswer(202, body, {"X-Progress": text, "Retry-After": "1", STATE_HEADER: state})


def warnings_for(target: str, notes: Sequence[Note]) -> list[Issue]:
    """What the producer should hear about a delivered transfer: validation warnings, then this target's repairs."""
    issues: list[Issue] = []
    for kind, where, detail in notes:
        if kind == "validated":
            found = detail.get("outcome")
            outcome: dict[str, Any] = found if isinstance(found, dict) else {}
            issues += [Issue.from_fhir(i) for i in outcome.get("issue") or []
                       if isinstance(i, dict) and i.get("severity") in ("warning", "information")]
        elif kind == "repaired" and where == target:
            for change in detail.get("examples") or []:
                if not isinstance(change, dict):
                    continue
                expression = str(change.get("expression") or "Bundle")
                issues.append(Issue("warning", "processing", f"Relais repaired {expression} for {target}: "
                                    f"{change.get('before')!r} became {change.get('after')!r}", (expression,),
                                    rule="relais-delivery-repair"))
    return issues


def _per_target_bundle(view: TransferView, notes: Sequence[Note]) -> dict[str, Any]:
    """A batch-response Bundle: one entry per target carrying its transaction-response or its failure."""
    return {
        "resourceType": "Bundle",
        "type": "batch-response",
        "entry": [_entry(d, warnings_for(d.target, notes)) for d in view.deliveries],
    }


def _entry(d: DeliveryView, warnings: list[Issue]) -> dict[str, Any]:
    extensions: list[dict[str, Any]] = [{"url": TARGET_EXTENSION_URL, "valueString": d.target},
                                        {"url": STATUS_EXTENSION_URL, "valueCode": d.status}]
    if d.status == logic.DELIVERED:
        # TDDUI: the producer must learn the ids the target assigned, per resource it sent.
        extensions += [{"url": ASSIGNED_EXTENSION_URL, "extension": [
            {"url": "fullUrl", "valueUri": original}, {"url": "location", "valueUri": location}]}
            for original, location in (d.assigned or {}).items()]
        response: dict[str, Any] = {"status": f"{d.last_http_status or 200}"}
        if warnings:
            response["outcome"] = operation_outcome(warnings)
        return {"extension": extensions, "resource": d.response, "response": response}
    if d.status == logic.DELIVERED_UNCONFIRMED:
        # Applied by the target (a probe found its resources) but its transaction-response was lost.
        return {"extension": extensions, "response": {"status": "200", "outcome": d.outcome or operation_outcome(
            [information(f"{d.target} applied the transaction but its answer was lost; the resources were "
                         "found on the target by the transfer's marker (meta.tag); the ids it assigned are not "
                         "known")])}}
    outcome = d.outcome or operation_outcome([information(
        f"delivery to {d.target} failed after {d.attempts} attempt(s); an operator can replay it")])
    return {"extension": extensions,
            "response": {"status": str(d.last_http_status or 502), "outcome": outcome}}
