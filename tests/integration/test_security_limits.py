"""Hostile clients at the ingress door. Abuse limits: rate limit (429 + Retry-After, then recovery), concurrency
limit, slowloris-style uploads cut off at the configured time, JSON depth and entry count. Hostile input:
duplicate keys, type confusion, any JSON in any position — a 4xx or a 202, never a 500.

Through the real app (ingress on the embedded log, ledger on SQLite) served by uvicorn on a real socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.app import create_app
from services.core.embedded import EmbeddedBus
from services.core.settings import Settings
from services.router.logic import transfer_info
from services.tracker.ledger import Ledger
from tests.fixtures.tddui import make_bundle
from tests.support.ingress import serving as serve_ingress
from tests.support.processes import free_port
from tests.support.producers import TOKEN_A, TOKEN_B, write_producers, write_targets

BUNDLE = orjson.dumps(make_bundle(4, seed=3))
BASE = make_bundle(4, seed=77)  # what the hostile inputs are made from


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


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    tmp: Path = tmp_path_factory.mktemp("hostile")
    s = Settings(producers_file=write_producers(tmp / "p.yaml"),
                 targets_file=write_targets(tmp / "t.yaml", {"essms-a": "http://127.0.0.1:9/fhir"}),
                 database_url=f"sqlite+aiosqlite:///{tmp}/ledger.db", embedded_log_path=tmp / "log.db",
                 blob_dir=tmp / "blobs", log_format="console", log_level="error")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(s, EmbeddedBus(s), Ledger(s.database_url)), host="127.0.0.1",
                                           port=port, log_level="error", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as test_client:
        deadline = time.monotonic() + 20
        while not server.started or test_client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline and thread.is_alive(), "ingress never became ready"
            time.sleep(0.05)
        yield test_client
    server.should_exit = True
    thread.join(20)


def post(client: httpx.Client, body: bytes, path: str = "/fhir") -> Any:
    answer = client.post(path, content=body, headers=headers())
    assert answer.status_code < 500, (answer.status_code, answer.text, body[:300])
    assert answer.headers["content-type"].startswith("application/fhir+json"), answer.text
    outcome = answer.json()
    assert outcome["resourceType"] == "OperationOutcome", outcome
    return answer


def test_duplicate_keys_are_refused_with_the_keys_path(client: httpx.Client) -> None:
    answer = post(client, b'{"resourceType":"Bundle","type":"document","type":"transaction","entry":[]}')
    assert answer.status_code == 400
    issue = answer.json()["issue"][0]
    assert issue["expression"] == ["Bundle.type"] and "'type'" in issue["diagnostics"]

    validated = post(client, b'{"resourceType":"Bundle","type":"transaction","type":"batch"}', "/fhir/Bundle/$validate")
    assert validated.status_code == 400 and validated.json()["issue"][0]["expression"] == ["Bundle.type"]

    body = orjson.dumps(BASE).replace(b'"resourceType":"Patient"', b'"resourceType":"Patient","gender":"male"', 1)
    body = body.replace(b'"gender":"male"', b'"gender":"male","gender":"female"', 1)
    nested = post(client, body)
    assert nested.status_code == 400
    assert nested.json()["issue"][0]["expression"][0].startswith("Bundle.entry[1].resource.gender")


@pytest.mark.parametrize(("mutate", "status", "expression"), [
    (lambda b: b.__setitem__("entry", -1.5e308), 400, "Bundle.entry"),
    (lambda b: b.__setitem__("entry", "everything"), 400, "Bundle.entry"),
    (lambda b: b["entry"].__setitem__(2, 7), 400, "Bundle.entry[2]"),
    (lambda b: b["entry"][0]["resource"].__setitem__("identifier", 42), 202, None),  # the validator's to judge
    (lambda b: b["entry"][0]["resource"]["meta"].__setitem__("profile", 3), 202, None),
    (lambda b: b["entry"][0]["resource"]["meta"].__setitem__("profile", True), 202, None),
])
def test_type_confusion_is_a_4xx_or_an_acceptance_never_a_500(client: httpx.Client, mutate: Any, status: int,
                                                              expression: str | None) -> None:
    bundle = copy.deepcopy(BASE)
    bundle.pop("identifier", None)  # each case its own transfer
    mutate(bundle)
    answer = post(client, orjson.dumps(bundle))
    assert answer.status_code == status, answer.text
    if expression:
        assert answer.json()["issue"][0]["expression"] == [expression]


def test_router_reads_type_confused_bundles_as_having_nothing_to_route_on() -> None:
    bundle = copy.deepcopy(BASE)
    bundle["entry"][0]["resource"]["identifier"] = 42  # the Organization: no FINESS then
    bundle["entry"][1]["resource"]["meta"]["profile"] = 3
    bundle["entry"][2]["resource"]["meta"]["profile"] = False
    info = transfer_info(bundle, ["essms-a"], "dui-a")
    assert info.finess == frozenset()
    assert len(info.profiles) == 2  # the two entries left intact


def _json() -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | \
        st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)


def _positions(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _positions(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _positions(value, (*path, i))


POSITIONS = [p for p in _positions(BASE) if p]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(position=st.sampled_from(POSITIONS), value=_json(),
       endpoint=st.sampled_from(["/fhir", "/fhir/Bundle/$validate"]))
def test_any_json_value_in_any_position_never_gets_a_500(client: httpx.Client, position: tuple[Any, ...],
                                                         value: Any, endpoint: str) -> None:
    bundle = copy.deepcopy(BASE)
    node: Any = bundle
    for step in position[:-1]:
        node = node[step]
    node[position[-1]] = value
    post(client, orjson.dumps(bundle), endpoint)


@settings(max_examples=400, deadline=None)
@given(position=st.sampled_from(POSITIONS), value=_json())
def test_any_json_value_in_any_position_routes_without_an_exception(position: tuple[Any, ...], value: Any) -> None:
    """What passes ingress reaches the router: type confusion there would make a poison record."""
    bundle = copy.deepcopy(BASE)
    node: Any = bundle
    for step in position[:-1]:
        node = node[step]
    node[position[-1]] = value
    transfer_info(bundle, ["essms-a"], "dui-a")
