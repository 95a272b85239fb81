"""The ingress FastAPI app: `POST /fhir` accepts a transfer once Kafka holds it; the rest reports."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from services import __version__
from services.core import diskspace
from services.core.bus import Bus
from services.core.embedded import STORAGE_UNWRITABLE
from services.core.envelope import FHIR_JSON, JSON, Emit, Envelope, join_csv
from services.core.errors import BusUnavailable, ConfigurationError, TransientError
from services.core.logging import get_logger
from services.core.outcome import Issue, error, information, operation_outcome
from services.core.person import person_key
from services.core.settings import Settings
from services.core.targets import TargetDirectory, load_targets
from services.core.topics import EVENTS, RECEIVED
from services.ingress import checks, limits, security, submissions
from services.ingress.checks import Refusal
from services.ingress.metrics import RequestCounter
from services.ingress.mtls import ClientCertPolicy
from services.ingress.producers import ANONYMOUS, Producer, ProducerDirectory, load_producers
from services.ingress.status import STATUS_PATH, STATUS_URL_EXTENSION, StatusAnswer, accepted_answer, status_answer
from services.tracker.ledger import Ledger

log = get_logger(__name__)

BUS_RETRY_S = 2.0
LARGE_BODY_BYTES = 256 * 1024


@dataclass
class IngressState:
    """What request handlers share: configuration, the bus and the ledger."""

    settings: Settings
    producers: ProducerDirectory | None  # None: authentication explicitly disabled
    targets: TargetDirectory
    bus: Bus
    ledger: Ledger
    bus_ready: asyncio.Event = field(default_factory=asyncio.Event)
    limiter: limits.ProducerLimiter = field(default_factory=limits.ProducerLimiter)
    cert_policy: ClientCertPolicy | None = None  # mutual TLS: client certificates checked against the CA
    background: submissions.Background = field(default_factory=lambda: submissions.Background())
    data_paths: list[Path] = field(default_factory=list)  # local disks to keep room on (services/core/diskspace.py)

    def storage_full(self) -> str | None:
        """Why the local disks are too full to take new work, or None (and relais_storage_unwritable says so)."""
        problem = diskspace.disk_problem(self.data_paths)
        STORAGE_UNWRITABLE.labels("data-disk", "disk-full").set(0 if problem is None else 1)
        return problem


def fhir_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    """A FHIR JSON response (counted, with every other answer, by `count_requests`)."""
    return Response(orjson.dumps(body), status_code=status, media_type=FHIR_JSON, headers=headers)


def outcome_response(status: int, issues: list[Issue] | tuple[Issue, ...],
                     headers: dict[str, str] | None = None) -> Response:
    """An OperationOutcome response."""
    return fhir_response(status, operation_outcome(issues), headers)


def load_producer_directory(settings: Settings) -> ProducerDirectory | None:
    """The producers file, or None when auth is explicitly disabled; refuses to guess otherwise."""
    if settings.producers_file is not None:
        return load_producers(settings.producers_file)
    if settings.auth_disabled:
        log.warning("producer authentication is DISABLED (RELAIS_AUTH_DISABLED=true); development only")
        return None
    raise ConfigurationError(
        "ingress will not start without producer authentication: set RELAIS_PRODUCERS_FILE to a YAML "
        "file of producers (see README, 'Producers'), or set RELAIS_AUTH_DISABLED=true for local development"
    )


def create_app(settings: Settings, bus: Bus, ledger: Ledger, *, manage_bus: bool = True) -> FastAPI:
    """The ingress app. Its lifespan starts and stops `ledger`, and `bus` too unless `manage_bus` is
    False (the process already runs the bus for its worker stages)."""
    state = IngressState(settings, load_producer_directory(settings), load_targets(settings.targets_file),
                         bus, ledger, limiter=limits.ProducerLimiter.from_settings(settings),
                         cert_policy=ClientCertPolicy(settings) if settings.tls_client_ca_file else None,
                         data_paths=diskspace.local_data_paths(settings))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await ledger.create_schema()
        watcher = asyncio.create_task(app.state.reloader.run())  # producers/operators files, no restart
        purger = asyncio.create_task(_purge_submissions(state))
        if manage_bus:
            connector = asyncio.create_task(_connect_bus(state))
        else:
            state.bus_ready.set()
        try:
            yield
        finally:
            for task in (watcher, purger):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await state.background.drain()
            if manage_bus:
                connector.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await connector
                await bus.stop()
            await ledger.close()

    app = FastAPI(title="Relais ingress", version=__version__, lifespan=lifespan,
                  description="Accepts TDDUI transaction Bundles and reports each transfer's fate.")
    app.state.ingress = state
    app.state.reloader = security.Reloader(app, settings)
    _install_error_handlers(app, settings)
    app.add_middleware(RequestCounter)

    @app.post("/fhir", status_code=202, summary="Accept a TDDUI transaction Bundle (FHIR POST [base])")
    @app.post("/fhir/", include_in_schema=False)
    async def accept_transfer(request: Request) -> Response:
        try:
            return await _accept(state, request)
        except Refusal as refusal:
            if refusal.status == 403:  # authenticated, but not for this target or ESSMS: audited like a 401
                security.note_refusal(request, "ingress", 403, "; ".join(i.diagnostics for i in refusal.issues))
            return outcome_response(refusal.status, refusal.issues, dict(refusal.headers))

    # The status URL lives under the FHIR base, so FHIR clients follow it as one of the server's own URLs.
    @app.get(STATUS_PATH + "/{transfer_id}", summary="A transfer's status (FHIR asynchronous pattern)")
    @app.get("/transfers/{transfer_id}", summary="A transfer's status (alias of /fhir/_transfer/{transfer_id})")
    async def transfer_status(transfer_id: str, request: Request) -> Response:
        try:
            producer = _authenticate(state, request)
        except Refusal as refusal:
            return outcome_response(refusal.status, refusal.issues, dict(refusal.headers))
        try:
            answer = await _status_of(state, transfer_id, producer)
        except TransientError:
            return outcome_response(503, [error("transient", "the ledger is unavailable; retry shortly")],
                                    {"Retry-After": str(settings.retry_after_s)})
        if answer is None:
            return outcome_response(404, [error(
                "not-found", f"no transfer {transfer_id} for this producer", rule="relais-status-unknown")])
        return fhir_response(answer.status, answer.body, answer.headers)

    @app.get("/metadata", summary="CapabilityStatement of this Relais")
    @app.get("/fhir/metadata", include_in_schema=False)
    async def metadata() -> Response:
        return fhir_response(200, capability_statement())

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> Response:
        return Response(orjson.dumps({"status": "ok"}), media_type=JSON)

    @app.get("/readyz", summary="Readiness: the bus is connected and its storage takes writes")
    async def readyz() -> Response:
        # e.g. the embedded log cannot be written (read-only), or a data disk is full though a probe row still fits
        storage = await state.bus.storage_problem() or state.storage_full()
        ready = state.bus_ready.is_set() and storage is None
        body = {"status": "ready" if ready else storage or "waiting for Kafka", "kafka": state.bus_ready.is_set(),
                "storage": storage or "ok"}
        return Response(orjson.dumps(body), status_code=200 if ready else 503, media_type=JSON)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    from services.ops import install as install_ops  # operator API (/ops), dashboard (/ops/ui), static files
    install_ops(app, state)
    from services.ingress.validate_api import router as validate_router  # POST /fhir/Bundle/$validate
    app.include_router(validate_router)
    return app


async def _connect_bus(state: IngressState) -> None:
    """Start the bus, retrying until Kafka answers; until then POST /fhir answers 503."""
    while True:
        try:
            await state.bus.start()
            state.bus_ready.set()
            log.info("ingress connected to the bus")
            return
        except Exception as exc:  # noqa: BLE001 - any start failure means "not yet"; keep trying
            log.warning("bus not reachable yet; POST /fhir answers 503 meanwhile", error=str(exc))
            await asyncio.sleep(BUS_RETRY_S)


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


async def _purge_submissions(state: IngressState) -> None:
    """Forget idempotency keys past their window, now and then (every replica may; it is idempotent)."""
    window = state.settings.idempotency_window_s
    while True:
        await asyncio.sleep(min(window / 10, 600.0))
        try:
            await submissions.purge(state.ledger, window)
        except Exception as exc:  # noqa: BLE001 - a ledger hiccup: try again next round
            log.warning("could not purge expired idempotency keys", error=str(exc))


def _authenticate(state: IngressState, request: Request) -> Producer:
    return _identify(state, request).producer


def _identify(state: IngressState, request: Request) -> security.Identity:
    """Who is calling (bearer token, client certificate or both; see services.ingress.security)."""
    request.app.state.reloader.maybe()
    if state.producers is None:
        return security.Identity(ANONYMOUS, "none")
    return security.identify(state.producers, state.cert_policy, request)


async def _accept(state: IngressState, request: Request) -> Response:
    identity = _identify(state, request)
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


def _install_error_handlers(app: FastAPI, settings: Settings) -> None:
    """Every error, even the framework's own, answers an OperationOutcome, and never a 500 page."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not-found", 405: "not-supported"}.get(exc.status_code, "processing")
        return outcome_response(exc.status_code, [error(code, str(exc.detail))],
                                dict(exc.headers) if exc.headers else None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        return outcome_response(400, [error("invalid", str(e.get("msg")), ".".join(map(str, e.get("loc", ()))))
                                      for e in exc.errors()])

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> Response:
        with contextlib.suppress(Exception):  # a log line that cannot be written must not fail the answer
            log.exception("unexpected ingress error", error_type=type(exc).__name__)
        if isinstance(exc, OSError | TransientError):  # disk full, database locked...: retrying can help
            return outcome_response(503, [error("transient", "Relais cannot store anything right now; nothing was "
                                                "accepted. Retry later")], {"Retry-After": str(settings.retry_after_s)})
        return outcome_response(500, [error("exception", "internal error in Relais; nothing was accepted. "
                                            "Retry later and tell the operator if it persists")])


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
