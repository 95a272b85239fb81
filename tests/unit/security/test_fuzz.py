"""Fuzzing: the ingress against its own OpenAPI schema (schemathesis) and the validator with random and
mutated JSON (hypothesis). No 500, no crash, no hang; each test prints how many cases it ran."""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.app import create_app
from services.core.embedded import EmbeddedBus
from services.core.settings import Settings
from services.tracker.ledger import Ledger
from services.validator.logic import validate_bundle
from services.validator.options import ValidationOptions
from tests.fixtures.tddui import make_bundle
from tests.support.producers import write_producers, write_targets

CASES: dict[str, int] = {}


def _app(tmp: Path) -> Any:
    s = Settings(producers_file=write_producers(tmp / "p.yaml"), ops_token="fuzz-ops",
                 targets_file=write_targets(tmp / "t.yaml", {"essms-a": "http://127.0.0.1:9/fhir"}),
                 database_url=f"sqlite+aiosqlite:///{tmp}/ledger.db", embedded_log_path=tmp / "log.db",
                 blob_dir=tmp / "blobs", log_format="console", log_level="error")
    return create_app(s, EmbeddedBus(s), Ledger(s.database_url))


_TMP = Path(__import__("tempfile").mkdtemp(prefix="relais-fuzz-"))
APP = _app(_TMP)
schema = schemathesis.openapi.from_dict(APP.openapi())


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    """The app served by uvicorn on a real socket (lifespan on: ledger and bus ready), in a thread."""
    from tests.support.processes import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(APP, host="127.0.0.1", port=port, log_level="error", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "fuzz target never started"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(20)
    print(f"\n[fuzz] schemathesis ran {CASES.get('api', 0)} ingress requests without a 5xx")


# One test per API operation, each its own hypothesis run. Not schemathesis's own `schema.parametrize()`: its
# items all share one node id, and xdist's `--dist loadfile` (`make test`) ran one of the 28 and reported one.
OPERATIONS = [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("operation", OPERATIONS, ids=[op.label for op in OPERATIONS])
def test_ingress_never_answers_5xx(operation: Any, base_url: str) -> None:
    @given(case=operation.as_strategy())
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    def requests(case: Any) -> None:
        for headers in ({"Authorization": "Bearer token-producer-a"}, {"Authorization": "Bearer fuzz-ops"}):
            case.headers = {**(case.headers or {}), **headers}
            started = time.monotonic()
            response = case.call(base_url=base_url, timeout=10)
            CASES["api"] = CASES.get("api", 0) + 1
            assert response.status_code < 500 or response.status_code == 503, (
                f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}")
            assert time.monotonic() - started < 10, "a request hung"

    requests()


# --- the validator -------------------------------------------------------------------------------

def _dumps(value: Any) -> bytes:
    return json.dumps(value).encode()  # unlike orjson, takes integers past 64 bits


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=40,
)
BASE = make_bundle(12, seed=4242)
KEYS = ["resourceType", "type", "entry", "resource", "request", "fullUrl", "meta", "profile", "identifier",
        "subject", "reference", "system", "value", "code", "coding", "status", "period", "name", "birthDate"]


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


ALL_PATHS = [p for p in _paths(BASE) if p]


@st.composite
def mutated_bundles(draw: st.DrawFn) -> bytes:
    bundle = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 6))):
        path = draw(st.sampled_from(ALL_PATHS))
        parent: Any = bundle
        try:
            for step in path[:-1]:
                parent = parent[step]
            action = draw(st.sampled_from(["delete", "replace", "retype", "rename"]))
            if action == "delete":
                del parent[path[-1]]
            elif action == "replace":
                parent[path[-1]] = draw(json_values)
            elif action == "retype":
                parent[path[-1]] = draw(st.sampled_from([None, 0, "", [], {}, True, "x" * 300]))
            elif isinstance(parent, dict):
                parent[draw(st.sampled_from(KEYS))] = parent.pop(path[-1])
        except (KeyError, IndexError, TypeError):
            continue
    return _dumps(bundle)


OPTIONS = ValidationOptions()


def _validate(data: bytes) -> None:
    started = time.monotonic()
    validate_bundle(data, OPTIONS)  # returns issues; must never raise
    assert time.monotonic() - started < 5, "the validator hung on a case"


@given(st.binary(max_size=200) | json_values.map(_dumps))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_validator_survives_random_json(data: bytes) -> None:
    CASES["random"] = CASES.get("random", 0) + 1
    _validate(data)


@given(mutated_bundles())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_validator_survives_mutated_bundles(data: bytes) -> None:
    CASES["mutated"] = CASES.get("mutated", 0) + 1
    _validate(data)


def test_report_case_counts() -> None:
    print(f"\n[fuzz] validator: {CASES.get('random', 0)} random + {CASES.get('mutated', 0)} mutated JSON cases; "
          f"ingress: {CASES.get('api', 0)} schemathesis requests")
