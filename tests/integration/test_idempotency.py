"""Idempotent submission: one key, one transfer — across retries, restarts, concurrent requests and crashes.

Ingress on the embedded log, its ledger on SQLite and on PostgreSQL; what was published is counted
in the log itself. The end-to-end promise (one delivery at a real target) is in tests/e2e/test_send.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa

from services.app import create_app
from services.core.embedded import EmbeddedBus
from services.core.settings import Settings
from services.core.topics import RECEIVED
from services.tracker.auditkey import new_audit_key
from services.tracker.ledger import Ledger, submissions
from tests.fixtures.tddui import make_bundle
from tests.support.postgres import PostgresCluster, start_cluster
from tests.support.producers import TOKEN_A, TOKEN_B, write_producers, write_targets


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    yield from start_cluster()


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request: pytest.FixtureRequest, make_settings: Callable[..., Settings], tmp_path: Path) -> Settings:
    """Ingress on the embedded log; the ledger database (and so the keys' unique constraint) on each dialect."""
    # PostgreSQL: the audit key every process needs comes from the environment (with SQLite, a file beside the ledger).
    database = {} if request.param == "sqlite" else {"database_url": request.getfixturevalue("postgres").new_database(),
                                                     "audit_key": new_audit_key()}
    return make_settings(**database, embedded_log_path=tmp_path / "log.db", auth_disabled=False,
                         producers_file=write_producers(tmp_path / "p.yaml", b_targets=["essms-a", "sidoba"]),
                         targets_file=write_targets(tmp_path / "t.yaml", {"essms-a": "http://127.0.0.1:9/fhir",
                                                                         "sidoba": "http://127.0.0.1:9/fhir"}))


@contextlib.asynccontextmanager
async def ingress(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, EmbeddedBus(settings), Ledger(settings.database_url))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://relais.test") as client:
            for _ in range(200):
                if (await client.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            yield client


def headers(key: str | None, token: str = TOKEN_A, target: str = "essms-a") -> dict[str, str]:
    h = {"Content-Type": "application/fhir+json", "Authorization": f"Bearer {token}", "X-Relais-Target": target}
    if key is not None:
        h["Idempotency-Key"] = key
    return h


def published(settings: Settings) -> list[str]:
    """Transfer ids of every transfers.received record in the embedded log."""
    with contextlib.closing(sqlite3.connect(settings.embedded_log_path)) as db:
        rows = db.execute("SELECT headers FROM records WHERE topic = ?", (settings.topic(RECEIVED),)).fetchall()
    return [_transfer_id(orjson.loads(h)) for (h,) in rows]


def _transfer_id(headers: Any) -> str:
    pairs = headers.items() if isinstance(headers, dict) else headers
    for key, value in pairs:
        if key.endswith("transferid"):
            return base64.b64decode(value).decode()
    raise AssertionError(f"no transfer id header in {headers}")


async def test_same_key_same_body_is_one_transfer_even_after_a_restart(settings: Settings) -> None:
    body = orjson.dumps(make_bundle(4, seed=1))
    key = '"8e03978e-40d5-43e8-bc93-6894a57f9324"'  # a structured-field string, as the draft writes it
    async with ingress(settings) as client:
        answers = [await client.post("/fhir", content=body, headers=headers(key)) for _ in range(3)]
    async with ingress(settings) as client:  # a restart: the keys live in the ledger database
        answers.append(await client.post("/fhir", content=body, headers=headers(key)))
        different = await client.post("/fhir", content=orjson.dumps(make_bundle(4, seed=2)), headers=headers(key))
        other_targets = await client.post("/fhir", content=body, headers=headers(key, target="essms-a,sidoba"))
        # Keys belong to a producer: another producer's same key is its own transfer.
        other_producer = await client.post("/fhir", content=body, headers=headers(key, token=TOKEN_B))
    assert [a.status_code for a in answers] == [202] * 4, [a.text for a in answers]
    assert len({a.headers["Content-Location"] for a in answers}) == 1
    assert different.status_code == 422 and other_targets.status_code == 422
    issue = different.json()["issue"][0]
    assert different.json()["resourceType"] == "OperationOutcome" and issue["code"] == "conflict"
    assert answers[0].headers["X-Relais-Transfer-Id"] in issue["diagnostics"]
    assert other_producer.status_code == 202
    assert other_producer.headers["Content-Location"] != answers[0].headers["Content-Location"]
    assert sorted(published(settings)) == sorted([answers[0].headers["X-Relais-Transfer-Id"],
                                                  other_producer.headers["X-Relais-Transfer-Id"]])


async def test_bundle_identifier_is_the_key_when_no_header_is_given(settings: Settings) -> None:
    bundle = make_bundle(3, seed=3)
    bundle["identifier"] = {"system": "urn:ietf:rfc:3986", "value": "urn:uuid:0b7c2c0e-5d7e-4bde-9a59-6f0d9b0e8a11"}
    async with ingress(settings) as client:
        first = await client.post("/fhir", content=orjson.dumps(bundle), headers=headers(None))
        again = await client.post("/fhir", content=orjson.dumps(bundle), headers=headers(None))
        elsewhere = await client.post("/fhir", content=orjson.dumps(bundle), headers=headers(None, target="sidoba"))
        bundle["entry"] = bundle["entry"][:2]
        changed = await client.post("/fhir", content=orjson.dumps(bundle), headers=headers(None))
        no_identifier = make_bundle(3, seed=4)
        no_identifier.pop("identifier", None)
        plain = [await client.post("/fhir", content=orjson.dumps(no_identifier), headers=headers(None))
                 for _ in range(2)]
    assert first.status_code == again.status_code == 202
    assert first.headers["Content-Location"] == again.headers["Content-Location"]
    assert changed.status_code == 422
    assert elsewhere.status_code == 202  # the same export to another target is another transfer
    assert elsewhere.headers["Content-Location"] != first.headers["Content-Location"]
    assert plain[0].headers["Content-Location"] != plain[1].headers["Content-Location"]  # no key: no idempotency
    assert len(published(settings)) == 4


async def test_ten_identical_requests_at_once_are_one_transfer(settings: Settings) -> None:
    body = orjson.dumps(make_bundle(4, seed=5))
    async with ingress(settings) as client:
        answers = await asyncio.gather(*(client.post("/fhir", content=body, headers=headers("k-at-once"))
                                         for _ in range(10)))
    assert [a.status_code for a in answers] == [202] * 10, [a.text for a in answers]
    assert len({a.headers["X-Relais-Transfer-Id"] for a in answers}) == 1
    assert published(settings) == [answers[0].headers["X-Relais-Transfer-Id"]]


@pytest.mark.parametrize(("state", "age_s", "republished"), [
    ("publishing", 120, True),  # the process died between recording the key and publishing
    ("failed", 0, True),  # the bus refused the publish (the producer got 503)
    ("publishing", 0, False),  # another request is publishing right now: 409 after waiting for it
])
async def test_a_key_left_by_a_crash_or_a_refusal_is_taken_over(settings: Settings, state: str, age_s: float,
                                                                 republished: bool) -> None:
    body = orjson.dumps(make_bundle(4, seed=6))
    from services.ingress.submissions import fingerprint

    ledger = Ledger(settings.database_url)
    await ledger.create_schema()
    moment = datetime.now(UTC) - timedelta(seconds=age_s)
    async with ledger.submissions_engine.begin() as conn:
        await conn.execute(sa.insert(submissions).values(
            transfer_id="left-behind", producer="dui-a", idem_key="h:k-crash",
            fingerprint=fingerprint(["essms-a"], body), state=state, created_at=moment, updated_at=moment))
    await ledger.close()
    async with ingress(settings.model_copy(update={"kafka_timeout_s": 0.5})) as client:
        answer = await client.post("/fhir", content=body, headers=headers("k-crash"))
        status = await client.get("/fhir/_transfer/left-behind", headers=headers(None))
    if republished:
        assert answer.status_code == 202, answer.text
        assert answer.headers["X-Relais-Transfer-Id"] == "left-behind"
        assert published(settings) == ["left-behind"]
        assert status.status_code == 202
    else:
        assert answer.status_code == 409 and answer.headers["Retry-After"], answer.text
        assert published(settings) == []


async def test_a_malformed_key_is_refused(settings: Settings) -> None:
    async with ingress(settings) as client:
        answer = await client.post("/fhir", content=orjson.dumps(make_bundle(3, seed=7)),
                                   headers=headers("x" * 300))
    assert answer.status_code == 400 and answer.json()["resourceType"] == "OperationOutcome"
    assert published(settings) == []


async def test_a_202_never_waits_for_the_workers_hold_on_a_sqlite_ledger(make_settings: Callable[..., Settings],
                                                                        tmp_path: Path) -> None:
    """SQLite has one writer: with the submission in the ledger file, every 202 queued behind the tracker's
    and the delivery journal's transactions (seconds under load). A worker holding the ledger's write lock
    must not delay the ingress's answer."""
    settings = make_settings(embedded_log_path=tmp_path / "log.db", auth_disabled=False,
                             producers_file=write_producers(tmp_path / "p.yaml"),
                             targets_file=write_targets(tmp_path / "t.yaml", {"essms-a": "http://127.0.0.1:9/fhir"}))
    ledger_file = settings.database_url.split("///", 1)[1]
    async with ingress(settings) as client:
        worker = sqlite3.connect(ledger_file, timeout=30, isolation_level=None)
        worker.execute("BEGIN IMMEDIATE")  # a worker's transaction, holding the write lock
        try:
            began = asyncio.get_running_loop().time()
            answer = await client.post("/fhir", content=orjson.dumps(make_bundle(3, seed=77)), headers=headers(None))
            took = asyncio.get_running_loop().time() - began
        finally:
            worker.execute("ROLLBACK")
            worker.close()
        assert answer.status_code == 202, answer.text
        assert took < 1.0, f"the 202 waited {took:.1f}s for a worker's write lock on the ledger"
        status = await client.get(answer.headers["Content-Location"].replace("http://relais.test", ""),
                                  headers=headers(None))
        assert status.status_code in (200, 202)


async def test_posts_at_once_are_marked_published_together(settings: Settings) -> None:
    """Each 202's row is written before the answer and marked published after it, both group-committed with the
    other POSTs': fewer transactions than writes (20 rows, 20 marks), none lost."""
    app = create_app(settings, EmbeddedBus(settings), Ledger(settings.database_url))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://relais.test") as client:
            for _ in range(200):
                if (await client.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            answers = await asyncio.gather(*(client.post("/fhir", content=orjson.dumps(make_bundle(2, seed=900 + i)),
                                                         headers=headers(f"k-{i}")) for i in range(20)))
        background = app.state.ingress.background
    assert [a.status_code for a in answers] == [202] * 20
    assert 2 <= background.transactions <= 20  # rows in before the 202s, marked published after; drained at stop
    ledger = Ledger(settings.database_url)
    try:
        async with ledger.submissions_engine.connect() as conn:
            states = dict((await conn.execute(sa.select(submissions.c.transfer_id, submissions.c.state))).all())
    finally:
        await ledger.close()
    assert {states[a.headers["X-Relais-Transfer-Id"]] for a in answers} == {"published"}
