"""Process assembly: which stages a process runs, wired to one bus, stopped gracefully on SIGTERM.

`relais run` runs every stage (and the HTTP ingress) in one process; `relais <stage>` runs one, so
production scales each stage as its own process. Both go through `serve()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from services.app import create_app
from services.core import diskspace
from services.core.blobstore import make_blob_store, prune_blobs_periodically
from services.core.bus import Bus
from services.core.buses import make_bus
from services.core.logging import get_logger
from services.core.runner import Stage, run_stage
from services.core.settings import Settings
from services.core.targets import TargetDirectory, load_targets
from services.core.tasks import cancel_and_wait, wait_until_set
from services.delivery.journal import AttemptJournal
from services.delivery.stage import DeliveryStage
from services.ingress.connections import accept_backlog, guarded, widen_listen_queue
from services.ingress.mtls import PeerCertH11Protocol, ServerTls
from services.keyrotation import check_keys_at_start
from services.ops.alerts import run_alerts_stage
from services.ops.context import OpsContext
from services.router.stage import RouterStage
from services.tracker import audit, auditchain, sealed
from services.tracker.ledger import Ledger
from services.tracker.opstate import paused_targets, record_circuit
from services.tracker.stage import TrackerStage
from services.validator.options import validation_options
from services.validator.stage import ValidatorStage
from services.workerhttp import worker_app

log = get_logger(__name__)

WORKER_STAGES = ("validator", "router", "delivery", "tracker")
# How long the event loop's thread may keep the GIL while a write thread (the embedded log's, the ledger's)
# waits for it. Python's default, 5 ms, is paid at each of a transaction's statements while the loop validates:
# a worker held the log's write lock 44 ms at p99 (0.5 ms: 33 ms), and a DUI's 202 waited behind it (issue 16).
GIL_SWITCH_INTERVAL_S = 0.0005
ALL_STAGES = ("ingress", *WORKER_STAGES, "alerts")  # alerts: rule evaluation loop (services.ops.alerts)


class _Server(uvicorn.Server):
    """uvicorn, minus its own signal handling: the launcher owns SIGTERM for every stage at once."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        widen_listen_queue(self.servers)  # slow-loris: see its docstring


@dataclass(frozen=True)
class Shared:
    """What every stage of one process shares, built once: the bus, the targets directory and the ledger."""

    settings: Settings
    bus: Bus
    targets: TargetDirectory
    ledger: Ledger


@contextlib.asynccontextmanager
async def shared_resources(settings: Settings) -> AsyncIterator[Shared]:
    """The process's bus (not started), targets directory and ledger (schema created); the ledger is
    closed afterwards. A stage that needs none of them costs one unused engine, no connection."""
    ledger = Ledger(settings.database_url)
    try:
        yield Shared(settings, make_bus(settings), load_targets(settings.targets_file), ledger)
    finally:
        await ledger.close()


@contextlib.asynccontextmanager
async def worker_stages(names: Sequence[str], shared: Shared) -> AsyncIterator[list[Stage]]:
    """Build the named worker stages on the shared resources, and release what they hold afterwards."""
    settings, ledger = shared.settings, shared.ledger
    stages: list[Stage] = []
    async with contextlib.AsyncExitStack() as resources:
        if set(names) & {"delivery", "tracker"}:
            await ledger.create_schema()
        for name in names:
            if name == "validator":
                stages.append(ValidatorStage(validation_options(settings)))
            elif name == "router":
                stages.append(RouterStage(shared.targets, make_blob_store(settings), settings.claim_check_bytes))
            elif name == "delivery":
                process = settings.instance_id or f"{socket.gethostname()}-{os.getpid()}"
                delivery = DeliveryStage(settings, shared.targets, make_blob_store(settings),
                                         AttemptJournal(ledger, process))
                resources.push_async_callback(delivery.aclose)
                watcher = asyncio.create_task(delivery.watch_pauses(functools.partial(paused_targets, ledger)))
                delivery.report_circuit = functools.partial(record_circuit, ledger, process=process)
                resources.push_async_callback(cancel_and_wait, watcher)
                stages.append(delivery)
            elif name == "tracker":
                await audit.open_trail(ledger, settings)  # key, genesis row (or migration); refuses a wrong key
                stages.append(auditchain.AuditingTracker(TrackerStage(ledger), ledger,  # ledger + audit trail
                                                         settings.audit_anchor_s))
            else:
                raise ValueError(f"unknown stage {name!r}; stages are {', '.join(WORKER_STAGES)}")
        yield stages


