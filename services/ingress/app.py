"""The ingress FastAPI app: `POST /fhir` accepts a transfer once Kafka holds it; the rest reports."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from services import __version__
from services.core.bus import Bus
from services.core.envelope import FHIR_JSON, JSON, Emit, Envelope, join_csv, new_id
from services.core.errors import BusUnavailable, ConfigurationError, TransientError
from services.core.logging import get_logger
from services.core.metrics import INGRESS_REQUESTS
from services.core.outcome import Issue, error, information, operation_outcome
from services.core.settings import Settings
from services.core.targets import TargetDirectory, load_targets
from services.core.topics import EVENTS, RECEIVED
from services.ingress import checks, limits, security
from services.ingress.checks import Refusal
from services.ingress.mtls import ClientCertPolicy
from services.ingress.producers import ANONYMOUS, Producer, ProducerDirectory, load_producers
from services.ingress.status import status_answer
from services.tracker.ledger import Ledger

log = get_logger(__name__)

BUS_RETRY_S = 2.0


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


def fhir_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    """A FHIR JSON response; every answer of ingress goes through here so it is counted."""
    INGRESS_REQUESTS.labels(str(status)).inc()
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
                         cert_policy=ClientCertPolicy(settings) if settings.tls_client_ca_file else None)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await ledger.create_schema()
        watcher = asyncio.create_task(app.state.reloader.run())  # producers/operators files, no restart
        if manage_bus:
            connector = asyncio.create_task(_connect_bus(state))
        else:
            state.bus_ready.set()
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
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
    _install_error_handlers(app)

    @app.post("/fhir", status_code=202, summary="Accept a TDDUI transaction Bundle (FHIR POST [base])")
    @app.post("/fhir/", include_in_schema=False)
    async def accept_transfer(request: Request) -> Response:
        try:
            return await _accept(state, request)
        except Refusal as refusal:
            return outcome_response(refusal.status, refusal.issues, dict(refusal.headers))

    @app.get("/transfers/{transfer_id}", summary="A transfer's status (FHIR asynchronous pattern)")
    async def transfer_status(transfer_id: str, request: Request) -> Response:
        try:
            producer = _authenticate(state, request)
        except Refusal as refusal:
            return outcome_response(refusal.status, refusal.issues, dict(refusal.headers))
        try:
            view = await state.ledger.get(transfer_id)
        except TransientError:
            return outcome_response(503, [error("transient", "the ledger is unavailable; retry shortly")],
                                    {"Retry-After": str(settings.retry_after_s)})
        if view is None or (state.producers is not None and view.producer != producer.id):
            return outcome_response(404, [error(
                "not-found", f"no transfer {transfer_id} for this producer (a transfer accepted a moment ago "
                "may take a second to appear)", rule="relais-status-unknown")])
        answer = status_answer(view)
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
        storage = await state.bus.storage_problem()  # e.g. the embedded log's disk is full or read-only
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
    parsed = checks.parse_bundle(body)
    if isinstance(parsed, Refusal):
        raise parsed
    finess = security.source_finess(parsed)
    for refusal in (limits.check_shape(parsed, settings), security.check_structure(producer, finess)):
        if refusal:
            raise refusal
    if not state.bus_ready.is_set():
        raise _unavailable(settings, "Relais is not connected to Kafka yet")

    transfer_id = new_id()
    received = Envelope(type="fr.relais.transfer.received", source="/relais/ingress", transfer_id=transfer_id,
                        data=body, producer=producer.id, extra={"targets": join_csv(targets)})
    accepted = Envelope(type="fr.relais.event.accepted", source="/relais/ingress", transfer_id=transfer_id,
                        data=orjson.dumps({"kind": "accepted", "stage": "ingress", "targets": targets,
                                           "size": len(body), "entries": len(parsed.get("entry") or []),
                                           "sha256": hashlib.sha256(body).hexdigest(), "finess": finess,
                                           "auth": identity.method, "cert": identity.cert_fingerprint}),
                        producer=producer.id, content_type=JSON)
    key = transfer_id.encode()
    try:
        await state.bus.publish([Emit(RECEIVED, key, received), Emit(EVENTS, key, accepted)])
    except BusUnavailable as exc:
        log.error("transfer refused: Kafka did not acknowledge", error=str(exc), producer=producer.id)
        raise _unavailable(settings, "Relais could not store the transfer durably") from exc

    base = (settings.public_base_url or str(request.base_url)).rstrip("/")
    log.info("transfer accepted", transfer_id=transfer_id, producer=producer.id, targets=targets,
             size=len(body), entries=len(parsed.get("entry") or []))
    return outcome_response(
        202, [information(f"transfer {transfer_id} accepted; poll {base}/transfers/{transfer_id} for its outcome")],
        {"Content-Location": f"{base}/transfers/{transfer_id}", "X-Relais-Transfer-Id": transfer_id},
    )


def _unavailable(settings: Settings, why: str) -> Refusal:
    return checks.refuse(503, "transient", f"{why}; nothing was accepted, retry later",
                         rule="relais-ingress-unavailable", headers={"Retry-After": str(settings.retry_after_s)})


def _install_error_handlers(app: FastAPI) -> None:
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
        log.exception("unexpected ingress error", error_type=type(exc).__name__)
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
