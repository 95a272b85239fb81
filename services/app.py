"""The one HTTP application: the ingress, `$validate`, the operators' API and dashboard, assembled here.

Each front is an APIRouter that knows nothing of the others; this module builds the state they share
(on the bus, ledger and targets directory the launcher built once for the process), installs the error
handlers that make every refusal an OperationOutcome, counts every answer by route template and status
(`relais_ingress_requests_total`), and runs the background duties in the lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services import __version__
from services.core.bus import Bus
from services.core.errors import TransientError
from services.core.logging import get_logger
from services.core.metrics import INGRESS_REQUESTS
from services.core.outcome import error
from services.core.settings import Settings
from services.core.targets import TargetDirectory, load_targets
from services.core.tasks import cancel_and_wait
from services.http.reload import Reloader, Watched
from services.http.responses import outcome_response
from services.ingress import api as ingress_api
from services.ingress import validate_api
from services.ingress.state import IngressState
from services.ops import api as ops_api
from services.ops import audit_api, dashboard
from services.ops.auth import load_operators
from services.ops.context import OpsContext
from services.tracker import audit
from services.tracker.ledger import Ledger

log = get_logger(__name__)

OPS_STATIC = Path(ops_api.__file__).parent / "static"


def create_app(settings: Settings, bus: Bus, ledger: Ledger, *, targets: TargetDirectory | None = None,
               manage_bus: bool = True, manage_ledger: bool = True) -> FastAPI:
    """The HTTP application on this process's shared resources.

    Its lifespan creates the ledger's schema; it starts and stops `bus` unless `manage_bus` is False (the
    process already runs the bus for its worker stages), and closes `ledger` unless `manage_ledger` is False
    (the launcher closes it after the stages that share it). `targets`: the directory the launcher loaded,
    else RELAIS_TARGETS_FILE is read here.
    """
    targets = targets if targets is not None else load_targets(settings.targets_file)
    state = IngressState.build(settings, bus, ledger, targets)
    audit.bind(ledger, settings)  # the audit trail's MAC key (never in the database)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await ledger.create_schema()
        audit.key_of(ledger)  # person keys and identifier searches need it: a missing key stops the start, not a POST
        tasks = [asyncio.create_task(app.state.reloader.run()),  # producers/operators files, no restart
                 asyncio.create_task(state.purge_submissions())]
        if manage_bus:
            tasks.append(asyncio.create_task(state.connect_bus()))
        else:
            state.bus_ready.set()
        try:
            yield
        finally:
            for task in tasks:
                await cancel_and_wait(task)
            await state.background.drain()
            if manage_bus:
                await bus.stop()
            if manage_ledger:
                await ledger.close()

    app = FastAPI(title="Relais", version=__version__, lifespan=lifespan,
                  description="Accepts TDDUI transaction Bundles, reports each transfer's fate, and lets "
                              "operators watch and act (/ops).")
    app.state.settings = settings
    app.state.ingress = state
    app.state.operators = load_operators(settings)
    app.state.ops = OpsContext(settings, ledger, bus, targets)
    app.state.auth_refusals = audit.Refusals(ledger, settings.audit_refusal_every_s)
    app.state.reloader = Reloader([Watched("producers", settings.producers_file, state.reload_producers),
                                   Watched("operators", settings.operators_file, lambda: _reload_operators(app))],
                                  settings.auth_reload_s)
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(RequestCounter)

    app.include_router(ingress_api.router)
    app.include_router(validate_api.router)  # POST /fhir/Bundle/$validate
    app.include_router(ops_api.router, prefix="/ops")
    app.include_router(audit_api.router, prefix="/ops")  # GET /ops/audit, /ops/audit/$export, /ops/audit/verify
    app.include_router(dashboard.router, prefix="/ops/ui")
    app.mount("/ops/static", StaticFiles(directory=OPS_STATIC), name="ops-static")
    return app


class RequestCounter:
    """Counts each HTTP answer once, labelled with the matched route's path template.

    A pure ASGI middleware (no request buffering): status polls (`/fhir/_transfer/{transfer_id}`) and
    submissions (`/fhir`) are different routes, so one cannot hide the other's error rate.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: list[int] = []

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            INGRESS_REQUESTS.labels(route, str(status[0]) if status else "none").inc()


def _reload_operators(app: FastAPI) -> None:
    app.state.operators = load_operators(app.state.settings)


# Every error, even the framework's own, answers an OperationOutcome, and never a 500 page.
async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
    code = {404: "not-found", 405: "not-supported"}.get(exc.status_code, "processing")
    return outcome_response(exc.status_code, [error(code, str(exc.detail))],
                            dict(exc.headers) if exc.headers else None)


async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
    return outcome_response(400, [error("invalid", str(e.get("msg")), ".".join(map(str, e.get("loc", ()))))
                                  for e in exc.errors()])


async def _unexpected(request: Request, exc: Exception) -> Response:
    with contextlib.suppress(Exception):  # a log line that cannot be written must not fail the answer
        log.exception("unexpected HTTP error", error_type=type(exc).__name__)
    if isinstance(exc, OSError | TransientError):  # disk full, database locked...: retrying can help
        settings: Settings = request.app.state.settings
        return outcome_response(503, [error("transient", "Relais cannot store anything right now; nothing was "
                                            "accepted. Retry later")], {"Retry-After": str(settings.retry_after_s)})
    return outcome_response(500, [error("exception", "internal error in Relais; nothing was accepted. "
                                        "Retry later and tell the operator if it persists")])
