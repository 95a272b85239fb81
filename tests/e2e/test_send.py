"""`relais send` on 1,000 files: counts match the ledger, and a re-run after Ctrl-C resends nothing accepted."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import orjson
import pytest

from tests.fixtures.tddui import make_bundle
from tests.support.embedded import EmbeddedRelais
from tests.support.processes import REPO
from tests.support.producers import write_targets
from tests.support.schemas import check_embedded_log

pytestmark = pytest.mark.e2e


def write_files(folder: Path) -> dict[str, int]:
    """950 valid Bundles, 30 that ingress refuses (not transactions), 20 the validator rejects."""
    folder.mkdir()
    for i in range(950):
        (folder / f"valid-{i:04d}.json").write_bytes(orjson.dumps(make_bundle(4, seed=20_000 + i)))
    for i in range(30):
        b = make_bundle(3, seed=30_000 + i)
        b["type"] = "collection"
        (folder / f"collection-{i:04d}.json").write_bytes(orjson.dumps(b))
    for i in range(20):
        b = make_bundle(3, seed=40_000 + i)
        b["entry"][1]["request"]["method"] = "PUT"  # TDDUI: creates only
        (folder / f"put-{i:04d}.json").write_bytes(orjson.dumps(b))
    return {"accepted": 970, "rejected": 30}


def send_cmd(folder: Path, relais: EmbeddedRelais, journal: Path, report: Path) -> list[str]:
    return [sys.executable, "-m", "services.cli", "send", str(folder), "--to", "demo", "--url", relais.url,
            "--token", "demo-token", "--concurrency", "8", "--journal", str(journal), "--report", str(report)]


def ledger_transfers(tmp_path: Path) -> dict[str, int]:
    with sqlite3.connect(tmp_path / "ledger.db") as db:
        return dict(db.execute("SELECT status, count(*) FROM transfers GROUP BY status").fetchall())


def test_send_1000_files_interrupted_then_resumed(tmp_path: Path) -> None:
    relais = EmbeddedRelais(tmp_path)
    relais.start_target()
    relais.start()
    try:
        expected = write_files(tmp_path / "export")
        # The target fails part of the time (every other request, 40 times): deliveries retry, and that
        # must change nothing in what send reports or in what the ledger ends with.
        for _ in range(40):
            for fault in ({"status": 503, "count": 1}, {"delay_s": 0.0, "count": 1}):
                httpx.post(f"http://127.0.0.1:{relais.target_port}/_faults", json=fault).raise_for_status()
        journal, report1, report2 = tmp_path / "journal", tmp_path / "r1.json", tmp_path / "r2.json"

        first = subprocess.Popen(send_cmd(tmp_path / "export", relais, journal, report1), cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while (not journal.exists() or len(journal.read_text().splitlines()) < 300) and time.monotonic() < deadline:
            time.sleep(0.05)
        first.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = first.communicate(timeout=60)
        assert first.returncode == 130, err
        r1 = json.loads(report1.read_text())
        assert r1["interrupted"] and r1["not_sent"] > 0
        assert "run the same command again" in out

        second = subprocess.run(send_cmd(tmp_path / "export", relais, journal, report2), cwd=REPO,
                                capture_output=True, text=True, timeout=600)
        assert second.returncode == 1, second.stderr  # 30 files are refused: exit 1, and the report says why
        r2 = json.loads(report2.read_text())
        assert r2["skipped"] == r1["accepted"]  # nothing accepted the first time was sent again
        assert r1["accepted"] + r2["accepted"] == expected["accepted"]
        assert r2["rejected"] == expected["rejected"]
        assert r2["failed"] == 0
        refused = [f for f in r2["files"] if f["result"] == "rejected"]
        assert all(f["status"] == 422 and "transaction" in f["reason"] for f in refused)

        # The ledger holds exactly the accepted transfers: one each, no resubmission.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            counts = ledger_transfers(tmp_path)
            if sum(counts.values()) >= expected["accepted"] and set(counts) <= {"delivered", "rejected"}:
                break
            time.sleep(1)
        counts = ledger_transfers(tmp_path)
        assert sum(counts.values()) == expected["accepted"], counts
        assert counts == {"delivered": 950, "rejected": 20}, counts
        # Every record the pipeline wrote matches schemas/envelope.schema.json and schemas/asyncapi.yaml.
        topics = check_embedded_log(tmp_path / "log.db")
        assert {"transfers.received", "transfers.validated", "transfers.rejected", "deliveries",
                "deliveries.retry.1", "transfers.events"} <= set(topics), topics
    finally:
        relais.stop()


def applied_at_target(relais: EmbeddedRelais) -> Counter[tuple[str, str]]:
    """(target id, Bundle.identifier) of every transaction the demo target applied: counted by content."""
    received = httpx.get(f"http://127.0.0.1:{relais.target_port}/_received", timeout=30).json()
    return Counter((r["request_id"].rsplit("/", 1)[-1], r["body"]["identifier"]["value"])
                   for r in received if r["applied"])


def test_send_identical_files_to_two_targets_then_after_kill_9_reports_each_file_once(tmp_path: Path) -> None:
    relais = EmbeddedRelais(tmp_path)
    url = f"http://127.0.0.1:{relais.target_port}/fhir"
    relais.env["RELAIS_TARGETS_FILE"] = str(write_targets(tmp_path / "abc.yaml", {"a": url, "b": url, "c": url}))
    relais.start_target()
    relais.start()
    folder = tmp_path / "export"
    folder.mkdir()
    same = orjson.dumps(make_bundle(4, seed=50_000))
    for i in range(12):  # twelve copies of one export: one request per target, each file reported with it
        (folder / f"copy-{i:02d}.json").write_bytes(same)
    distinct = [make_bundle(4, seed=50_001), make_bundle(4, seed=50_002)]
    for i, bundle in enumerate(distinct):
        (folder / f"other-{i}.json").write_bytes(orjson.dumps(bundle))
    invalid = make_bundle(3, seed=50_003)
    invalid["entry"][1]["request"]["method"] = "PUT"  # the validator rejects it
    (folder / "invalid.json").write_bytes(orjson.dumps(invalid))
    identifiers = {orjson.loads(same)["identifier"]["value"], *(b["identifier"]["value"] for b in distinct)}
    journal = tmp_path / "journal"

    def send(target: str, report: Path) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "services.cli", "send", str(folder), "--to", target, "--url", relais.url,
             "--token", "demo-token", "--journal", str(journal), "--report", str(report), "--wait",
             "--wait-timeout", "120"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def check(report_file: Path) -> None:
        report = json.loads(report_file.read_text())
        files = report["files"]
        assert sorted(f["path"] for f in files) == sorted(str(p) for p in folder.iterdir())  # each file once
        results = Counter(f["result"] for f in files)
        assert results == {"delivered": 14, "rejected": 1}, files
        assert len({f["transfer_id"] for f in files if "copy-" in f["path"]}) == 1  # one request, one transfer
        [bad] = [f for f in files if f["result"] == "rejected"]
        assert bad["path"].endswith("invalid.json") and bad["status"] == 422 and "PUT" in bad["reason"]

    try:
        for target in ("a", "b"):
            run = send(target, tmp_path / f"{target}.json")
            out, err = run.communicate(timeout=180)
            assert run.returncode == 1, err  # one file rejected: exit 1
            assert "delivered: 14" in out and "rejected: 1" in out and "skipped" not in out, out
            check(tmp_path / f"{target}.json")
        # kill -9 while transfers to c are in flight (the target holds its answers a while), then again.
        faults = f"http://127.0.0.1:{relais.target_port}/_faults"
        httpx.post(faults, json={"delay_s": 1.5, "count": 2}).raise_for_status()
        before = len(journal.read_text().splitlines())
        killed = send("c", tmp_path / "c-killed.json")
        deadline = time.monotonic() + 60
        while len(journal.read_text().splitlines()) == before and time.monotonic() < deadline:
            time.sleep(0.02)
        killed.send_signal(signal.SIGKILL)
        killed.communicate(timeout=30)
        assert not (tmp_path / "c-killed.json").exists()  # it died before its report
        again = send("c", tmp_path / "c.json")
        out, err = again.communicate(timeout=180)
        assert again.returncode == 1, err
        check(tmp_path / "c.json")

        applied = applied_at_target(relais)
        assert applied == Counter({(t, i): 1 for t in "abc" for i in identifiers}), applied
    finally:
        relais.stop()
