"""Hostile input at the door: duplicate keys, type confusion, any JSON in any position — a 4xx or a 202, never a 500.

Through the real app (ingress on the embedded log, ledger on SQLite) served by uvicorn on a real socket.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator
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
from tests.support.producers import TOKEN_A, write_producers, write_targets

HEADERS = {"Content-Type": "application/fhir+json", "Authorization": f"Bearer {TOKEN_A}",
           "X-Relais-Target": "essms-a"}
BASE = make_bundle(4, seed=77)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    from tests.support.processes import free_port

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
    answer = client.post(path, content=body, headers=HEADERS)
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
