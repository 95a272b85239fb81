"""`POST /fhir`: a transfer accepted once the ledger database and the bus hold it, or refused with a reason."""

from __future__ import annotations

import contextlib
import hashlib

import orjson
from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from services.core.envelope import JSON, Emit, Envelope, join_csv
from services.core.errors import BusUnavailable, TransientError
from services.core.logging import get_logger
from services.core.outcome import information, operation_outcome
from services.core.person import person_key
from services.core.settings import Settings
from services.core.topics import EVENTS, RECEIVED
from services.http.responses import fhir_response
from services.ingress import checks, limits, security, submissions
from services.ingress.checks import Refusal
from services.ingress.state import IngressState
from services.ingress.status import STATUS_PATH, STATUS_URL_EXTENSION

log = get_logger(__name__)

LARGE_BODY_BYTES = 256 * 1024


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
        claim = await submissions.claim(state.ledger, producer.id, key, print_, settings.idempotency_window_s)
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
    person = person_key(parsed)  # the person's key orders its transfers from here on (services/core/person.py)
    try:
        await state.bus.publish([Emit(RECEIVED, (person or transfer_id).encode(), received),
                                 Emit(EVENTS, record_key, accepted)])
    except (BusUnavailable, OSError) as exc:  # OSError: the embedded log's disk is full or read-only
        with contextlib.suppress(Exception):
            log.error("transfer refused: the bus did not acknowledge", error=str(exc), producer=producer.id)
        with contextlib.suppress(TransientError):  # a retry with the key may take it over at once
            await submissions.settle(state.ledger, transfer_id, submissions.FAILED)
        raise _unavailable(settings, "Relais could not store the transfer durably") from exc
    # Marked published off the answer's path (one database commit less per POST). If that write is lost
    # (crash, database down) the row stays `publishing`: the status URL still answers 202, and a retry
    # with the key finds the tracker's events (submissions.claim): the 202 stays true either way.
    state.background.spawn(_mark_published(state, transfer_id))

    log.info("transfer accepted", transfer_id=transfer_id, producer=producer.id, targets=targets,
             size=len(body), entries=len(entries), takeover=claim.verdict == "takeover")
    return _accepted(base, transfer_id)


async def _mark_published(state: IngressState, transfer_id: str) -> None:
    try:
        await submissions.settle(state.ledger, transfer_id, submissions.PUBLISHED)
    except Exception as exc:  # noqa: BLE001 - best effort, see above
        with contextlib.suppress(Exception):
            log.warning("transfer published but not marked so in the ledger", transfer_id=transfer_id,
                        error=str(exc))


def _accepted(base: str, transfer_id: str) -> Response:
    """The 202: the status URL in Content-Location, and in the body for clients that do not show headers."""
    location = f"{base}{STATUS_PATH}/{transfer_id}"
    body = operation_outcome([information(f"transfer {transfer_id} accepted; poll {location} for its outcome")])
    body["extension"] = [{"url": STATUS_URL_EXTENSION, "valueUrl": location}]
    return fhir_response(202, body, {"Content-Location": location, "X-Relais-Transfer-Id": transfer_id})


def _unavailable(settings: Settings, why: str) -> Refusal:
    return checks.refuse(503, "transient", f"{why}; nothing was accepted, retry later",
                         rule="relais-ingress-unavailable", headers={"Retry-After": str(settings.retry_after_s)})
