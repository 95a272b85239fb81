"""Delivery's HTTP client over real sockets: what came back, and whether a failed request may have been sent.

`sent` is what makes a failure ambiguous (maybe applied: probe before sending again) rather than safe to
resend, so each way a request can fail is produced for real here: a closed port, a server that never
answers, one that hangs up after reading, a pool with no free connection.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from services.core.targets import Target
from services.delivery.client import TargetClient
from tests.support.scripted_target import Answer, ScriptedTarget, Seen

OK = {"resourceType": "Bundle", "type": "transaction-response", "entry": []}


def _target(base_url: str, connect_s: float = 2.0, total_s: float = 1.0, max_concurrency: int = 4) -> Target:
    return Target.model_validate({"id": "t", "base_url": base_url, "max_concurrency": max_concurrency,
                                  "timeouts": {"connect_s": connect_s, "total_s": total_s}})


@pytest.fixture
async def silent_server() -> AsyncIterator[tuple[int, list[bytes]]]:
    """Accepts connections, reads what comes, never answers (until the test ends)."""
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read(65536))
        await asyncio.sleep(30)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], received
    server.close()


async def test_an_answer_is_returned_with_its_body_and_retry_after() -> None:
    async def answer(seen: Seen) -> Answer:
        return Answer(503, json={"resourceType": "OperationOutcome"}, headers={"Retry-After": "7"})

    async with ScriptedTarget(answer) as server:
        client = TargetClient(_target(server.base_url))
        try:
            attempt = await client.post_transaction(b'{"resourceType":"Bundle"}', "req-1")
        finally:
            await client.aclose()
    assert (attempt.status, attempt.retry_after, attempt.json()) == (503, "7", {"resourceType": "OperationOutcome"})
    [seen] = server.requests
    assert (seen.method, seen.path, seen.content) == ("POST", "/fhir", b'{"resourceType":"Bundle"}')
    assert seen.headers["X-Request-Id"] == "req-1" and seen.headers["Content-Type"] == "application/fhir+json"


async def test_a_closed_port_is_certainly_not_sent() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nobody listens there
    client = TargetClient(_target(f"http://127.0.0.1:{port}/fhir"))
    try:
        attempt = await client.post_transaction(b"{}", "req")
    finally:
        await client.aclose()
    assert attempt.status is None and attempt.sent is False and attempt.error


async def test_no_answer_within_the_timeout_may_have_been_sent(silent_server: tuple[int, list[bytes]]) -> None:
    port, received = silent_server
    client = TargetClient(_target(f"http://127.0.0.1:{port}/fhir", total_s=0.5))
    try:
        attempt = await client.post_transaction(b'{"resourceType":"Bundle"}', "req")
    finally:
        await client.aclose()
    assert attempt.status is None and attempt.sent is True
    assert received and received[0].startswith(b"POST /fhir")  # it did reach the target
    assert 0.4 < attempt.duration_s < 5


async def test_a_hang_up_after_reading_may_have_been_sent() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    client = TargetClient(_target(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/fhir"))
    try:
        attempt = await client.post_transaction(b"{}", "req")
    finally:
        await client.aclose()
        server.close()
    assert attempt.status is None and attempt.sent is True


async def test_no_free_connection_in_time_is_not_sent(silent_server: tuple[int, list[bytes]]) -> None:
    # The pool holds max_concurrency + 2 connections; all of them stuck on a silent target, one more waits for
    # a free one and gives up after connect_s without having sent a byte.
    port, received = silent_server
    client = TargetClient(_target(f"http://127.0.0.1:{port}/fhir", connect_s=0.5, total_s=5, max_concurrency=1))
    try:
        stuck = [asyncio.create_task(client.post_transaction(b"{}", f"req-{i}")) for i in range(3)]
        await asyncio.sleep(0.2)
        attempt = await client.post_transaction(b"{}", "one more")
        for task in stuck:
            task.cancel()
        await asyncio.gather(*stuck, return_exceptions=True)
    finally:
        await client.aclose()
    assert attempt.status is None and attempt.sent is False
    assert len(received) == 3  # the pool's connections; the last request never got one


async def test_a_probe_search_asks_for_the_transfer_tag() -> None:
    from services.delivery.marker import Verdict, probe_plan

    async with ScriptedTarget(lambda seen: Answer(200, json={"resourceType": "Bundle", "type": "searchset"})) as server:
        client = TargetClient(_target(server.base_url))
        try:
            plan = probe_plan({"resourceType": "Bundle", "type": "transaction", "entry": [
                {"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}}]})
            result = await client.probe(plan, "https://relais.example/transfer", "tr|1")
        finally:
            await client.aclose()
    [seen] = server.requests
    assert (seen.method, seen.path) == ("GET", "/fhir/Patient")
    assert seen.query == {"_tag": "https://relais.example/transfer|tr|1", "_count": "1000"}
    assert result.verdict is Verdict.ABSENT
