"""A real HTTP server on loopback whose answers a test scripts: the target of delivery unit tests.

Delivery's client is tested against a server that speaks HTTP over a socket, as a target does, never a
mocked transport: what it sees (`requests`) is what went over the wire.

    async with ScriptedTarget(lambda seen: Answer(503)) as target:
        ... Target(id="t", base_url=target.base_url) ...
        assert target.requests[0].method == "POST"
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict


@dataclass(frozen=True)
class Seen:
    """A request as the target received it."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]  # case-insensitive, as HTTP's
    content: bytes

    def json(self) -> Any:
        return orjson.loads(self.content)


@dataclass(frozen=True)
class Answer:
    """What the target answers: a status, and a JSON body (`json`) or raw bytes (`content`)."""

    status: int = 200
    json: Any = None
    content: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)


Script = Callable[[Seen], Answer | Awaitable[Answer]]


class ScriptedTarget:
    """Serves `script`'s answers on 127.0.0.1 (a free port) under /fhir, in the test's event loop."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[Seen] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    async def __aenter__(self) -> ScriptedTarget:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._serve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _serve(self, request: web.Request) -> web.Response:
        seen = Seen(request.method, request.path, dict(request.query), CIMultiDict(request.headers),
                    await request.read())
        self.requests.append(seen)
        answer = self.script(seen)
        if inspect.isawaitable(answer):
            answer = await answer
        body = orjson.dumps(answer.json) if answer.json is not None else answer.content
        headers = {"Content-Type": "application/fhir+json", **answer.headers}
        return web.Response(status=answer.status, body=body, headers=headers)
