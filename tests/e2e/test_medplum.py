"""The IG's published example shape, through Relais, to a real FHIR server (Medplum, in memory).

The published TDDUI examples put profile names in `entry.request.url` and link entries with
absolute `fullUrl`s and relative `Type/id` references. A real server refuses the first and does not
rewrite the second. With repair on (the default) Relais delivers them so that every resource is
created and every reference points at the created resource; with repair off the server's refusal
reaches the dead-letter queue with its OperationOutcome.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from starlette.requests import Request
from starlette.responses import Response

from services.core.envelope import FHIR_JSON
from services.core.settings import Settings
from services.core.targets import Target
from services.delivery.client import TargetClient
from services.delivery.marker import Verdict, mark_transfer, probe_plan
from services.ingress.status import (
    ASSIGNED_EXTENSION_URL,
    STATUS_EXTENSION_URL,
    TARGET_EXTENSION_URL,
)
from tests.fixtures.tddui import make_bundle
from tests.support.embedded import EmbeddedRelais
from tests.support.medplum import MedplumServer, medplum_server  # noqa: F401 - the fixture
from tests.support.processes import REPO, free_port
from tests.support.producers import write_targets

pytestmark = pytest.mark.e2e
AUTH = {"Authorization": "Bearer demo-token"}
TARGET = "medplum"


@pytest.fixture
def relais_for(tmp_path: Path, medplum_server: MedplumServer) -> Iterator[Any]:  # noqa: F811
    """Start `relais run` (embedded bus) delivering to Medplum with a given repair policy."""
    started: list[EmbeddedRelais] = []

    def start(repair: dict[str, bool] | None) -> EmbeddedRelais:
        targets = write_targets(tmp_path / "targets.yaml", {TARGET: medplum_server.base_url}, repair=repair)
        # Medplum refuses conditional creates in a transaction of more than 8 entries ("Transaction
        # requires strict isolation but has too many entries"); these tests send 12.
        targets.write_text(targets.read_text(encoding="utf-8") + "    conditional_create: off\n", encoding="utf-8")
        relais = EmbeddedRelais(tmp_path, targets_file=targets)
        started.append(relais)
        relais.start()
        return relais

    yield start
    for relais in started:
        assert relais.stop() in (0, None), relais.log_tail()


def send(relais: EmbeddedRelais, bundle: dict[str, Any], key: str | None = None) -> str:
    keyed = {"Idempotency-Key": f'"{key}"'} if key else {}
    answer = httpx.post(f"{relais.url}/fhir", content=orjson.dumps(bundle), timeout=30,
                        headers={**AUTH, **keyed, "Content-Type": FHIR_JSON, "X-Relais-Target": TARGET})
    assert answer.status_code == 202, answer.text
    return answer.headers["X-Relais-Transfer-Id"]


def final_status(relais: EmbeddedRelais, transfer_id: str, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = httpx.get(f"{relais.url}/fhir/_transfer/{transfer_id}", headers=AUTH, timeout=10)
        if answer.status_code == 200:
            return answer.json()  # type: ignore[no-any-return]
        assert answer.status_code == 202, answer.text  # a 202 is a promise: never 404
        time.sleep(0.2)
    raise AssertionError(f"transfer {transfer_id} never completed\n{relais.log_tail()}")


def target_entry(status: dict[str, Any]) -> dict[str, Any]:
    assert status["resourceType"] == "Bundle" and status["type"] == "batch-response", status
    entries: list[dict[str, Any]] = [e for e in status["entry"]
                                     if {"url": TARGET_EXTENSION_URL, "valueString": TARGET} in e.get("extension", [])]
    assert len(entries) == 1, status
    return entries[0]


def assigned(entry: dict[str, Any]) -> dict[str, str]:
    """fullUrl → location, from the per-target entry's assigned-id extensions."""
    out = {}
    for ext in entry.get("extension", []):
        if ext["url"] == ASSIGNED_EXTENSION_URL:
            parts = {p["url"]: p["valueUri"] for p in ext["extension"]}
            out[parts["fullUrl"]] = parts["location"]
    return out


def type_and_id(location: str) -> str:
    """`Type/id` of a location, absolute or relative, with or without `/_history/vid`."""
    path = location.split("/_history/")[0].rstrip("/")
    return "/".join(path.split("/")[-2:])