async def serve(names: Sequence[str], settings: Settings, *,
                extra_servers: Sequence[tuple[ASGIApp, str, int]] = ()) -> None:
    """Run the named stages until SIGTERM/SIGINT, then stop fetching and let in-flight work finish."""
    sealed.install(settings)  # ledger values that may quote health data are sealed at rest
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    workers = [n for n in names if n not in ("ingress", "alerts")]
    async with shared_resources(settings) as shared:
        bus = shared.bus
        servers: list[uvicorn.Server] = []
        stage_tasks: dict[str, asyncio.Task[None]] = {}
        if "ingress" not in names and workers and settings.metrics_port is not None:
            # Worker processes: /metrics, /healthz and /readyz on their own port.
            running = lambda: [name for name, task in stage_tasks.items() if not task.done()]  # noqa: E731
            servers.append(_server(worker_app(bus, diskspace.local_data_paths(settings), running, workers),
                                   settings.http_host, settings.metrics_port))
        if "ingress" in names:
            # One bus per process: the embedded log has one owner, and Kafka needs one producer, not two.
            # An ingress-only process connects in the background and answers 503 until Kafka is there.
            app = create_app(settings, bus, shared.ledger, targets=shared.targets, manage_bus=not workers,
                             manage_ledger=False)
            servers.append(_server(app, settings.http_host, settings.http_port, settings))
        servers += [_server(app, host, port) for app, host, port in extra_servers]

        try:
            if workers:
                await _start_bus(bus, stop)  # creates missing topics before any consumer subscribes
            await check_keys_at_start(bus if workers else None, settings, shared.ledger)  # no data under a removed key
            async with worker_stages(workers, shared) as stages:
                stage_tasks.update({s.name: asyncio.create_task(run_stage(s, bus, settings, stop), name=s.name)
                                    for s in stages})
                tasks = list(stage_tasks.values())
                tasks += [asyncio.create_task(s.serve(), name="http") for s in servers]
                if workers:
                    tasks.append(asyncio.create_task(prune_blobs_periodically(settings, stop), name="blob-retention"))
                if "alerts" in names:
                    await shared.ledger.create_schema()
                    context = OpsContext(settings, shared.ledger, bus, shared.targets)
                    tasks.append(asyncio.create_task(run_alerts_stage(settings, context.observe, stop), name="alerts"))
                log.info("relais started", stages=list(names))
                _freeze_what_start_built()
                await _until_stopped(stop, tasks)
                log.info("stopping: finishing in-flight records", grace_s=settings.shutdown_grace_s)
                for s in servers:
                    s.should_exit = True
                await _drain(tasks, settings.shutdown_grace_s)
        finally:
            await bus.stop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    log.info("relais stopped")


def _freeze_what_start_built() -> None:
    """Move every object built so far (modules, models, validation plans, the app) out of the collector's sight.

    A full collection walked them all: 145-240 ms with every thread of the process stopped, a few times a
    minute under load — the longest stalls of the ingress's event loop (a DUI's 202 waited for them) and, in a
    worker, a write lock held meanwhile (issue 16). What is frozen is never collected; it lives as long as the
    process anyway.
    """
    gc.collect()
    gc.freeze()


async def _start_bus(bus: Bus, stop: asyncio.Event) -> None:
    """Start the bus, retrying with backoff while Kafka is unreachable (until stopped)."""
    delay = 1.0
    while not stop.is_set():
        try:
            await bus.start()
            return
        except Exception as exc:  # noqa: BLE001 - every start failure means "not yet"
            log.warning("bus not reachable yet; retrying", error=str(exc), retry_in_s=delay)
            if not await wait_until_set(stop, delay):
                delay = min(delay * 2, 30.0)


def _server(app: ASGIApp, host: str, port: int, settings: Settings | None = None) -> uvicorn.Server:
    """A uvicorn server; HTTPS (and mutual TLS with a client CA) when `settings` name TLS files."""
    if settings is None:
        return _Server(uvicorn.Config(app, host=host, port=port, log_level="warning", log_config=None, lifespan="on",
                                      timeout_graceful_shutdown=5))
    if settings.tls_certfile is None:
        return _Server(uvicorn.Config(app, host=host, port=port, log_level="warning", log_config=None, lifespan="on",
                                      timeout_graceful_shutdown=5, http=guarded(settings), backlog=accept_backlog()))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", log_config=None, lifespan="on",
                            timeout_graceful_shutdown=5,
                            ssl_certfile=str(settings.tls_certfile), ssl_keyfile=str(settings.tls_keyfile),
                            http=guarded(settings, PeerCertH11Protocol), backlog=accept_backlog())
    config.load()
    config.ssl = ServerTls(settings).context  # ours: CERT_OPTIONAL client CA, files reloaded on change
    return _Server(config)


async def _until_stopped(stop: asyncio.Event, tasks: list[asyncio.Task[Any]]) -> None:
    """Wait for a stop signal; a task that ends on its own (a crash) stops the whole process."""
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    stopper.cancel()
    for task in done - {stopper}:
        if not task.cancelled() and task.exception() is not None:
            log.error("a stage crashed; stopping the process", task=task.get_name(),
                      error=repr(task.exception()))


async def _drain(tasks: list[asyncio.Task[Any]], grace_s: float) -> None:
    _, pending = await asyncio.wait(tasks, timeout=grace_s)
    for task in pending:
        log.warning("stage did not stop within the grace period; cancelling", task=task.get_name())
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


def run(names: Sequence[str], settings: Settings, *,
        extra_servers: Sequence[tuple[ASGIApp, str, int]] = ()) -> int:
    """Blocking entry point for the CLI; returns the process exit code."""
    asyncio.run(serve(names, settings, extra_servers=extra_servers))
    return 0

