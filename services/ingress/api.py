"""The ingress's routes (an APIRouter, assembled by services.app): `POST /fhir`, the status URL, metadata, probes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services import __version__
from services.core.errors import TransientError
from services.core.outcome import error
from services.http.auth import note_refusal
from services.http.responses import fhir_response, json_response, outcome_response
from services.ingress import security, submissions
from services.ingress.accept import accept
from services.ingress.checks import Refusal
from services.ingress.producers import Producer
from services.ingress.state import IngressState, ingress_state
from services.ingress.status import STATUS_PATH, StatusAnswer, accepted_answer, status_answer

router = APIRouter()


@router.post("/fhir", status_code=202, summary="Accept a TDDUI transaction Bundle (FHIR POST [base])")
@router.post("/fhir/", include_in_schema=False)
async def accept_transfer(request: Request) -> Response:
    try:
        return await accept(ingress_state(request), request)
    except Refusal as refusal:
        if refusal.status == 403:  # authenticated, but not for this target or ESSMS: audited like a 401
            note_refusal(request, "ingress", 403, "; ".join(i.diagnostics for i in refusal.issues))
        return outcome_response(refusal.status, refusal.issues, dict(refusal.headers))


# The status URL lives under the FHIR base, so FHIR clients follow it as one of the server's own URLs.
@router.get(STATUS_PATH + "/{transfer_id}", summary="A transfer's status (FHIR asynchronous pattern)")
@router.get("/transfers/{transfer_id}", summary="A transfer's status (alias of /fhir/_transfer/{transfer_id})")
async def transfer_status(transfer_id: str, request: Request) -> Response:
    state = ingress_state(request)
    try:
        producer = security.caller(state, request).producer
    except Refusal as refusal:
        return outcome_response(refusal.status, refusal.issues, dict(refusal.headers))
    try:
        answer = await _status_of(state, transfer_id, producer)
    except TransientError:
        return outcome_response(503, [error("transient", "the ledger is unavailable; retry shortly")],
                                {"Retry-After": str(state.settings.retry_after_s)})
    if answer is None:
        return outcome_response(404, [error(
            "not-found", f"no transfer {transfer_id} for this producer", rule="relais-status-unknown")])
    return fhir_response(answer.status, answer.body, answer.headers)


@router.get("/metadata", summary="CapabilityStatement of this Relais")
@router.get("/fhir/metadata", include_in_schema=False)
async def metadata() -> Response:
    return fhir_response(200, capability_statement())


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get("/readyz", summary="Readiness: the bus is connected and its storage takes writes")
async def readyz(request: Request) -> Response:
    state = ingress_state(request)
    # e.g. the embedded log cannot be written (read-only), or a data disk is full though a probe row still fits
    storage = await state.bus.storage_problem() or state.storage_full()
    ready = state.bus_ready.is_set() and storage is None
    body = {"status": "ready" if ready else storage or "waiting for Kafka", "kafka": state.bus_ready.is_set(),
            "storage": storage or "ok"}
    return json_response(body, 200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def _status_of(state: IngressState, transfer_id: str, producer: Producer) -> StatusAnswer | None:
    """The tracker's view when it has one, else what ingress recorded before its 202; None: unknown here."""
    view = await state.ledger.get(transfer_id)
    if view is not None:
        if state.producers is not None and view.producer != producer.id:
            return None
        return status_answer(view, await state.ledger.warnings(transfer_id))
    row = await submissions.lookup(state.ledger, transfer_id)
    if row is None or row["state"] == submissions.FAILED or (
            state.producers is not None and row["producer"] != producer.id):
        return None
    return accepted_answer(transfer_id)


def capability_statement() -> dict[str, Any]:
    """What this Relais offers: transactions conforming to TDDUI, JSON only."""
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": datetime.now(UTC).date().isoformat(),
        "kind": "instance",
        "software": {"name": "Relais", "version": __version__},
        "implementation": {"description": "Relais — asynchronous broker for TDDUI transfers"},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "implementationGuide": ["https://interop.esante.gouv.fr/ig/fhir/tddui"],
        "rest": [{
            "mode": "server",
            "documentation": "POST a TDDUI transaction Bundle to [base]; name targets in X-Relais-Target; "
                             "the 202 answer's Content-Location is the status URL (FHIR asynchronous pattern).",
            "security": {"cors": False, "description": "Bearer token per producer (RELAIS_PRODUCERS_FILE)."},
            "interaction": [{"code": "transaction",
                             "documentation": "https://interop.esante.gouv.fr/ig/fhir/tddui/StructureDefinition/tddui-bundle"}],
        }],
    }
