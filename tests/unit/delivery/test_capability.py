"""A target's CapabilityStatement is read once for all the lanes that need it at the same moment."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import pytest

from services.core.targets import Target
from services.delivery.capability import Capabilities
from services.delivery.client import TargetClient

STATEMENT = {"resourceType": "CapabilityStatement", "rest": [{"mode": "server", "resource": [
    {"type": "Patient", "conditionalCreate": True}, {"type": "Encounter"}]}]}


class _Metadata(BaseHTTPRequestHandler):
    calls = 0
    status = 200

    def do_GET(self) -> None:
        type(self).calls += 1
        time.sleep(0.2)  # slow enough for every lane to ask while the first read is under way
        body = orjson.dumps(STATEMENT)
        self.send_response(type(self).status)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Metadata]]]:
    handler = type("Handler", (_Metadata,), {"calls": 0, "status": 200})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/fhir", handler
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("status", [200, 503])
async def test_many_lanes_asking_at_once_make_one_read(server: tuple[str, type[_Metadata]], status: int) -> None:
    url, handler = server
    handler.status = status
    client = TargetClient(Target(id="t", base_url=url))
    capabilities = Capabilities()
    try:
        answers = await asyncio.gather(*(capabilities.conditional_types(client) for _ in range(20)))
        again = await capabilities.conditional_types(client)  # cached, ok or failed
    finally:
        await client.aclose()
    assert handler.calls == 1
    expected = frozenset({"Patient"}) if status == 200 else frozenset()
    assert set(answers) == {expected} and again == expected
