"""The ingress's routes (an APIRouter, assembled by services.app): `POST /fhir`, the status URL, metadata, probes.

`POST /fhir` (`accept`): a transfer accepted once the ledger database and the bus hold it, or refused with a
reason.
"""

from __future__ import annotations

import contextlib
import hashlib
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from services import __version__
from services.core.envelope import JSON, Emit, Envelope, join_csv
from services.core.errors import BusUnavailable, TransientError
from services.core.logging import get_logger
from services.core.outcome import error, information, operation_outcome
from services.core.person import person_key
from services.core.settings import Settings
from services.core.topics import EVENTS, RECEIVED
from services.http.auth import note_refusal
from services.http.responses import fhir_response, json_response, outcome_response
from services.ingress import checks, limits, security, submissions
from services.ingress.checks import Refusal
from services.ingress.producers import Producer
from services.ingress.state import IngressState, ingress_state
from services.ingress.status import STATUS_PATH, STATUS_URL_EXTENSION, StatusAnswer, accepted_answer, status_answer
from services.tracker import audit

log = get_logger(__name__)
router = APIRouter()

LARGE_BODY_BYTES = 256 * 1024  # a larger body is parsed off the event loop


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


async def accept(state: IngressState, request: Request) -> Response:
    """POST /fhir: the 202 once the ledger and the bus hold the transfer, or the Refusal saying why not."""
    identity = security.caller(state, request)
    async with state.limiter.slot(identity.producer.id):  # 429 past the producer's rate or concurrency
        return await _accept_as(state, request, identity)


async def _accept_as(state: IngressState, request: Request, identity: security.Identity) -> Response:
    settings = state.settings
    producer = identity.producer
    for refusal in (checks.check_content_type(request.headers.get("Content-Type")),
                    checks.check_declared_length(request.headers.get("Content-Length"), settings.max_body_bytes)):
        if refusal:
            raise refusal
    targets = checks.check_targets(request.headers.get(checks.TARGET_HEADER), producer, state.targets)
    if isinstance(targets, Refusal):
        raise targets
    body = await limits.read_body(request, settings.max_body_bytes, settings.body_read_timeout_s)
    # Large bodies are parsed off the event loop (the duplicate-key check walks every object).
    parsed = (checks.parse_bundle(body) if len(body) < LARGE_BODY_BYTES
              else await run_in_threadpool(checks.parse_bundle, body))
    if isinstance(parsed, Refusal):
        raise parsed
    for refusal in (checks.check_entries(parsed), limits.check_shape(parsed, settings)):
        if refusal:
            raise refusal
    finess = security.source_finess(parsed)
    refusal = security.check_structure(producer, finess)
    if refusal:
        raise refusal
    if not state.bus_ready.is_set():
        raise _unavailable(settings, "Relais is not connected to Kafka yet")
    full = state.storage_full()  # what is left is kept for the transfers already accepted, so they can move
    if full is not None:
        raise _unavailable(settings, f"Relais's storage is full ({full})")

    # Recorded in the ledger database before anything is published (services/ingress/submissions.py).
    key = submissions.idempotency_key(request.headers.get(submissions.IDEMPOTENCY_HEADER), parsed, targets)
    print_ = submissions.fingerprint(targets, body)
    try:
        claim = await state.background.claim(state.ledger, producer.id, key, print_, settings.idempotency_window_s)
        while claim.verdict == "busy":  # the same request, at once: wait for the first one's outcome
            settled = await submissions.wait_for(state.ledger, claim.transfer_id, settings.kafka_timeout_s + 2)
            if settled == submissions.PUBLISHING:
                raise submissions.key_busy(settings.retry_after_s)
            claim = await submissions.claim(state.ledger, producer.id, key, print_, settings.idempotency_window_s)
    except TransientError as exc:
        log.error("transfer refused: the ledger database did not record it", error=str(exc), producer=producer.id)
        raise _unavailable(settings, "Relais could not record the transfer") from exc
    if claim.verdict == "conflict":
        raise submissions.key_conflict(claim.transfer_id)
    transfer_id = claim.transfer_id
    entries = parsed.get("entry") or []
    base = (settings.public_base_url or str(request.base_url)).rstrip("/")
    if claim.verdict == "replay":
        log.info("transfer resubmitted with its idempotency key; not published again", transfer_id=transfer_id,
                 producer=producer.id)
        return _accepted(base, transfer_id)

    received = Envelope(type="fr.relais.transfer.received", source="/relais/ingress", transfer_id=transfer_id,
                        data=body, producer=producer.id, extra={"targets": join_csv(targets)})
    accepted = Envelope(type="fr.relais.event.accepted", source="/relais/ingress", transfer_id=transfer_id,
                        data=orjson.dumps({"kind": "accepted", "stage": "ingress", "targets": targets,
                                           "size": len(body), "entries": len(entries),
                                           "sha256": hashlib.sha256(body).hexdigest(), "finess": finess,
                                           "auth": identity.method, "cert": identity.cert_fingerprint}),
                        producer=producer.id, content_type=JSON)
    record_key = transfer_id.encode()
    # The person's key orders its transfers from here on (services/core/person.py); keyed with the audit key's kin.
    person = person_key(parsed, audit.key_of(state.ledger).person_secret())
    try:
        await state.bus.publish([Emit(RECEIVED, (person or transfer_id).encode(), received),
                                 Emit(EVENTS, record_key, accepted)])
    except (BusUnavailable, OSError) as exc:  # OSError: the embedded log's disk is full or read-only
        with contextlib.suppress(Exception):
            log.error("transfer refused: the bus did not acknowledge", error=str(exc), producer=producer.id)
        with contextlib.suppress(TransientError):  # a retry with the key may take it over at once
            await submissions.settle(state.ledger, [transfer_id], submissions.FAILED)
        raise _unavailable(settings, "Relais could not store the transfer durably") from exc
    # Marked published off the answer's path, group-committed with the other POSTs' (submissions.Background). If
    # that write is lost (crash, database down) the row stays `publishing`: the status URL still answers 202, and
    # a retry with the key finds the tracker's events (submissions.claim): the 202 stays true either way.
    state.background.mark_published(state.ledger, transfer_id)

    log.info("transfer accepted", transfer_id=transfer_id, producer=producer.id, targets=targets,
             size=len(body), entries=len(entries), takeover=claim.verdict == "takeover")
    return _accepted(base, transfer_id)


def _accepted(base: str, transfer_id: str) -> Response:
    """The 202: the status URL in Content-Location, and in the body for clients that do not show headers."""
    location = f"{base}{STATUS_PATH}/{transfer_id}"
    body = operation_outcome([information(f"transfer {transfer_id} accepted; poll {location} for its outcome")])
    body["extension"] = [{"url": STATUS_URL_EXTENSION, "valueUrl": location}]
    return fhir_response(202, body, {"Content-Location": location, "X-Relais-Transfer-Id": transfer_id})


def _unavailable(settings: Settings, why: str) -> Refusal:
    return checks.refuse(503, "transient", f"{why}; nothing was accepted, retry later",
                         rule="relais-ingress-unavailable", headers={"Retry-After": str(settings.retry_after_s)})


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
