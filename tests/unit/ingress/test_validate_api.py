"""POST /fhir/Bundle/$validate: the engine's OperationOutcome at once, 200 even when invalid, no transfer."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI

from services.app import create_app
from services.core.kafka import KafkaBus
from services.core.outcome import RULE_EXTENSION_URL
from services.core.settings import Settings
from services.tracker.ledger import Ledger
from tests.fixtures.tddui import make_bundle
from tests.support.producers import TOKEN_A, write_producers

URL = "/fhir/Bundle/$validate"
FHIR = {"Content-Type": "application/fhir+json"}


def _app(tmp_path: Path, **overrides: Any) -> FastAPI:
    settings = Settings(kafka_bootstrap="127.0.0.1:9", **{"auth_disabled": True, **overrides})
    return create_app(settings, KafkaBus(settings), Ledger(f"sqlite+aiosqlite:///{tmp_path}/l.db"))


@contextlib.asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):  # Kafka is unreachable: $validate does not need it
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://relais.test") as client:
            yield client


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with running(_app(tmp_path)) as c:
        yield c


def _broken() -> dict[str, Any]:
    bundle = make_bundle(5, seed=3)
    del bundle["entry"][1]["resource"]["identifier"]  # the Patient INS: identifier 1..*
    return bundle


def _rules(outcome: dict[str, Any]) -> set[str]:
    return {e["valueString"] for i in outcome["issue"] for e in i.get("extension", ())
            if e["url"] == RULE_EXTENSION_URL}


def _severities(outcome: dict[str, Any]) -> set[str]:
    return {i["severity"] for i in outcome["issue"]}


async def test_valid_bundle_answers_200_all_ok(client: httpx.AsyncClient) -> None:
    r = await client.post(URL, content=orjson.dumps(make_bundle(30, seed=1)), headers=FHIR)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/fhir+json")
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert _severities(body) == {"information"}


async def test_invalid_bundle_still_answers_200_with_the_errors(client: httpx.AsyncClient) -> None:
    r = await client.post(URL, content=orjson.dumps(_broken()), headers=FHIR)
    assert r.status_code == 200
    errors = [i for i in r.json()["issue"] if i["severity"] == "error"]
    assert errors
    assert any(i["expression"] == ["Bundle.entry[1].resource.identifier"] for i in errors)
    assert all(i["diagnostics"] and i["code"] for i in errors)


async def test_no_transfer_is_created(client: httpx.AsyncClient) -> None:
    r = await client.post(URL, content=orjson.dumps(make_bundle(3)), headers=FHIR)
    assert r.status_code == 200
    assert "Content-Location" not in r.headers and "X-Relais-Transfer-Id" not in r.headers


async def test_french_when_accept_language_prefers_it(client: httpx.AsyncClient) -> None:
    body = orjson.dumps(_broken())
    en = (await client.post(URL, content=body, headers=FHIR)).json()
    fr = await client.post(URL, content=body, headers={**FHIR, "Accept-Language": "fr-FR,fr;q=0.9,en;q=0.5"})
    assert fr.headers["content-language"] == "fr"
    assert _rules(fr.json()) == _rules(en)
    assert [i["diagnostics"] for i in fr.json()["issue"]] != [i["diagnostics"] for i in en["issue"]]
    assert any("ajoutez" in i["diagnostics"] or " ; " in i["diagnostics"] for i in fr.json()["issue"])


async def test_english_when_english_is_preferred(client: httpx.AsyncClient) -> None:
    r = await client.post(URL, content=orjson.dumps(_broken()), headers={**FHIR, "Accept-Language": "en, fr;q=0.5"})
    assert r.headers["content-language"] == "en"


async def test_parameters_with_a_resource_parameter(client: httpx.AsyncClient) -> None:
    params = {"resourceType": "Parameters", "parameter": [
        {"name": "mode", "valueCode": "create"}, {"name": "resource", "resource": _broken()}]}
    direct = (await client.post(URL, content=orjson.dumps(_broken()), headers=FHIR)).json()
    r = await client.post(URL, content=orjson.dumps(params), headers=FHIR)
    assert r.status_code == 200
    assert r.json() == direct


@pytest.mark.parametrize("params", [
    {"resourceType": "Parameters"},
    {"resourceType": "Parameters", "parameter": [{"name": "profile", "valueUri": "x"}]},
    {"resourceType": "Parameters", "parameter": [{"name": "resource", "valueString": "x"}]},
    {"resourceType": "Parameters", "parameter": "nope"},
])
async def test_parameters_without_one_resource_is_400(client: httpx.AsyncClient, params: dict[str, Any]) -> None:
    r = await client.post(URL, content=orjson.dumps(params), headers=FHIR)
    assert r.status_code == 400
    assert _rules(r.json()) == {"relais-validate-input"}


@pytest.mark.parametrize(("body", "status"), [
    (b"", 400), (b"{not json", 400), (b"[1, 2]", 400), (b'{"resourceType": "Patient"}', 400), (b"{}", 400),
])
async def test_no_bundle_to_validate_is_400(client: httpx.AsyncClient, body: bytes, status: int) -> None:
    r = await client.post(URL, content=body, headers=FHIR)
    assert r.status_code == status
    assert r.json()["resourceType"] == "OperationOutcome"
    assert _severities(r.json()) == {"error"}


async def test_a_bundle_of_the_wrong_type_is_validated_not_refused(client: httpx.AsyncClient) -> None:
    bundle = make_bundle(3)
    bundle["type"] = "collection"
    r = await client.post(URL, content=orjson.dumps(bundle), headers=FHIR)
    assert r.status_code == 200
    assert any(i["severity"] == "error" and "Bundle.type" in i.get("expression", ()) for i in r.json()["issue"])


async def test_content_type_is_checked(client: httpx.AsyncClient) -> None:
    r = await client.post(URL, content=orjson.dumps(make_bundle(3)), headers={"Content-Type": "text/plain"})
    assert r.status_code == 415


async def test_size_is_checked(tmp_path: Path) -> None:
    async with running(_app(tmp_path, max_body_bytes=2048)) as c:
        r = await c.post(URL, content=orjson.dumps(make_bundle(30)), headers=FHIR)
    assert r.status_code == 413


async def test_authentication_like_post_fhir(tmp_path: Path) -> None:
    producers = write_producers(tmp_path / "producers.yaml")
    async with running(_app(tmp_path, auth_disabled=False, producers_file=producers)) as c:
        body = orjson.dumps(make_bundle(3))
        missing = await c.post(URL, content=body, headers=FHIR)
        wrong = await c.post(URL, content=body, headers={**FHIR, "Authorization": "Bearer nope"})
        good = await c.post(URL, content=body, headers={**FHIR, "Authorization": f"Bearer {TOKEN_A}"})
    assert missing.status_code == 401 and wrong.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert good.status_code == 200


async def test_operator_options_apply(tmp_path: Path) -> None:
    published = orjson.dumps(make_bundle(5, published_style=True))  # request.url warnings only
    async with running(_app(tmp_path)) as c:
        plain = (await c.post(URL, content=published, headers=FHIR)).json()
    async with running(_app(tmp_path, validation_warnings_as_errors=True)) as c:
        strict = (await c.post(URL, content=published, headers=FHIR)).json()
    async with running(_app(tmp_path, validation_ignore_rules=["tddui-bundle-request-url"])) as c:
        ignored = (await c.post(URL, content=published, headers=FHIR)).json()
    assert _severities(plain) == {"warning"} and "tddui-bundle-request-url" in _rules(plain)
    assert _severities(strict) == {"error"}
    assert "tddui-bundle-request-url" not in _rules(ignored)
