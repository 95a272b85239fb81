"""Abuse limits at the ingress: rate limit (429 + Retry-After, then recovery), concurrency limit,
slowloris-style uploads cut off at the configured time, JSON depth and entry count."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from services.core.settings import Settings
from tests.fixtures.tddui import make_bundle
from tests.support.ingress import serving as serve_ingress
from tests.support.processes import free_port
from tests.support.producers import TOKEN_A, TOKEN_B, write_producers, write_targets

BUNDLE = orjson.dumps(make_bundle(4, seed=3))


def headers(token: str = TOKEN_A) -> dict[str, str]:
    return {"Content-Type": "application/fhir+json", "X-Relais-Target": "essms-a", "Authorization": f"Bearer {token}"}


@pytest.fixture
def make(tmp_path: Path) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "http_port": free_port(), "database_url": f"sqlite+aiosqlite:///{tmp_path}/ledger.db",
            "embedded_log_path": tmp_path / "log.db", "blob_dir": tmp_path / "blobs",
            "producers_file": write_producers(tmp_path / "producers.yaml"),
            "targets_file": write_targets(tmp_path / "targets.yaml", {"essms-a": "http://127.0.0.1:9/fhir"}),
            "log_format": "console",
        }
        values.update(overrides)
        return Settings(**values)
    return build


def serving(settings: Settings) -> contextlib.AbstractAsyncContextManager[str]:
    return serve_ingress(settings, f"http://127.0.0.1:{settings.http_port}")


async def test_rate_limit_answers_429_then_recovers(make: Callable[..., Settings]) -> None:
    async with serving(make(producer_rate_per_s=2.0, producer_rate_burst=3)) as url, httpx.AsyncClient() as c:
        answers = [await c.post(f"{url}/fhir", content=BUNDLE, headers=headers()) for _ in range(4)]
        assert [a.status_code for a in answers] == [202, 202, 202, 429]
        limited = answers[-1]
        assert int(limited.headers["Retry-After"]) >= 1
        assert limited.json()["issue"][0]["code"] == "throttled"
        # Another producer has its own budget.
        assert (await c.post(f"{url}/fhir", content=BUNDLE, headers=headers(TOKEN_B))).status_code == 202
        await asyncio.sleep(int(limited.headers["Retry-After"]))
        assert (await c.post(f"{url}/fhir", content=BUNDLE, headers=headers())).status_code == 202


async def test_concurrency_limit_answers_429(make: Callable[..., Settings]) -> None:
    release = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield BUNDLE[:10]
        await release.wait()
        yield BUNDLE[10:]

    async with serving(make(producer_max_concurrent=1)) as url, httpx.AsyncClient(timeout=20) as c:
        first = asyncio.create_task(c.post(f"{url}/fhir", content=slow_body(), headers=headers()))
        await asyncio.sleep(0.5)
        second = await c.post(f"{url}/fhir", content=BUNDLE, headers=headers())
        assert second.status_code == 429 and second.headers["Retry-After"] == "1"
        release.set()
        assert (await first).status_code == 202
        assert (await c.post(f"{url}/fhir", content=BUNDLE, headers=headers())).status_code == 202


def _slowloris(port: int, stop_after_s: float) -> tuple[float, bytes]:
    """Send headers announcing a big body, then one byte every 0.2 s; return (seconds until answered, answer)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=stop_after_s) as s:
        s.sendall(b"POST /fhir HTTP/1.1\r\nHost: relais\r\nContent-Type: application/fhir+json\r\n"
                  b"X-Relais-Target: essms-a\r\nAuthorization: Bearer " + TOKEN_A.encode()
                  + b"\r\nContent-Length: 1000000\r\n\r\n")
        s.setblocking(False)
        answer = b""
        while time.monotonic() - started < stop_after_s:
            try:
                s.sendall(b"{")
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                pass
            time.sleep(0.2)
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                break
            answer += chunk
            if not chunk or b"\r\n\r\n" in answer:
                break
        return time.monotonic() - started, answer


async def test_slowloris_upload_is_cut_off_at_the_configured_time(make: Callable[..., Settings]) -> None:
    settings = make(body_read_timeout_s=1.0)
    async with serving(settings) as url:
        elapsed, answer = await asyncio.to_thread(_slowloris, settings.http_port, 15.0)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert 0.9 <= elapsed < 4.0
        async with httpx.AsyncClient() as c:  # the server is still fine for others
            assert (await c.post(f"{url}/fhir", content=BUNDLE, headers=headers())).status_code == 202


async def test_deep_json_and_too_many_entries_are_refused(make: Callable[..., Settings]) -> None:
    deep: dict[str, Any] = {"resourceType": "Bundle", "type": "transaction", "entry": []}
    node = deep
    for _ in range(80):
        node["extension"] = [{}]
        node = node["extension"][0]
    many = make_bundle(4, seed=3)
    many["entry"] = many["entry"] * 30
    async with serving(make(max_json_depth=64, max_bundle_entries=100)) as url, httpx.AsyncClient() as c:
        answer = await c.post(f"{url}/fhir", content=orjson.dumps(deep), headers=headers())
        assert answer.status_code == 400 and "RELAIS_MAX_JSON_DEPTH" in answer.text
        answer = await c.post(f"{url}/fhir", content=orjson.dumps(many), headers=headers())
        assert answer.status_code == 413 and answer.json()["issue"][0]["expression"] == ["Bundle.entry"]
