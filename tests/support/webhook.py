"""An alert receiver over real HTTP: records what it accepted, can answer 5xx, be slow, or be down (not listening)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response

from tests.support.processes import free_port


@dataclass
class Receiver:
    """What the receiver does and what it got."""

    port: int = field(default_factory=free_port)
    status: int = 200
    delay_s: float = 0.0
    accepted: list[dict[str, Any]] = field(default_factory=list)
    refused: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/alerts"

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/alerts")
        async def alerts(request: Request) -> Response:
            body = orjson.loads(await request.body())
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if self.status >= 300:
                self.refused += 1
                return Response(status_code=self.status)
            self.accepted.append(body)
            return Response(status_code=200)

        return app

    def seen(self, rule: str, subject: str | None = None) -> list[str]:
        """The states accepted for a rule (and subject), in order."""
        return [a["state"] for a in self.accepted if a["rule"] == rule and (subject is None or a["subject"] == subject)]


def _server(receiver: Receiver) -> uvicorn.Server:
    config = uvicorn.Config(receiver.app(), host="127.0.0.1", port=receiver.port, log_level="warning", lifespan="off")
    return uvicorn.Server(config)


@contextlib.asynccontextmanager
async def listening(receiver: Receiver) -> AsyncIterator[Receiver]:
    """Serve `receiver` in this event loop until the block ends."""
    server = _server(receiver)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "webhook receiver did not start"
        await asyncio.sleep(0.02)
    try:
        yield receiver
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


@contextlib.contextmanager
def listening_in_thread(receiver: Receiver) -> Iterator[Receiver]:
    """Serve `receiver` from a thread (for tests whose own code is synchronous)."""
    server = _server(receiver)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "webhook receiver did not start"
        time.sleep(0.02)
    try:
        yield receiver
    finally:
        server.should_exit = True
        thread.join(10)
