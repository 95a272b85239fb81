"""No personal data in logs or metrics: the whole broker (`relais run`, embedded bus, demo target) carries
Bundles full of recognisable fake personal data — delivered, rejected, refused at the door — at debug log
level; then every log line and every metric is scanned for it. The audit trail is checked on the way."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.fixtures.tddui import make_bundle
from tests.support.embedded import EmbeddedRelais

pytestmark = pytest.mark.e2e
AUTH = {"Authorization": "Bearer demo-token"}
OPS = {"Authorization": "Bearer ops-secret-for-logscan"}
FAMILY, GIVEN, PRO, CONTACT = "ZORGLUBOVSKA", "PHILOMENETTE", "QUIBBLEFORTH", "MARMADUKIAN"


def personal(bundle: dict[str, Any], n: int) -> tuple[dict[str, Any], set[str]]:
    """The Bundle with recognisable names; returns it and every personal value it carries."""
    text = (orjson.dumps(bundle).decode().replace("TESTUSAGER", f"{FAMILY}{n}").replace("TESTPRO", PRO)
            .replace("TESTCONTACT", CONTACT))
    out = orjson.loads(text)
    markers = {f"{FAMILY}{n}", PRO, CONTACT, GIVEN}
    for entry in out["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] == "Patient":
            for name in resource.get("name", []):
                name["given"] = [GIVEN]
            markers.add(resource["birthDate"])
            markers |= {i["value"] for i in resource.get("identifier", []) if len(i.get("value", "")) >= 13}
            markers |= {t["value"] for t in resource.get("telecom", []) if t.get("value")}
    return out, markers


async def test_no_personal_data_in_logs_or_metrics(tmp_path: Path) -> None:
    relais = EmbeddedRelais(tmp_path)
    relais.env |= {"RELAIS_LOG_LEVEL": "debug", "RELAIS_LOG_FORMAT": "json",
                   "RELAIS_OPS_TOKEN": OPS["Authorization"][7:], "RELAIS_ENCRYPTION_KEYS": "k1:" + "A" * 43 + "="}
    relais.start_target()
    relais.start()
    markers: set[str] = set()
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            accepted = []
            for n in range(6):
                bundle, found = personal(make_bundle(12, seed=900 + n), n)
                markers |= found
                if n == 4:  # invalid: the Patient loses its identifiers -> rejected, with an OperationOutcome
                    for entry in bundle["entry"]:
                        entry["resource"].pop("identifier", None) if entry["resource"]["resourceType"] == "Patient" \
                            else None
                    entry0 = bundle["entry"][0]["resource"]
                    entry0["name"] = f"{FAMILY}{n} 1984-05-12"
                answer = await client.post(f"{relais.url}/fhir", content=orjson.dumps(bundle),
                                           headers={**AUTH, "Content-Type": "application/fhir+json",
                                                    "X-Relais-Target": "demo"})
                assert answer.status_code == 202, answer.text
                accepted.append(answer.headers["X-Relais-Transfer-Id"])
            # Refused at the door: unknown target, bad token, not JSON, JSON with personal data but not a Bundle.
            await client.post(f"{relais.url}/fhir", content=orjson.dumps(bundle),
                              headers={**AUTH, "Content-Type": "application/fhir+json", "X-Relais-Target": "nowhere"})
            await client.post(f"{relais.url}/fhir", content=orjson.dumps(bundle),
                              headers={"Authorization": f"Bearer {FAMILY}", "Content-Type": "application/fhir+json",
                                       "X-Relais-Target": "demo"})
            await client.post(f"{relais.url}/fhir", content=f"{FAMILY} {GIVEN} not json".encode(),
                              headers={**AUTH, "Content-Type": "application/fhir+json", "X-Relais-Target": "demo"})
            await client.post(f"{relais.url}/fhir", content=orjson.dumps({"resourceType": f"{FAMILY}"}),
                              headers={**AUTH, "Content-Type": "application/fhir+json", "X-Relais-Target": "demo"})

            deadline = time.monotonic() + 120
            pending = list(accepted)
            while pending and time.monotonic() < deadline:
                answers = await asyncio.gather(*(client.get(f"{relais.url}/transfers/{t}", headers=AUTH)
                                                 for t in pending))
                pending = [t for t, a in zip(pending, answers, strict=True) if a.status_code == 202]
                await asyncio.sleep(0.3)
            assert not pending, relais.log_tail()

            metrics = (await client.get(f"{relais.url}/metrics")).text
            trail = (await client.get(f"{relais.url}/ops/audit", headers=OPS, params={"limit": 500})).json()
            export = (await client.get(f"{relais.url}/ops/audit/$export", headers=OPS)).json()
            verified = (await client.get(f"{relais.url}/ops/audit/verify", headers=OPS)).json()
    finally:
        relais.stop()

    kinds = [i["kind"] for i in trail["items"]]
    assert kinds.count("accepted") == 6 and kinds.count("delivered") == 5 and kinds.count("rejected") == 1, kinds
    assert all(i["actor"] == "demo-dui" for i in trail["items"] if i["kind"] == "accepted")
    assert export["resourceType"] == "Bundle" and all(
        e["resource"]["resourceType"] == "AuditEvent" for e in export["entry"])
    assert (verified["valid"], verified["first_bad_seq"]) == (True, None), verified
    assert verified["anchor_seq"] is not None  # the tracker anchored the head on the bus (audit.head)

    log = (tmp_path / "run.log").read_text(errors="replace")
    audit_text = orjson.dumps([trail, export]).decode()
    lines = log.splitlines()
    assert len(lines) > 50, "the run should have logged plenty at debug level"
    markers = {m for m in markers if m}
    leaks = [(m, line[:300]) for line in [*lines, *metrics.splitlines(), audit_text] for m in markers if m in line]
    assert not leaks, f"personal data leaked into logs, metrics or audit: {leaks[:5]}"
    # The Bundles themselves never reach the log at rest either (encrypted in the embedded log).
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("log.db*"))
    assert FAMILY.encode() not in stored and PRO.encode() not in stored
    print(f"\n[log scan] {len(lines)} log lines, {len(metrics.splitlines())} metric lines, "
          f"{len(markers)} personal values looked for: none found")