def references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("reference"), str):
            yield node["reference"]
        for key, value in node.items():
            if key != "contained":
                yield from references(value)
    elif isinstance(node, list):
        for item in node:
            yield from references(item)


def test_published_style_bundle_is_created_on_medplum_with_its_references_intact(
        relais_for: Any, medplum_server: MedplumServer) -> None:  # noqa: F811
    relais = relais_for(None)  # repair: the defaults (on)
    bundle = make_bundle(12, seed=808, published_style=True)
    assert any(e["request"]["url"] != e["resource"]["resourceType"] for e in bundle["entry"])  # the IG's shape
    transfer_id = send(relais, bundle)

    status = final_status(relais, transfer_id)
    entry = target_entry(status)
    assert {"url": STATUS_EXTENSION_URL, "valueCode": "delivered"} in entry["extension"], entry
    response = entry["resource"]
    assert response["resourceType"] == "Bundle" and response["type"] == "transaction-response"
    assert [e["response"]["status"].split()[0] for e in response["entry"]] == ["201"] * 12

    # The status maps every fullUrl the producer sent to the resource the server created for it.
    mapping = assigned(entry)
    originals = [e["fullUrl"] for e in bundle["entry"]]
    assert sorted(mapping) == sorted(originals)
    created: dict[str, dict[str, Any]] = {}  # Type/id on Medplum → the resource read back
    original_to_new: dict[str, str] = {}
    for sent in bundle["entry"]:
        new = type_and_id(mapping[sent["fullUrl"]])
        resource = medplum_server.read(new)
        assert resource is not None, f"{sent['fullUrl']} → {new}: not on the server"
        assert resource["resourceType"] == sent["resource"]["resourceType"]
        assert resource["id"] == new.split("/")[1] != sent["resource"]["id"]  # the server assigned it
        created[new] = resource
        original_to_new[f"{sent['resource']['resourceType']}/{sent['resource']['id']}"] = new

    # Every reference between entries, read back from the server, names a resource it created —
    # the very one the producer meant.
    checked = 0
    for sent in bundle["entry"]:
        stored = created[type_and_id(mapping[sent["fullUrl"]])]
        meant = list(references(sent["resource"]))
        got = list(references(stored))
        assert len(got) == len(meant)
        for before, after in zip(meant, got, strict=True):
            target = type_and_id(before)
            if target in original_to_new:  # a reference to another entry of the Bundle
                assert after == original_to_new[target], f"{before} became {after}"
                assert medplum_server.read(after) is not None
                checked += 1
            else:
                assert after == before  # outside the Bundle: untouched
    assert checked >= 11, "the fixture links every entry to an earlier one"

    # And nothing else was created (one Bundle, twelve resources).
    for rtype in {e["resource"]["resourceType"] for e in bundle["entry"]}:
        found = medplum_server.get(rtype).json()
        expected = sum(1 for e in bundle["entry"] if e["resource"]["resourceType"] == rtype)
        assert len(found.get("entry", [])) == expected, rtype


def test_without_repair_medplums_refusal_is_dead_lettered_with_its_operation_outcome(
        relais_for: Any, medplum_server: MedplumServer) -> None:  # noqa: F811
    relais = relais_for({"request_url": False, "references": False})
    transfer_id = send(relais, make_bundle(12, seed=809, published_style=True))

    status = final_status(relais, transfer_id)
    outcome = dead_letter_outcome(status)
    assert outcome["resourceType"] == "OperationOutcome", status
    text = orjson.dumps(outcome).decode()
    assert "Incorrect resource type" in text and "TDDUIOrganization" in text, text  # Medplum's own words

    # The operator's view: one open dead letter for (transfer, medplum), HTTP 400, Medplum's outcome.
    listing = subprocess.run([sys.executable, "-m", "services.cli", "dlq", "list", "--target", TARGET, "--json"],
                             env=relais.env, cwd=REPO, capture_output=True, timeout=60, check=True)
    letters = [orjson.loads(line) for line in listing.stdout.splitlines() if line.strip()]
    assert len(letters) == 1, listing.stdout
    letter = letters[0]
    assert (letter["transfer_id"], letter["target"], letter["last_http_status"]) == (transfer_id, TARGET, 400)
    assert letter["outcome"] == outcome, letter
    # Nothing was created on the server.
    for rtype in ("Organization", "Patient", "Encounter"):
        assert not medplum_server.get(rtype).json().get("entry"), rtype


