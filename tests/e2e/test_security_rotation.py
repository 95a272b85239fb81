"""Key rotation that really retires the old key, end to end on `relais run` (embedded bus) and a real HTTP target.

One Bundle is delivered and another dead-lettered under key `old`; the broker refuses to start with `old`
removed while data still needs it; `relais keys rotate` re-encrypts the log and the blobs; the broker then
starts with `new` alone, the same Bundle posted again is delivered, and the old dead letter replays. No blob
is named after the SHA-256 of anything that was posted.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from services.core import crypto
from tests.fixtures.tddui import make_bundle
from tests.support.embedded import EmbeddedRelais
from tests.support.processes import REPO

pytestmark = pytest.mark.e2e

AUTH = {"Authorization": "Bearer demo-token"}
OPS = {"Authorization": "Bearer rotation-ops-token"}
K_OLD, K_NEW = crypto.new_key("old"), crypto.new_key("new")
PLANTED_BY_TARGET, PLANTED_BY_VALIDATOR = "MARCELLINE-DUPONTEL", "ZORGLUBGENDER"


def post(relais: EmbeddedRelais, body: bytes, key: str | None = None) -> str:
    headers = {**AUTH, "Content-Type": "application/fhir+json", "X-Relais-Target": "demo"}
    if key is not None:
        headers["Idempotency-Key"] = key  # a deliberate new submission (else Bundle.identifier is the key)
    answer = httpx.post(f"{relais.url}/fhir", content=body, timeout=30, headers=headers)
    assert answer.status_code == 202, answer.text
    return str(answer.headers["X-Relais-Transfer-Id"])


def final(relais: EmbeddedRelais, transfer_id: str, timeout_s: float = 40) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = httpx.get(f"{relais.url}/transfers/{transfer_id}", headers=AUTH, timeout=10)
        if answer.status_code in (200, 422):  # the final answer: delivered / dead-lettered, or rejected
            return dict(answer.json())
        time.sleep(0.2)
    raise AssertionError(f"transfer {transfer_id} never completed\n{relais.log_tail()}")


def entry_status(outcome: dict[str, Any]) -> str:
    return str(outcome["entry"][0]["response"]["status"])


def marker(bundle: dict[str, Any]) -> str:
    """A value only this Bundle carries (its Patient's identifier), to count it at the target by content."""
    patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    return str(patient["identifier"][0]["value"])


def received_with(relais: EmbeddedRelais, text: str) -> int:
    bodies = httpx.get(f"http://127.0.0.1:{relais.target_port}/_received", timeout=10).json()
    return sum(1 for r in bodies if r["status"] < 300 and text in orjson.dumps(r["body"]).decode())


def stop_broker(relais: EmbeddedRelais) -> None:
    assert relais.proc is not None
    relais.proc.terminate()
    assert relais.proc.wait(60) == 0, relais.log_tail()


def keys(relais: EmbeddedRelais, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.cli", "keys", *args], env=relais.env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_rotation_retires_the_old_key_and_the_same_bundle_is_delivered_before_and_after(tmp_path: Path) -> None:
    relais = EmbeddedRelais(tmp_path)
    relais.env |= {"RELAIS_ENCRYPTION_KEYS": K_OLD, "RELAIS_CLAIM_CHECK_BYTES": "1024",
                   "RELAIS_OPS_TOKEN": "rotation-ops-token"}
    same, doomed = make_bundle(12, seed=901), make_bundle(12, seed=902)
    same_body, doomed_body = orjson.dumps(same), orjson.dumps(doomed)
    assert len(same_body) > 1024 and len(doomed_body) > 1024  # both travel as blobs (claim check)
    relais.start_target()
    relais.start()
    try:
        first = post(relais, same_body)
        assert entry_status(final(relais, first)).startswith("201") or received_with(relais, marker(same)) == 1
        target_says = {"resourceType": "OperationOutcome", "issue": [{
            "severity": "error", "code": "invalid", "diagnostics": f"patient {PLANTED_BY_TARGET} already exists"}]}
        httpx.post(f"http://127.0.0.1:{relais.target_port}/_faults", json={"status": 400, "count": 1,
                   "body": target_says}, timeout=10).raise_for_status()
        dead = post(relais, doomed_body)
        assert PLANTED_BY_TARGET in orjson.dumps(final(relais, dead)).decode()  # the producer is told, in full
        rejected = post(relais, orjson.dumps(with_gender(make_bundle(6, seed=903), PLANTED_BY_VALIDATOR)))
        assert PLANTED_BY_VALIDATOR in orjson.dumps(final(relais, rejected)).decode()
        assert received_with(relais, marker(same)) == 1 and received_with(relais, marker(doomed)) == 0
        stop_broker(relais)  # the target keeps running: it counts both deliveries

        # The old key removed before rotating: refused at start, saying what to do.
        relais.env["RELAIS_ENCRYPTION_KEYS"] = K_NEW
        refused = subprocess.run([sys.executable, "-m", "services.cli", "run"], env=relais.env, cwd=REPO,
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert "'old'" in refused.stderr and "relais keys rotate" in refused.stderr
        assert keys(relais, "status").returncode == 1

        relais.env["RELAIS_ENCRYPTION_KEYS"] = f"{K_NEW},{K_OLD}"
        rotated = keys(relais, "rotate")
        assert rotated.returncode == 0, rotated.stderr
        assert "checked" in rotated.stdout and "re-encrypted" in rotated.stdout, rotated.stdout

        relais.env["RELAIS_ENCRYPTION_KEYS"] = K_NEW  # the old key is gone for good
        assert keys(relais, "status").returncode == 0
        relais.start()
        second = post(relais, same_body, key="sent-again-after-rotation")
        final(relais, second)
        assert received_with(relais, marker(same)) == 2  # before and after the rotation
        replay = httpx.post(f"{relais.url}/ops/dead-letters/{dead}/demo/replay", headers=OPS, timeout=10)
        assert replay.status_code == 202, replay.text
        deadline = time.monotonic() + 40
        while received_with(relais, marker(doomed)) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert received_with(relais, marker(doomed)) == 1, relais.log_tail()
    finally:
        relais.stop()

    names = {p.name for p in (tmp_path / "blobs").rglob("*") if p.is_file()}
    assert names
    posted = {hashlib.sha256(b).hexdigest() for b in (same_body, doomed_body)}
    assert not names & posted  # a listing of the blob directory confirms no guessed Bundle
    for path in (tmp_path / "blobs").rglob("*"):
        if path.is_file():
            assert crypto.blob_key_id(path.read_bytes()) == "new"
    # Data at rest: nothing personal in clear in the ledger, the log or the blobs (issue 11).
    planted = [PLANTED_BY_TARGET, PLANTED_BY_VALIDATOR, marker(same), marker(doomed)]
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "run.log" and p.suffix != ".yaml"]
    leaks = [(p.name, m) for p in files for m in planted if m.encode() in p.read_bytes()]
    assert not leaks, leaks


def with_gender(bundle: dict[str, Any], gender: str) -> dict[str, Any]:
    for entry in bundle["entry"]:
        if entry["resource"]["resourceType"] == "Patient":
            entry["resource"]["gender"] = gender  # the validator quotes the value it rejects
    return bundle
