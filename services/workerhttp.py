"""A worker process's own HTTP port (RELAIS_METRICS_PORT): /metrics, /healthz and /readyz, like the ingress's.

`relais run` gives each worker RELAIS_METRICS_PORT + n - 1; a stage run on its own (`relais validator`)
uses RELAIS_METRICS_PORT. An orchestrator routes nothing to a worker, but it restarts or alerts on one
that is not ready: its bus cannot be written (the embedded log read-only, locked or on a full disk),
a local data disk is full, or one of its stages stopped running.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.core import diskspace
from services.core.bus import Bus

JSON = "application/json"


def worker_app(bus: Bus, data_paths: Sequence[Path], stages_running: Callable[[], list[str]],
               stage_names: Sequence[str]) -> Starlette:
    """The worker's small HTTP application; `stages_running()` names the stages whose loop still runs."""

    async def healthz(_: Request) -> Response:
        return Response(orjson.dumps({"status": "alive"}), media_type=JSON)

    async def readyz(_: Request) -> Response:
        storage = await bus.storage_problem() or diskspace.disk_problem(data_paths)
        stopped = sorted(set(stage_names) - set(stages_running()))
        ready = storage is None and not stopped
        body: dict[str, Any] = {"status": "ready" if ready else storage or f"stages stopped: {', '.join(stopped)}",
                                "storage": storage or "ok", "stages": {s: s not in stopped for s in stage_names}}
        return Response(orjson.dumps(body), status_code=200 if ready else 503, media_type=JSON)

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics)])