def test_without_reference_repair_medplum_creates_everything_but_the_references_dangle(
        relais_for: Any, medplum_server: MedplumServer) -> None:  # noqa: F811
    """Why `repair.references` exists: the issue's second finding, reproduced on the real server."""
    relais = relais_for({"request_url": True, "references": False})
    bundle = make_bundle(3, seed=810, published_style=True)  # Organization, Patient, Encounter séjour
    status = final_status(relais, send(relais, bundle))
    mapping = assigned(target_entry(status))
    stay = medplum_server.read(type_and_id(mapping[bundle["entry"][2]["fullUrl"]]))
    assert stay is not None
    sent_subject = bundle["entry"][2]["resource"]["subject"]["reference"]
    assert stay["subject"]["reference"] == sent_subject  # stored as sent: the producer's id…
    assert medplum_server.read(sent_subject) is None  # …which names nothing on this server
    assert medplum_server.read(type_and_id(mapping[bundle["entry"][1]["fullUrl"]])) is not None


def dead_letter_outcome(status: dict[str, Any]) -> dict[str, Any]:
    """The target's OperationOutcome from a final status: a per-target entry, or the outcome itself."""
    if status.get("resourceType") == "OperationOutcome":
        return status
    entry = target_entry(status)
    assert {"url": STATUS_EXTENSION_URL, "valueCode": "dead-lettered"} in entry["extension"], entry
    assert entry["response"]["status"].startswith("400"), entry
    return entry["response"]["outcome"]  # type: ignore[no-any-return]


async def test_the_probe_finds_exactly_this_transfer_on_medplum_by_its_marker(
        relais_for: Any, medplum_server: MedplumServer) -> None:  # noqa: F811
    """A real server answers the probe's `_tag` search: this transfer applied, another one absent."""
    relais = relais_for(None)
    bundle = make_bundle(8, seed=809)
    transfer_id = send(relais, bundle)
    entry = target_entry(final_status(relais, transfer_id))
    assert {"url": STATUS_EXTENSION_URL, "valueCode": "delivered"} in entry["extension"], entry

    system = Settings().transfer_tag_system
    plan = probe_plan(mark_transfer(bundle, system, transfer_id))
    client = TargetClient(Target(id=TARGET, base_url=medplum_server.base_url))
    try:
        applied = await client.probe(plan, system, transfer_id)
        absent = await client.probe(plan, system, "another-transfer")
    finally:
        await client.aclose()
    assert applied.verdict is Verdict.APPLIED, applied
    assert len(applied.found) == 8
    assert set(applied.found) == {type_and_id(loc) for loc in assigned(entry).values()}
    assert absent.verdict is Verdict.ABSENT, absent


def references_resolve(server: MedplumServer, resource: dict[str, Any]) -> int:
    """Every `Type/id` reference of a stored resource names a resource the server holds; returns how many."""
    count = 0
    for ref in references(resource):
        if ref.count("/") == 1 and not ref.startswith(("urn:", "http")):
            assert server.read(ref) is not None, f"{resource['resourceType']}/{resource['id']}: {ref} dangles"
            count += 1
    return count


@pytest.mark.parametrize(("mode", "copies"), [("auto", 1), ("off", 2)])
def test_conditional_create_makes_a_second_delivery_create_nothing_twice(
        tmp_path: Path, medplum_server: MedplumServer, mode: str, copies: int) -> None:  # noqa: F811
    """auto: Medplum's CapabilityStatement declares conditionalCreate, so Relais sends request.ifNoneExist
    on every identified entry; the same Bundle delivered twice creates each resource once. off: twice."""
    targets = tmp_path / "targets.yaml"
    targets.write_text(f"targets:\n  - id: {TARGET}\n    base_url: {medplum_server.base_url}\n"
                       f"    conditional_create: {mode}\n", encoding="utf-8")
    relais = EmbeddedRelais(tmp_path, targets_file=targets)
    relais.start()
    try:
        bundle = make_bundle(5, seed=811, published_style=True)  # every entry has a business identifier
        first = final_status(relais, send(relais, bundle, key="first-delivery"))
        second = final_status(relais, send(relais, bundle, key="second-delivery"))  # the same export, replayed
    finally:
        assert relais.stop() in (0, None), relais.log_tail()
    for status in (first, second):
        assert {"url": STATUS_EXTENSION_URL, "valueCode": "delivered"} in target_entry(status)["extension"], status

    for rtype in {e["resource"]["resourceType"] for e in bundle["entry"]}:
        stored = [e["resource"] for e in medplum_server.get(rtype).json().get("entry", [])]
        expected = sum(1 for e in bundle["entry"] if e["resource"]["resourceType"] == rtype)
        assert len(stored) == expected * copies, (rtype, len(stored))
        for resource in stored:
            references_resolve(medplum_server, resource)
    if mode == "auto":
        # The replay's answer names the resources the first delivery created: the same ids.
        assert assigned(target_entry(first)) == assigned(target_entry(second))
        sent = target_entry(second)["resource"]
        assert [e["response"]["status"].split()[0] for e in sent["entry"]] == ["200"] * 5, sent


