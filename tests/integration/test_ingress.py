"""Ingress on a real Kafka: 202 only once Kafka holds the transfer; every refusal an OperationOutcome. A log line
that cannot be written never fails a request; a storage fault answers 503 + OperationOutcome (embedded bus).

And the ingress never runs CPU-bound work on its event loop: a long `$validate` does not delay a POST /fhir
(a real uvicorn server on the embedded bus; the validation is made slow by burning CPU in pure Python, holding
the GIL as the profile engine does, so the test fails if `$validate` ran it on the loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI

from services.app import create_app
from services.core.embedded import EmbeddedBus
from services.core.envelope import Emit
from services.core.errors import ConfigurationError
from services.core.kafka import KafkaBus
from services.core.logging import configure_logging
from services.core.outcome import Issue, information
from services.core.person import person_key
from services.core.settings import Settings
from services.core.topics import EVENTS, RECEIVED
from services.ingress import validate_api
from services.tracker.auditkey import load_audit_key
from services.tracker.ledger import Ledger
from tests.fixtures.tddui import make_bundle
from tests.support.ingress import serving
from tests.support.kafka import read_topic
from tests.support.processes import free_port
from tests.support.producers import TOKEN_A, TOKEN_B, write_producers, write_targets

FHIR = {"Content-Type": "application/fhir+json"}
BURN_S = 2.0  # how long the slow validation holds the GIL


@contextlib.asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://relais.test") as client:
            yield client


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    return {
        "producers": write_producers(tmp_path / "producers.yaml"),
        "targets": write_targets(tmp_path / "targets.yaml", {"essms-a": "http://127.0.0.1:9/fhir",
                                                            "sidoba": "http://127.0.0.1:9/fhir"}),
    }


def ingress(settings: Settings) -> FastAPI:
    return create_app(settings, KafkaBus(settings), Ledger(settings.database_url))


async def wait_ready(client: httpx.AsyncClient) -> None:
    from tests.support.kafka import wait_for

    async def ready() -> bool:
        return (await client.get("/readyz")).status_code == 200

    await wait_for(ready, timeout_s=30)


def headers(token: str | None = TOKEN_A, target: str | None = "essms-a", **extra: str) -> dict[str, str]:
    h = dict(FHIR, **extra)
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    if target is not None:
        h["X-Relais-Target"] = target
    return h


@pytest.mark.kafka
async def test_accepted_bundle_is_in_kafka_before_202(
        kafka_bootstrap: str, make_settings: Callable[..., Settings], files: dict[str, Path]) -> None:
    s = make_settings(kafka_bootstrap=kafka_bootstrap, producers_file=files["producers"],
                      targets_file=files["targets"], auth_disabled=False)
    body = orjson.dumps(make_bundle(30))
    async with running(ingress(s)) as client:
        await wait_ready(client)
        response = await client.post("/fhir", content=body, headers=headers(target="essms-a, sidoba"))
    assert response.status_code == 202, response.text
    transfer_id = response.headers["X-Relais-Transfer-Id"]
    assert response.headers["Content-Location"] == f"http://relais.test/fhir/_transfer/{transfer_id}"
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["severity"] == "information"

    [record] = await read_topic(s, RECEIVED, expect=1)
    assert record.envelope.data == body  # byte for byte
    assert record.envelope.transfer_id == transfer_id
    assert record.envelope.producer == "dui-a"
    assert record.envelope.extra["targets"] == "essms-a,sidoba"
    secret = load_audit_key(s).person_secret()  # the key file the app created beside the ledger
    assert record.key == person_key(orjson.loads(body), secret).encode()  # one person, one key, from ingress on
    [accepted] = await read_topic(s, EVENTS, expect=1)
    assert orjson.loads(accepted.envelope.data)["kind"] == "accepted"


BAD_CASES: list[tuple[str, dict[str, Any], int, str, str | None]] = [
    # name, request kwargs, status, issue code, expression
    ("no credentials", {"headers": headers(token=None)}, 401, "login", None),
    ("wrong token", {"headers": headers(token="nope")}, 401, "login", None),
    ("not bearer", {"headers": {**headers(token=None), "Authorization": "Basic Zm9vOmJhcg=="}}, 401, "login", None),
    ("wrong content type", {"headers": headers(**{"Content-Type": "application/xml"})}, 415, "not-supported", None),
    ("no target", {"headers": headers(target=None)}, 422, "required", None),
    ("blank target", {"headers": headers(target=" , ")}, 422, "required", None),
    ("unknown target", {"headers": headers(target="essms-a,nowhere")}, 422, "not-found", None),
    ("forbidden target", {"headers": headers(token=TOKEN_B, target="sidoba")}, 403, "forbidden", None),
    ("not json", {"content": b"{not json"}, 400, "structure", None),
    ("empty body", {"content": b""}, 400, "structure", None),
    ("json array", {"content": b"[1,2]"}, 400, "structure", None),
    ("not a bundle", {"content": b'{"resourceType":"Patient"}'}, 400, "structure", "Bundle.resourceType"),
    ("not a transaction", {"content": b'{"resourceType":"Bundle","type":"collection"}'}, 422, "value",
     "Bundle.type"),
    ("too large", {"content": b'{"resourceType":"Bundle","type":"transaction","x":"' + b"a" * 70_000 + b'"}'},
     413, "too-costly", "Bundle"),
]


@pytest.mark.kafka
async def test_bad_input_gets_its_status_and_an_outcome_and_nothing_is_accepted(
        kafka_bootstrap: str, make_settings: Callable[..., Settings], files: dict[str, Path]) -> None:
    s = make_settings(kafka_bootstrap=kafka_bootstrap, producers_file=files["producers"],
                      targets_file=files["targets"], auth_disabled=False, max_body_bytes=65_536)
    valid = orjson.dumps(make_bundle(5))
    async with running(ingress(s)) as client:
        await wait_ready(client)
        for name, kwargs, status, code, expression in BAD_CASES:
            kwargs = {"content": valid, "headers": headers(), **kwargs}
            response = await client.post("/fhir", **kwargs)
            assert response.status_code == status, (name, response.text)
            outcome = response.json()
            assert outcome["resourceType"] == "OperationOutcome", name
            issue = outcome["issue"][0]
            assert (issue["severity"], issue["code"]) == ("error", code), name
            assert issue["diagnostics"], name
            if expression:
                assert issue["expression"] == [expression], name
            if status == 401:
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
        # Still serving afterwards, and nothing refused reached Kafka.
        ok = await client.post("/fhir", content=valid, headers=headers())
        assert ok.status_code == 202
    records = await read_topic(s, RECEIVED, expect=2, timeout_s=3)
    assert [r.envelope.transfer_id for r in records] == [ok.headers["X-Relais-Transfer-Id"]]


async def test_kafka_unreachable_answers_503_with_retry_after(
        make_settings: Callable[..., Settings], files: dict[str, Path]) -> None:
    s = make_settings(kafka_bootstrap="127.0.0.1:9", kafka_timeout_s=1.0, targets_file=files["targets"])
    async with running(ingress(s)) as client:
        response = await client.post("/fhir", content=orjson.dumps(make_bundle(3)), headers=headers(token=None))
    assert response.status_code == 503
    assert response.headers["Retry-After"] == str(s.retry_after_s)
    assert response.json()["issue"][0]["code"] == "transient"


def test_ingress_refuses_to_start_without_producers_or_explicit_opt_out(
        make_settings: Callable[..., Settings]) -> None:
    s = make_settings(kafka_bootstrap="127.0.0.1:9", auth_disabled=False)
    with pytest.raises(ConfigurationError, match="RELAIS_PRODUCERS_FILE"):
        ingress(s)


async def test_status_of_unknown_transfer_is_404_outcome(make_settings: Callable[..., Settings]) -> None:
    s = make_settings(kafka_bootstrap="127.0.0.1:9")
    async with running(ingress(s)) as client:
        response = await client.get("/transfers/does-not-exist")
        metadata = await client.get("/metadata")
        missing = await client.get("/nothing-here")
    assert response.status_code == 404
    assert response.json()["issue"][0]["code"] == "not-found"
    assert metadata.json()["resourceType"] == "CapabilityStatement"
    assert missing.status_code == 404 and missing.json()["resourceType"] == "OperationOutcome"


async def test_a_slow_validation_does_not_delay_a_concurrent_post(tmp_path: Path, files: dict[str, Path],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    started = threading.Event()

    def slow_validation(bundle: dict[str, Any], options: Any) -> list[Issue]:
        started.set()
        deadline = time.monotonic() + BURN_S
        n = 0
        while time.monotonic() < deadline:  # CPU-bound: no sleep, no I/O
            n += sum(range(1000))
        return [information(f"burned {n}")]

    monkeypatch.setattr(validate_api, "validate_bundle", slow_validation)
    port = free_port()
    settings = Settings(producers_file=files["producers"], targets_file=files["targets"],
                        database_url=f"sqlite+aiosqlite:///{tmp_path}/ledger.db",
                        embedded_log_path=tmp_path / "log.db", blob_dir=tmp_path / "blobs", http_port=port)
    body = orjson.dumps(make_bundle(3, seed=1))
    headers = {**FHIR, "Authorization": f"Bearer {TOKEN_A}"}
    async with serving(settings, f"http://127.0.0.1:{port}") as url, \
            httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        validating = asyncio.create_task(client.post("/fhir/Bundle/$validate", content=body))
        while not started.is_set():  # the burn has begun (in whichever thread the ingress chose)
            assert not validating.done(), validating.result().text
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        accepted = await client.post("/fhir", content=body, headers={"X-Relais-Target": "essms-a"})
        elapsed = time.monotonic() - t0
        assert accepted.status_code == 202, accepted.text
        assert not validating.done(), "the POST waited for the whole validation"
        assert elapsed < BURN_S / 2, f"POST /fhir took {elapsed:.2f} s behind a {BURN_S} s validation"
        validated = await validating
        assert validated.status_code == 200 and "burned" in validated.text


class FullDisk(io.StringIO):
    def write(self, _: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


class FullDiskBus(EmbeddedBus):
    """The embedded log on a full disk: every publish fails with ENOSPC."""

    async def publish(self, emits: Sequence[Emit]) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize(("bus_class", "status"), [(EmbeddedBus, 202), (FullDiskBus, 503)])
async def test_with_the_log_on_a_full_disk_ingress_answers_fhir_never_a_plain_500(
        make_settings: Callable[..., Settings], files: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, bus_class: type[EmbeddedBus], status: int) -> None:
    settings = make_settings(embedded_log_path=tmp_path / "log.db", log_format="json", targets_file=files["targets"])
    monkeypatch.setattr(sys, "stderr", FullDisk())
    configure_logging(settings)
    try:
        app = create_app(settings, bus_class(settings), Ledger(settings.database_url))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://relais.test") as client:
                await wait_ready(client)
                answer = await client.post("/fhir", content=orjson.dumps(make_bundle(3, seed=5)),
                                           headers={**FHIR, "X-Relais-Target": "essms-a"})
    finally:
        monkeypatch.undo()
        logging.basicConfig(stream=sys.stderr, force=True)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/fhir+json")
    assert answer.json()["resourceType"] == "OperationOutcome"
    if status == 503:
        assert answer.headers["Retry-After"]
