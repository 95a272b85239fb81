"""One person, one order, end to end (issue 15): `relais run`, 5 senders x 10 Bundles, a healthy and a flaky target.

Each sender is one person's DUI, waiting for its 202 before the next Bundle; every other Bundle adds a
driving licence to the person's identifiers (the key must not change with it). Outcomes are counted
at the targets, by transfer: each person's Bundles arrive in send order at both, none lost or twice.
It runs with two worker processes: every record of one lane (target + person), first attempt and retries,
must be handled by one of them at a time (a lane split across two processes inverted them, issue 15).
"""

from __future__ import annotations

import asyncio
import copy
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.fixtures.tddui import make_bundle
from tests.support.embedded import EmbeddedRelais
from tests.support.processes import DemoTarget

pytestmark = pytest.mark.e2e
AUTH = {"Authorization": "Bearer demo-token"}
PERSONS, BUNDLES = 5, 10
LICENCE_TYPE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "DL"}]}


def persons_bundle(person: int, n: int) -> dict[str, Any]:
    """The n-th Bundle of `person`: fresh content, the person's own Patient (plus a licence when n is odd)."""
    bundle = make_bundle(3, seed=10_000 + 100 * person + n)
    patient = copy.deepcopy(next(e["resource"] for e in make_bundle(3, seed=person)["entry"]
                                 if e["resource"]["resourceType"] == "Patient"))
    if n % 2:
        patient["identifier"].append({"type": LICENCE_TYPE, "system": "https://ants.gouv.fr/",
                                      "value": f"{person:02d}AB{n:05d}"})
    entry = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    entry["resource"] = patient
    return bundle


async def test_each_persons_bundles_arrive_in_send_order_at_a_healthy_and_a_flaky_target(tmp_path: Path) -> None:
    healthy, flaky = DemoTarget(tmp_path / "healthy.log").start(), DemoTarget(tmp_path / "flaky.log").start()
    for n in range(3 * PERSONS * BUNDLES):  # a third of the transactions refused with 503
        flaky.fault(status=503) if n % 3 == 0 else flaky.fault(delay_s=0.0)
    targets_file = tmp_path / "targets.yaml"
    targets_file.write_text(
        "targets:\n"
        f"  - id: healthy\n    base_url: {healthy.fhir}\n"
        f"  - id: flaky\n    base_url: {flaky.fhir}\n    breaker: {{failures: 1000}}\n"
        "    retry: {delays_s: [0.3, 0.6], max_attempts: 20, jitter: 0}\n", encoding="utf-8")
    relais = EmbeddedRelais(tmp_path, targets_file=targets_file)
    relais.env["RELAIS_WORKERS"] = "2"  # each worker process holds part of the lanes: order must hold across them
    sent: dict[str, tuple[int, int]] = {}  # transfer id -> (person, n)
    try:
        relais.start()
        async with httpx.AsyncClient(timeout=30) as client:

            async def sender(person: int) -> None:
                for n in range(BUNDLES):
                    r = await client.post(f"{relais.url}/fhir", content=orjson.dumps(persons_bundle(person, n)),
                                          headers={**AUTH, "Content-Type": "application/fhir+json",
                                                   "X-Relais-Target": "healthy,flaky"})
                    assert r.status_code == 202, r.text
                    sent[r.headers["X-Relais-Transfer-Id"]] = (person, n)

            await asyncio.gather(*(sender(p) for p in range(PERSONS)))
            for _ in range(240):  # at most two minutes
                if all(len(_applied(t)) >= PERSONS * BUNDLES for t in (healthy, flaky)):
                    break
                await asyncio.sleep(0.5)
    finally:
        relais.stop()
        rows = {"healthy": _applied(healthy), "flaky": _applied(flaky)}
        flaky_refused = sum(1 for r in flaky.received() if r["status"] == 503)
        healthy.stop()
        flaky.stop()
    assert flaky_refused >= 10, "the flaky target was not flaky"
    for name, applied in rows.items():
        transfers = [str(r["request_id"]).split("/")[0] for r in applied]
        assert len(transfers) == len(set(transfers)) == PERSONS * BUNDLES, f"{name}: lost or duplicated"
        for person in range(PERSONS):
            order = [sent[t][1] for t in transfers if sent[t][0] == person]
            assert order == list(range(BUNDLES)), f"{name}: person {person}'s Bundles arrived as {order}"


def _applied(target: DemoTarget) -> list[dict[str, Any]]:
    rows = [r for r in target.received() if r["applied"]]
    return sorted(rows, key=lambda r: datetime.fromisoformat(str(r["time"])))