class LossyProxy:
    """A pass-through to Medplum that loses the answer of the first transaction: Medplum applies it,
    Relais hears nothing back (the failure is ambiguous) — the case conditional create exists for."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rsplit("/fhir", 1)[0]
        self.port = free_port()
        self.lost = 0
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error",
                                                    interface="asgi3", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        request = Request(scope, receive)
        url = f"{self.upstream}{request.url.path}" + (f"?{request.url.query}" if request.url.query else "")
        async with httpx.AsyncClient(timeout=30) as client:
            answer = await client.request(request.method, url, content=await request.body(), headers={
                "Content-Type": request.headers.get("content-type", FHIR_JSON), "Accept": FHIR_JSON})
        if request.method == "POST" and request.url.path.rstrip("/") == "/fhir" and not self.lost:
            self.lost += 1
            await asyncio.sleep(8)  # applied upstream; Relais times out waiting for the answer
        await Response(answer.content, answer.status_code, media_type=FHIR_JSON)(scope, receive, send)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the proxy never started"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}/fhir"

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(20)


@pytest.mark.parametrize(("mode", "copies"), [("auto", 1), ("off", 2)])
def test_a_dead_letter_replayed_after_its_answer_was_lost_creates_nothing_twice(
        tmp_path: Path, medplum_server: MedplumServer, mode: str, copies: int) -> None:  # noqa: F811
    """Medplum applies the transaction, its answer is lost, the ambiguous failure is dead-lettered
    (policy `dead-letter`), and the operator replays it from the DLQ (/ops): with conditional create
    each resource exists once and references resolve; without it, twice."""
    with LossyProxy(medplum_server.base_url) as proxied:
        targets = tmp_path / "targets.yaml"
        targets.write_text(f"targets:\n  - id: {TARGET}\n    base_url: {proxied}\n"
                           f"    timeouts: {{connect_s: 2, total_s: 2}}\n    ambiguous: dead-letter\n"
                           f"    conditional_create: {mode}\n", encoding="utf-8")
        relais = EmbeddedRelais(tmp_path, targets_file=targets)
        relais.env["RELAIS_OPS_TOKEN"] = "ops-token-for-replay"
        relais.start()
        try:
            bundle = make_bundle(5, seed=812, published_style=True)  # every entry has a business identifier
            transfer_id = send(relais, bundle)
            lost = final_status(relais, transfer_id)
            assert {"url": STATUS_EXTENSION_URL, "valueCode": "dead-lettered"} in target_entry(lost)["extension"]
            assert medplum_server.get("Patient").json().get("entry"), "Medplum applied the lost transaction"
            replay = httpx.post(f"{relais.url}/ops/dead-letters/{transfer_id}/{TARGET}/replay", timeout=30,
                                headers={"Authorization": "Bearer ops-token-for-replay"})
            assert replay.status_code in (200, 202), replay.text
            deadline = time.monotonic() + 60
            status = final_status(relais, transfer_id)
            while {"url": STATUS_EXTENSION_URL, "valueCode": "delivered"} not in target_entry(status)["extension"]:
                assert time.monotonic() < deadline, status
                time.sleep(0.3)
                status = final_status(relais, transfer_id)
        finally:
            assert relais.stop() in (0, None), relais.log_tail()
    for rtype in {e["resource"]["resourceType"] for e in bundle["entry"]}:
        stored = [e["resource"] for e in medplum_server.get(rtype).json().get("entry", [])]
        expected = sum(1 for e in bundle["entry"] if e["resource"]["resourceType"] == rtype)
        assert len(stored) == expected * copies, (rtype, len(stored))
        for resource in stored:
            references_resolve(medplum_server, resource)
