"""The operator API (/ops) on a real ledger and the embedded bus: every filter and action, with roles."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI

from services.app import create_app
from services.core.blobstore import make_blob_store
from services.core.embedded import EmbeddedBus
from services.core.settings import Settings
from services.core.topics import DELIVERIES, EVENTS
from services.tracker.ledger import Ledger
from tests.support.kafka import wait_for
from tests.support.producers import TOKEN_A, write_producers, write_targets
from tests.unit.ops.test_ledger_queries import T0, ev, story

VIEWER, OPERATOR = "viewer-token", "operator-token"


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def settings(tmp_path: Path, make_settings: Callable[..., Settings]) -> Settings:
    ops = tmp_path / "operators.yaml"
    ops.write_text(f"operators:\n  - {{id: vera, token_sha256: {sha(VIEWER)}, role: viewer}}\n"
                   f"  - {{id: otto, token_sha256: {sha(OPERATOR)}, role: operator}}\n", encoding="utf-8")
    targets = write_targets(tmp_path / "targets.yaml", {"a": "http://127.0.0.1:9/fhir", "b": "http://127.0.0.1:9/fhir"})
    return make_settings(auth_disabled=False, producers_file=write_producers(tmp_path / "producers.yaml"),
                         targets_file=targets, operators_file=ops, kafka_bootstrap=None,
                         embedded_log_path=tmp_path / "log.db", blob_dir=tmp_path / "blobs")


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    ledger = Ledger(settings.database_url)
    app = create_app(settings, EmbeddedBus(settings), ledger)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://relais.test") as c:
            await wait_for(lambda: _ready(c), timeout_s=20)
            yield c, app


async def _ready(client: httpx.AsyncClient) -> bool:
    return (await client.get("/readyz")).status_code == 200


async def seed(app: FastAPI, settings: Settings) -> None:
    ledger: Ledger = app.state.ops.ledger
    blob = await make_blob_store(settings).put(b'{"resourceType": "Bundle", "type": "transaction"}')
    evs = (story("t1", 0, targets=("a", "b"), finess="750000001")
           + story("t2", 10, producer="dui-b", targets=("b",), fate="retrying")
           + story("t3", 20, targets=("a",), fate="retrying"))
    evs.append(ev("t2", "dead_lettered", "delivery", 12, target="b", attempt=2, producer="dui-b", http_status=400,
                  duration_ms=50, reason="HTTP 400 Bad Request", key="b|t2",
                  blob={"uri": blob.uri, "sha256": blob.sha256, "size": blob.size},
                  outcome={"resourceType": "OperationOutcome", "issue": [{"diagnostics": "secret"}]}))
    for e in evs:
        await ledger.apply(e)


async def get(client: httpx.AsyncClient, path: str, token: str = VIEWER, **params: Any) -> Any:
    answer = await client.get(path, params=params, headers=bearer(token))
    assert answer.status_code == 200, answer.text
    return answer.json()


async def test_auth_and_roles(settings: Settings) -> None:
    async with running(settings) as (client, app):
        await seed(app, settings)
        assert (await client.get("/ops/transfers")).status_code == 401
        assert (await client.get("/ops/transfers", headers=bearer("wrong"))).status_code == 401
        refused = await client.get("/ops/transfers", headers=bearer(TOKEN_A))
        assert refused.status_code == 403 and "producer tokens" in refused.text
        assert (await get(client, "/ops/whoami")) == {"id": "vera", "role": "viewer"}
        for path, body in [("/ops/dead-letters/t2/b/replay", None), ("/ops/dead-letters/replay", {"target": "b"}),
                           ("/ops/dead-letters/t2/b/discard", {"reason": "x"}), ("/ops/targets/a/pause", None),
                           ("/ops/targets/a/resume", None)]:
            answer = await client.post(path, json=body, headers=bearer(VIEWER))
            assert answer.status_code == 403, path
            assert (await client.post(path, json=body, headers=bearer(TOKEN_A))).status_code == 403, path
        assert (await client.get("/ops/transfers/t2/bundle", params={"target": "b"},
                                 headers=bearer(VIEWER))).status_code == 403
        assert (await client.get("/ops/access-log", headers=bearer(VIEWER))).status_code == 403


async def test_transfer_filters_and_pagination(settings: Settings) -> None:
    async with running(settings) as (client, app):
        await seed(app, settings)

        async def ids(**params: Any) -> list[str]:
            return [t["id"] for t in (await get(client, "/ops/transfers", **params))["items"]]

        assert await ids() == ["t3", "t2", "t1"]
        assert await ids(status="dead-lettered") == ["t2"]
        assert await ids(producer="dui-b") == ["t2"]
        assert await ids(target="a") == ["t3", "t1"]
        assert await ids(finess="750000001") == ["t1"]
        assert await ids(since=(T0 + timedelta(seconds=5)).isoformat(),
                         until=(T0 + timedelta(seconds=15)).isoformat()) == ["t2"]
        first = await get(client, "/ops/transfers", limit=2)
        assert [t["id"] for t in first["items"]] == ["t3", "t2"] and first["next_cursor"]
        second = await get(client, "/ops/transfers", limit=2, cursor=first["next_cursor"])
        assert [t["id"] for t in second["items"]] == ["t1"] and second["next_cursor"] is None
        bad = await client.get("/ops/transfers", params={"cursor": "nope"}, headers=bearer(VIEWER))
        assert bad.status_code == 400
        assert (await client.get("/ops/transfers", params={"since": "yesterday"},
                                 headers=bearer(VIEWER))).status_code == 400


async def test_timeline_and_recorded_access(settings: Settings) -> None:
    async with running(settings) as (client, app):
        await seed(app, settings)
        tl = await get(client, "/ops/transfers/t2")
        assert [s["kind"] for s in tl["steps"]][-1] == "dead_lettered" and "secret" not in str(tl)
        assert (await client.get("/ops/transfers/none", headers=bearer(VIEWER))).status_code == 404
        full = await get(client, "/ops/transfers/t2", full="true")
        assert "secret" in str(full)
        bundle = await client.get("/ops/transfers/t2/bundle", params={"target": "b"}, headers=bearer(OPERATOR))
        assert bundle.status_code == 200 and bundle.json()["resourceType"] == "Bundle"
        log = (await get(client, "/ops/access-log", OPERATOR, transfer_id="t2"))["items"]
        assert [(e["operator"], e["action"]) for e in log] == [("otto", "bundle.read"), ("vera", "timeline.full")]
        assert (await client.get("/ops/transfers/t1/bundle", params={"target": "a"},
                                 headers=bearer(OPERATOR))).status_code == 404


async def test_overview_lag_and_targets(settings: Settings) -> None:
    async with running(settings) as (client, app):
        await seed(app, settings)
        over = await get(client, "/ops/overview")
        assert over["dlq_size"] == 1 and {s["stage"] for s in over["lag"]} == {"validator", "router", "delivery",
                                                                               "tracker"}
        lag = {s["stage"]: s for s in (await get(client, "/ops/lag"))["stages"]}
        assert set(lag["delivery"]["topics"]) >= {"deliveries", "deliveries.retry.1"}
        targets = {t["target"]: t for t in (await get(client, "/ops/targets"))["items"]}
        assert targets["a"]["circuit"] == "closed" and targets["a"]["waiting"] == 1
        assert targets["b"]["dead_letters"] == 1 and targets["b"]["p50_ms"] is None  # attempts older than 1 h
        assert (await get(client, "/ops/targets/b"))["target"] == "b"
        assert (await client.get("/ops/targets/zz", headers=bearer(VIEWER))).status_code == 404


async def test_pause_and_resume(settings: Settings) -> None:
    async with running(settings) as (client, _):
        paused = await client.post("/ops/targets/a/pause", json={"reason": "maintenance"}, headers=bearer(OPERATOR))
        assert paused.status_code == 200 and paused.json()["paused"] is True
        a = await get(client, "/ops/targets/a")
        assert a["paused"] and a["pause"]["changed_by"] == "otto" and a["pause"]["reason"] == "maintenance"
        assert (await client.post("/ops/targets/a/resume", headers=bearer(OPERATOR))).json()["paused"] is False
        assert not (await get(client, "/ops/targets/a"))["paused"]
        assert (await client.post("/ops/targets/zz/pause", headers=bearer(OPERATOR))).status_code == 404


async def _published(settings: Settings, topic: str) -> list[Any]:
    bus = EmbeddedBus(settings)
    await bus.start()
    sub = bus.subscribe(f"probe-{topic}", [topic])
    await sub.start()
    try:
        return await sub.poll(100, 1.0)
    finally:
        await sub.stop()
        await bus.stop()


async def test_dead_letters_list_replay_bulk_and_discard(settings: Settings) -> None:
    async with running(settings) as (client, app):
        await seed(app, settings)
        listed = await get(client, "/ops/dead-letters")
        assert [d["id"] for d in listed["items"]] == ["t2/b"]
        for params, expect in [({"target": "a"}, []), ({"target": "b"}, ["t2/b"]), ({"producer": "dui-a"}, []),
                               ({"reason": "bad request"}, ["t2/b"]), ({"reason": "timeout"}, []),
                               ({"since": (T0 + timedelta(seconds=13)).isoformat()}, []),
                               ({"until": (T0 + timedelta(seconds=13)).isoformat()}, ["t2/b"])]:
            assert [d["id"] for d in (await get(client, "/ops/dead-letters", **params))["items"]] == expect, params
        assert (await client.post("/ops/dead-letters/replay", json={}, headers=bearer(OPERATOR))).status_code == 400
        bulk = await client.post("/ops/dead-letters/replay", json={"target": "b"}, headers=bearer(OPERATOR))
        assert bulk.status_code == 202 and bulk.json()["replayed"] == ["t2/b"]
        again = await client.post("/ops/dead-letters/t2/b/replay", headers=bearer(OPERATOR))
        assert again.status_code == 409 and "another replay or discard" in again.text  # replayed once only
        assert (await client.post("/ops/dead-letters/t9/b/replay", headers=bearer(OPERATOR))).status_code == 404
        late = await client.post("/ops/dead-letters/t2/b/discard", json={"reason": "duplicate"},
                                 headers=bearer(OPERATOR))
        assert late.status_code == 409
    records = await _published(settings, DELIVERIES)
    assert [(r.envelope.transfer_id, r.envelope.target) for r in records] == [("t2", "b")]
    kinds = [orjson.loads(r.envelope.data)["kind"] for r in await _published(settings, EVENTS)]
    assert kinds.count("replayed") == 1 and kinds.count("discarded") == 0
    operators = {orjson.loads(r.envelope.data).get("operator") for r in await _published(settings, EVENTS)}
    assert operators == {"otto"}


async def test_concurrent_replays_of_one_dead_letter_publish_once(settings: Settings) -> None:
    async with running(settings) as (client, app):
        await seed(app, settings)
        answers = await asyncio.gather(*(client.post("/ops/dead-letters/t2/b/replay", headers=bearer(OPERATOR))
                                         for _ in range(10)))
        assert sorted(a.status_code for a in answers) == [202] + [409] * 9
        shown = await get(client, "/ops/dead-letters/t2/b")
        assert shown["status"] == "replaying" and shown["original"]["topic"] is None
    assert len(await _published(settings, DELIVERIES)) == 1


async def test_discard_once_with_a_reason(settings: Settings) -> None:
    async with running(settings) as (client, app):
        await seed(app, settings)
        no_reason = await client.post("/ops/dead-letters/t2/b/discard", json={"reason": " "}, headers=bearer(OPERATOR))
        assert no_reason.status_code == 400
        answers = await asyncio.gather(*(client.post("/ops/dead-letters/t2/b/discard", json={"reason": "duplicate"},
                                                     headers=bearer(OPERATOR)) for _ in range(3)))
        assert sorted(a.status_code for a in answers) == [200, 409, 409]
        assert (await get(client, "/ops/dead-letters"))["items"] == []
    kinds = [orjson.loads(r.envelope.data)["kind"] for r in await _published(settings, EVENTS)]
    assert kinds.count("discarded") == 1


async def test_session_cookie_is_a_server_side_id_that_logout_kills(settings: Settings) -> None:
    async with running(settings) as (client, _):
        signed_in = await client.post("/ops/ui/login", data={"token": OPERATOR, "next": "/ops/ui"})
        assert signed_in.status_code == 303
        session = signed_in.cookies.get("relais_ops")
        assert session and OPERATOR not in session and sha(OPERATOR) not in session
        cookie = {"Cookie": f"relais_ops={session}"}
        assert (await client.get("/ops/whoami", headers=cookie)).json() == {"id": "otto", "role": "operator"}
        page = await client.get("/ops/ui/dlq", headers=cookie)
        assert page.status_code == 200 and "otto" in page.text
        missing = await client.get("/ops/ui/transfers/no-such-transfer", headers=cookie)  # an error page
        assert missing.status_code == 404 and 'role="alert">no transfer no-such-transfer<' in missing.text
        # The raw token is no cookie: only a session id the server handed out is.
        assert (await client.get("/ops/whoami", headers={"Cookie": f"relais_ops={OPERATOR}"})).status_code == 401
        client.cookies.clear()
        out = await client.post("/ops/ui/logout", headers={**cookie, "Origin": "http://relais.test"})
        assert out.status_code == 303
        assert (await client.get("/ops/whoami", headers=cookie)).status_code == 401  # a copied cookie is dead too
        assert (await client.get("/ops/ui/dlq", headers=cookie)).status_code == 303


async def test_search_by_business_identifier_is_access_logged(settings: Settings) -> None:
    from services.core.identifiers import identifier_digests

    bundle = {"resourceType": "Bundle", "identifier": {"system": "urn:x", "value": "EXPORT-42"},
              "entry": [{"resource": {"resourceType": "Encounter", "identifier": [{"value": "SEJ-7"}]}},
                        {"resource": {"resourceType": "Patient", "identifier": "not-a-list"}}, "junk"]}
    async with running(settings) as (client, app):
        ledger: Ledger = app.state.ops.ledger
        await ledger.apply(ev("t8", "accepted", "ingress", 0, targets=["a"]))
        await ledger.apply(ev("t8", "validated", "validator", 1, identifiers=identifier_digests(bundle)))
        await ledger.apply(ev("t8", "validated", "validator", 2, identifiers=identifier_digests(bundle)))  # again
        for value in ("EXPORT-42", " SEJ-7 "):
            found = await get(client, "/ops/search", identifier=value)
            assert [t["id"] for t in found["items"]] == ["t8"], value
        assert (await get(client, "/ops/search", identifier="SEJ-8"))["items"] == []
        log = (await get(client, "/ops/access-log", OPERATOR))["items"]
        assert [e["action"] for e in log] == ["search.identifier"] * 3 and "SEJ" not in str(log)
        page = await client.get("/ops/ui/search", params={"identifier": "SEJ-7"}, headers=bearer(VIEWER))
        assert page.status_code == 200 and "t8" in page.text
        tl = await get(client, "/ops/transfers/t8", OPERATOR, full="true")
        assert "identifiers" not in str(tl["steps"])


async def test_an_event_the_tracker_cannot_project_is_a_listed_dead_letter(settings: Settings) -> None:
    from services.core.envelope import Envelope, Record
    from services.core.runner import poison
    from services.core.topics import POISON
    from services.tracker.stage import to_ledger_event

    bad = Record(EVENTS, 0, 41, b"t5", Envelope(type="fr.relais.event.validated", source="/relais/validator",
                                                  transfer_id="t5", data=b"[1, 2]"))
    emits = poison("tracker", bad, ValueError("event record value must be a JSON object"))
    assert [e.topic for e in emits] == [POISON, EVENTS]
    failed = Record(EVENTS, 0, 42, b"t5", emits[1].envelope)
    # If the tracker also fails on that `failed` event, it only goes to the poison topic: no loop.
    assert [e.topic for e in poison("tracker", failed, ValueError("again"))] == [POISON]
    async with running(settings) as (client, app):
        await app.state.ops.ledger.apply(to_ledger_event(failed))
        letter = await get(client, "/ops/dead-letters/t5/@tracker")
        assert letter["stage"] == "tracker" and "JSON object" in letter["reason"]
        assert letter["original"] == {"topic": EVENTS, "partition": 0, "offset": 41}
        assert [d["id"] for d in (await get(client, "/ops/dead-letters", stage="tracker"))["items"]] == ["t5/@tracker"]
        assert (await get(client, "/ops/transfers"))["items"] == []  # no transfer was made up from it
        assert (await get(client, "/ops/overview"))["dlq_size"] == 1


async def test_an_open_circuit_shows_the_target_down_with_its_policy(settings: Settings) -> None:
    from services.tracker.opstate import record_circuit

    async with running(settings) as (client, app):
        before = await get(client, "/ops/targets/a")
        assert before["health"] == "idle" and before["policy"]["base_url"] == "http://127.0.0.1:9/fhir"
        assert before["policy"]["auth"] == "none" and before["policy"]["breaker_failures"] == 5
        await record_circuit(app.state.ops.ledger, "a", "open", 5, process="delivery-1")
        after = await get(client, "/ops/targets/a")
        assert after["health"] == "down" and after["down"] is True and after["circuit"] == "open"
