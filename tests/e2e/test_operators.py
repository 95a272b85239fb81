"""Operators act on a running `relais run` (embedded bus) from another folder, through `/ops` only.

The CLI runs as a real process in an empty folder whose environment names nothing but the broker's
URL and a token; outcomes are counted at the demo target, by content.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.broker import OPERATOR_TOKEN, VIEWER_TOKEN, Broker, running_broker
from tests.support.processes import REPO, free_port
from tests.support.webhook import Receiver, listening_in_thread

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with listening_in_thread(Receiver()) as r:
        yield r


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[Broker]:
    env = {"RELAIS_ALERT_WEBHOOK_URL": receiver.url, "RELAIS_ALERT_KEEP_FIRING_S": "1",
           "RELAIS_ALERT_WEBHOOK_BACKOFF_MAX_S": "1"}
    with running_broker(tmp_path_factory.mktemp("operators"), env) as b:
        yield b


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    folder = tmp_path / "somewhere-else"
    folder.mkdir()
    return folder


def relais(folder: Path, *argv: str, url: str | None = None, token: str | None = OPERATOR_TOKEN,
           broker: Broker | None = None) -> subprocess.CompletedProcess[str]:
    """`relais ARGV` run from `folder`, with only RELAIS_URL and RELAIS_OPS_TOKEN set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAIS_")}
    env["PYTHONPATH"] = str(REPO)
    env["RELAIS_URL"] = url or (broker.base if broker else "")
    if token is not None:
        env["RELAIS_OPS_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "services.cli", *argv], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=60)


def dead_letter(broker: Broker, dlq_id: str) -> dict[str, object] | None:
    items = broker.ops("GET", "/ops/dead-letters").json()["items"]
    return next((d for d in items if d["id"] == dlq_id), None)


def transfer_status(broker: Broker, transfer_id: str) -> str | None:
    answer = broker.ops("GET", f"/ops/transfers/{transfer_id}")
    return answer.json()["status"] if answer.status_code == 200 else None


def test_cli_from_another_folder_through_ops(broker: Broker, elsewhere: Path) -> None:
    broker.fault({"status": 422, "count": 1})  # refused once: a delivery dead letter
    transfer_id, marker = broker.send()
    dlq_id = f"{transfer_id}/demo"
    broker.wait(lambda: dead_letter(broker, dlq_id), what="the dead letter")

    listed = relais(elsewhere, "dlq", "list", broker=broker)
    assert listed.returncode == 0, listed.stderr
    assert dlq_id in listed.stdout and "delivery" in listed.stdout
    shown = relais(elsewhere, "dlq", "show", dlq_id, broker=broker)
    assert shown.returncode == 0, shown.stderr
    body = orjson.loads(shown.stdout)
    assert body["stage"] == "delivery" and "422" in body["reason"] and body["original"]["topic"] == "deliveries"
    assert list(elsewhere.iterdir()) == []  # no database or log file left behind

    # Writes: no token, or a viewer's, are refused with a clear line; an operator's work.
    refused = relais(elsewhere, "dlq", "replay", dlq_id, broker=broker, token=None)
    assert refused.returncode == 4 and "no operator token given" in refused.stderr, refused.stderr
    viewer = relais(elsewhere, "targets", "pause", "demo", broker=broker, token=VIEWER_TOKEN)
    assert viewer.returncode == 4 and "role viewer" in viewer.stderr and "Traceback" not in viewer.stderr
    assert relais(elsewhere, "dlq", "list", broker=broker, token=VIEWER_TOKEN).returncode == 0  # reads are fine

    paused = relais(elsewhere, "targets", "pause", "demo", "--reason", "maintenance", broker=broker)
    assert paused.returncode == 0 and orjson.loads(paused.stdout)["paused"] is True, paused.stderr
    assert broker.ops("GET", "/ops/targets/demo").json()["pause"]["reason"] == "maintenance"
    resumed = relais(elsewhere, "targets", "resume", "demo", broker=broker)
    assert resumed.returncode == 0 and orjson.loads(resumed.stdout)["paused"] is False

    replayed = relais(elsewhere, "dlq", "replay", dlq_id, broker=broker)
    assert replayed.returncode == 0 and f"{dlq_id} replayed" in replayed.stdout, replayed.stderr
    again = relais(elsewhere, "dlq", "replay", dlq_id, broker=broker)
    assert again.returncode == 5 and "another replay or discard" in again.stderr
    broker.wait(lambda: transfer_status(broker, transfer_id) == "delivered", what="delivery after replay")
    assert broker.received(marker) == 1

    status = relais(elsewhere, "status", transfer_id, broker=broker)
    assert status.returncode == 0, status.stderr
    assert f"transfer {transfer_id}: delivered" in status.stdout
    assert "target demo: delivered, 1 attempt(s), last HTTP 200" in status.stdout
    assert "id assigned:" in status.stdout
    as_json = relais(elsewhere, "status", transfer_id, "--json", broker=broker)
    assert as_json.returncode == 0 and orjson.loads(as_json.stdout)["status"] == "delivered"
    assert relais(elsewhere, "status", "no-such-transfer", broker=broker).returncode == 1

    broker.fault({"status": 422, "count": 1})
    second, _ = broker.send()
    broker.wait(lambda: dead_letter(broker, f"{second}/demo"), what="a second dead letter")
    rejected = relais(elsewhere, "status", second, broker=broker)
    assert rejected.returncode == 12 and "target demo: dead-lettered" in rejected.stdout
    discarded = relais(elsewhere, "dlq", "discard", f"{second}/demo", "--reason", "sent again by hand", broker=broker)
    assert discarded.returncode == 0, discarded.stderr
    assert dead_letter(broker, f"{second}/demo") is None


def test_broker_down_gives_one_line_and_exit_3(elsewhere: Path) -> None:
    for argv in (["dlq", "list"], ["targets", "pause", "demo"], ["status", "x"]):
        done = relais(elsewhere, *argv, url=f"http://127.0.0.1:{free_port()}")
        assert done.returncode == 3 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "cannot reach the Relais broker" in done.stderr and not done.stdout


def test_ten_concurrent_replays_deliver_once(broker: Broker) -> None:
    broker.fault({"status": 422, "count": 1})
    transfer_id, marker = broker.send()
    dlq_id = f"{transfer_id}/demo"
    broker.wait(lambda: dead_letter(broker, dlq_id), what="the dead letter")

    async def replay_ten() -> list[int]:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"}, timeout=30) as client:
            answers = await asyncio.gather(*(client.post(f"{broker.base}/ops/dead-letters/{dlq_id}/replay")
                                             for _ in range(10)))
        return sorted(a.status_code for a in answers)

    assert asyncio.run(replay_ten()) == [202] + [409] * 9
    broker.wait(lambda: transfer_status(broker, transfer_id) == "delivered", what="delivery after replay")
    # Later replays are refused too, and nothing more reaches the target.
    assert broker.ops("POST", f"/ops/dead-letters/{dlq_id}/replay").status_code == 409
    assert broker.received(marker) == 1
    assert broker.received(marker, applied_only=False) == 2  # the refused attempt, then the one replay


def test_poison_in_the_validator_is_listed_and_replayed_once_fixed(broker: Broker, elsewhere: Path) -> None:
    marker = "poison-marker-7f3a"
    broker.fault_file.write_text(marker, encoding="utf-8")  # the validator now raises on this Bundle
    transfer_id, _ = broker.send(marker)
    dlq_id = f"{transfer_id}/@validator"
    letter = broker.wait(lambda: dead_letter(broker, dlq_id), what="the validator's dead letter")
    assert letter["stage"] == "validator" and "simulated validator bug" in str(letter["reason"])
    assert letter["original"]["topic"] == "transfers.received" and letter["replay_to"] == "transfers.received"
    assert transfer_status(broker, transfer_id) == "dead-lettered"

    listed = relais(elsewhere, "dlq", "list", "--stage", "validator", broker=broker)
    assert listed.returncode == 0 and dlq_id in listed.stdout, listed.stderr
    shown = orjson.loads(relais(elsewhere, "dlq", "show", dlq_id, "--payload", broker=broker).stdout)
    assert shown["bundle"]["resourceType"] == "Bundle" and marker in orjson.dumps(shown["bundle"]).decode()
    login = httpx.post(f"{broker.base}/ops/ui/login", data={"token": OPERATOR_TOKEN, "next": "/ops/ui/dlq"},
                       follow_redirects=True, timeout=10)
    assert dlq_id in login.text  # the dashboard lists it with the delivery dead letters

    broker.fault_file.unlink()  # the cause is fixed
    replayed = relais(elsewhere, "dlq", "replay", dlq_id, broker=broker)
    assert replayed.returncode == 0, replayed.stderr
    broker.wait(lambda: transfer_status(broker, transfer_id) == "delivered", what="delivery after the replay")
    assert broker.received(marker) == 1
    assert dead_letter(broker, dlq_id) is None
    assert relais(elsewhere, "dlq", "replay", dlq_id, broker=broker).returncode == 5


def test_search_by_business_identifier_finds_the_transfer(broker: Broker) -> None:
    transfer_id, marker = broker.send()
    broker.wait(lambda: transfer_status(broker, transfer_id) == "delivered", what="delivery")
    found = broker.ops("GET", "/ops/search", params={"identifier": f"urn:relais-test:{marker}"}).json()
    assert [t["id"] for t in found["items"]] == [transfer_id]
    log = broker.ops("GET", "/ops/access-log").json()["items"]
    assert log[0]["action"] == "search.identifier" and marker not in str(log)


def metric(broker: Broker, name: str, **labels: str) -> float:
    """The sum over every process, as Prometheus would scrape them: the ingress and each worker."""
    total = 0.0
    for url in (f"{broker.base}/metrics", *broker.worker_metrics):
        for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
    return total


def test_metrics_match_what_the_target_received(broker: Broker) -> None:
    before_rejected = metric(broker, "relais_bundles_rejected_total")
    before_delivered = metric(broker, "relais_deliveries_total", target="demo", result="delivered")
    good = [broker.send() for _ in range(3)]
    bad = [broker.send(invalid=True) for _ in range(2)]
    for transfer_id, _ in good:
        broker.wait(lambda t=transfer_id: transfer_status(broker, t) == "delivered", what="deliveries")
    for transfer_id, _ in bad:
        broker.wait(lambda t=transfer_id: transfer_status(broker, t) == "rejected", what="rejections")
    received = sum(broker.received(marker) for _, marker in good)
    assert received == 3 and sum(broker.received(marker, applied_only=False) for _, marker in bad) == 0
    assert metric(broker, "relais_bundles_rejected_total") - before_rejected == len(bad)
    assert metric(broker, "relais_bundles_rejected_total", producer="dui-a") >= len(bad)
    assert metric(broker, "relais_deliveries_total", target="demo", result="delivered") - before_delivered == received


def test_alerts_stay_firing_until_the_target_is_back_and_the_dlq_replayed(broker: Broker, receiver: Receiver) -> None:
    assert broker.ops("GET", "/ops/overview").json()["dlq_size"] == 0, "earlier tests left dead letters"
    broker.fault({"status": 500, "count": -1})  # the target is down for the whole first half
    sent = [broker.send() for _ in range(2)]
    for transfer_id, _ in sent:
        broker.wait(lambda t=transfer_id: dead_letter(broker, f"{t}/demo"), what="dead letters")
    broker.wait(lambda: receiver.seen("target_down", "demo") == ["firing"], what="target_down firing")
    broker.wait(lambda: receiver.seen("dlq_not_empty", "dlq")[-1:] == ["firing"], what="dlq_not_empty firing")
    dlq_notes = len(receiver.seen("dlq_not_empty", "dlq"))
    time.sleep(4)  # four evaluations, with nothing retrying any more: still firing
    broker.fault(None)  # the target is back, but nothing has been delivered to it yet
    time.sleep(3)
    assert receiver.seen("target_down", "demo") == ["firing"]
    assert receiver.seen("dlq_not_empty", "dlq")[dlq_notes - 1:] == ["firing"]
    firing = broker.ops("GET", "/ops/overview").json()
    assert firing["dlq_size"] == 2 and next(t for t in firing["targets"] if t["target"] == "demo")["health"] == "down"

    replayed = broker.ops("POST", "/ops/dead-letters/replay", json={"target": "demo"})
    assert replayed.status_code == 202 and replayed.json()["count"] == 2
    for transfer_id, _ in sent:
        broker.wait(lambda t=transfer_id: transfer_status(broker, t) == "delivered", what="delivery after replay")
    broker.wait(lambda: receiver.seen("target_down", "demo") == ["firing", "resolved"], what="target_down resolved")
    broker.wait(lambda: receiver.seen("dlq_not_empty", "dlq")[-1:] == ["resolved"], what="dlq_not_empty resolved")
    assert sum(broker.received(marker) for _, marker in sent) == 2


def test_a_replay_claim_left_by_a_crash_is_taken_over_once_stale_and_a_live_one_is_not(broker: Broker) -> None:
    """A broker killed between claiming a replay and publishing it leaves the dead letter `replaying`
    with no `replayed` event: once that claim is stale (and the tracker has projected every event, so a
    published replay would show), a new replay takes it over; a fresh claim is still refused."""
    broker.fault({"status": 422, "count": 1})
    transfer_id, marker = broker.send()
    dlq_id = f"{transfer_id}/demo"
    broker.wait(lambda: dead_letter(broker, dlq_id), what="the dead letter")

    def claimed(minutes_ago: float) -> None:  # the state a kill -9 right after the claim leaves behind
        with sqlite3.connect(broker.tmp / "ledger.db", timeout=30) as db:
            moved = db.execute("UPDATE deliveries SET status='replaying', updated_at=datetime('now', ?) "
                               "WHERE transfer_id=? AND target='demo'", (f"-{minutes_ago} minutes", transfer_id))
            assert moved.rowcount == 1

    claimed(0)
    fresh = broker.ops("POST", f"/ops/dead-letters/{dlq_id}/replay")
    assert fresh.status_code == 409 and "replaying" in fresh.text, fresh.text
    claimed(10)
    taken_over = broker.ops("POST", f"/ops/dead-letters/{dlq_id}/replay")
    assert taken_over.status_code == 202, taken_over.text
    broker.wait(lambda: transfer_status(broker, transfer_id) == "delivered", what="delivery after the take-over")
    assert broker.received(marker) == 1
