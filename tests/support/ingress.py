"""Ingress served by uvicorn in the test's own event loop, on the embedded bus, for tests that need real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from services.app import create_app
from services.core.embedded import EmbeddedBus
from services.core.settings import Settings
from services.launcher import _server
from services.tracker.ledger import Ledger


@contextlib.asynccontextmanager
async def serving(settings: Settings, base_url: str) -> AsyncIterator[str]:
    """Serve ingress until the block ends; yields `base_url` once POSTs can be accepted."""
    app = create_app(settings, EmbeddedBus(settings), Ledger(settings.database_url))
    server = _server(app, "127.0.0.1", settings.http_port, settings)
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 20
    while not server.started:
        assert not task.done(), task.exception() if task.done() else None
        assert time.monotonic() < deadline, "ingress never started"
        await asyncio.sleep(0.05)
    while not app.state.ingress.bus_ready.is_set():  # /readyz: POSTs answer 503 until the bus is there
        assert time.monotonic() < deadline, "ingress never connected to its bus"
        await asyncio.sleep(0.05)
    try:
        yield base_url
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 20)
