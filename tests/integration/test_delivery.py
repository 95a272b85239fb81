"""Delivery on a real Kafka against a real HTTP target process with scripted faults.

The delivery stage runs in-process under the real stage runner; the target is `devtools.demotarget`
as its own process (HTTP, HTTPS with client certificates, OAuth2). Retry tiers are short.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import ssl
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa

from services.core.blobstore import LocalBlobStore
from services.core.envelope import JSON, Emit, Envelope, Record
from services.core.kafka import KafkaBus
from services.core.runner import run_stage
from services.core.settings import Settings
from services.core.targets import TargetDirectory
from services.core.topics import DELIVERIES, DELIVERIES_DLQ, EVENTS, VALIDATED
from services.delivery.journal import AttemptJournal, AttemptKey
from services.delivery.logic import Circuit
from services.delivery.marker import mark_transfer
from services.delivery.stage import DeliveryStage
from services.dlq.store import DlqService
from services.router.stage import RouterStage
from services.tracker.ledger import Ledger, delivery_attempts
from services.tracker.stage import TrackerStage
from tests.fixtures.tddui import make_bundle, with_document
from tests.support.kafka import publish, read_topic, wait_for
from tests.support.processes import REPO, free_port
from tests.support.tls import make_pki

pytestmark = pytest.mark.kafka


class Target:
    """A demo target process on a fixed port (so it can be stopped and brought back)."""

    def __init__(self, *args: str, port: int | None = None, cert: tuple[str, str] | None = None) -> None:
        self.args, self.port, self.cert = list(args), port or free_port(), cert
        self.proc: subprocess.Popen[bytes] | None = None
        self.scheme = "https" if "--tls-cert" in args else "http"

    def start(self) -> Target:
        self.proc = subprocess.Popen([sys.executable, "-m", "devtools.demotarget", "--port", str(self.port),
                                      *self.args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline().decode()
        assert re.search(r"listening on https?://", line), f"demo target did not start: {line!r}"
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    @property
    def base(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def fhir(self) -> str:
        return f"{self.base}/fhir"

    def _client(self) -> httpx.Client:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # the test's own self-signed target
        if self.cert:
            ctx.load_cert_chain(*self.cert)
        return httpx.Client(verify=ctx, timeout=30)

    def fault(self, **spec: Any) -> None:
        with self._client() as c:
            c.post(f"{self.base}/_faults", json=spec).raise_for_status()

    def clear_faults(self) -> None:
        with self._client() as c:
            c.delete(f"{self.base}/_faults").raise_for_status()

    def received(self, request_id: str | None = None) -> list[dict[str, Any]]:
        with self._client() as c:
            rows: list[dict[str, Any]] = c.get(f"{self.base}/_received").json()
        return [r for r in rows if request_id is None or r["request_id"] == request_id]

    def tokens(self) -> dict[str, int]:
        with self._client() as c:
            return c.get(f"{self.base}/_tokens").json()  # type: ignore[no-any-return]

    def revoke_tokens(self) -> None:
        with self._client() as c:
            c.delete(f"{self.base}/_tokens").raise_for_status()


@pytest.fixture
def targets() -> Iterator[Callable[..., Target]]:
    started: list[Target] = []

    def start(*args: str, port: int | None = None, cert: tuple[str, str] | None = None) -> Target:
        t = Target(*args, port=port, cert=cert).start()
        started.append(t)
        return t

    yield start
    for t in started:
        t.stop()


def directory(*targets: dict[str, Any]) -> TargetDirectory:
    defaults: dict[str, Any] = {"timeouts": {"connect_s": 1, "total_s": 2},
                                "breaker": {"failures": 50, "probe_every_s": 0.5}}
    return TargetDirectory.model_validate({"targets": [{**defaults, **t} for t in targets]})


def delivery(target: str, bundle: dict[str, Any] | bytes, subject: str = "s1") -> Emit:
    tid = str(uuid.uuid4())
    data = bundle if isinstance(bundle, bytes) else orjson.dumps(bundle)
    env = Envelope(type="fr.relais.delivery.requested", source="/relais/tests", transfer_id=tid, data=data,
                   producer="dui-a", target=target, extra={"subject": subject})
    return Emit(DELIVERIES, f"{target}|{subject}".encode(), env)


@contextlib.asynccontextmanager
async def running(settings: Settings, dirs: TargetDirectory, tmp: Path, *,
                  tracker: bool = False, router: bool = False) -> AsyncIterator[DeliveryStage]:
    bus = KafkaBus(settings)
    await bus.start()
    blobs = LocalBlobStore(tmp / "blobs")
    ledger = Ledger(settings.database_url)
    await ledger.create_schema()
    stage = DeliveryStage(settings, dirs, blobs, AttemptJournal(ledger))
    stages: list[Any] = [stage]
    if tracker:
        stages.append(TrackerStage(ledger))
    if router:
        stages.append(RouterStage(dirs, blobs, settings.claim_check_bytes))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(run_stage(s, bus, settings, stop)) for s in stages]
    try:
        yield stage
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await stage.aclose()
        await ledger.close()
        await bus.stop()


async def events_of(settings: Settings, transfer_id: str, kind: str, expect: int = 1,
                    timeout_s: float = 30) -> list[Record]:
    async def found() -> list[Record]:
        recs = await read_topic(settings, EVENTS, expect=10**9, timeout_s=0.5)
        return [r for r in recs if r.envelope.transfer_id == transfer_id
                and orjson.loads(r.envelope.data)["kind"] == kind]
    got: list[Record] = await wait_for(lambda: _at_least(found, expect), timeout_s=timeout_s)
    return got


async def all_delivered(settings: Settings, transfer_ids: set[str], timeout_s: float = 30) -> None:
    """Wait until each of `transfer_ids` has its `delivered` event (one read of the topic per try)."""
    async def done() -> bool:
        recs = await read_topic(settings, EVENTS, expect=10**9, timeout_s=0.5)
        delivered = {r.envelope.transfer_id for r in recs if orjson.loads(r.envelope.data)["kind"] == "delivered"}
        return transfer_ids <= delivered
    await wait_for(done, timeout_s=timeout_s)


async def _at_least(fn: Callable[[], Any], n: int) -> Any:
    value = await fn()
    return value if len(value) >= n else None


def times(rows: list[dict[str, Any]]) -> list[float]:
    return [datetime.fromisoformat(r["time"]).timestamp() for r in rows]


def detail(rec: Record) -> dict[str, Any]:
    return orjson.loads(rec.envelope.data)  # type: ignore[no-any-return]


# --- classification, attempts, spacing ---------------------------------------------------------------

async def test_500_then_success_attempts_and_spacing(kafka_bootstrap: str, make_settings: Callable[..., Settings],
                                                     targets: Callable[..., Target], tmp_path: Path) -> None:
    settings = make_settings(kafka_bootstrap=kafka_bootstrap, retry_delays_s=[0.4, 0.8, 1.6])
    t = targets()
    t.fault(status=500, count=2)
    emit = delivery("a", make_bundle(5, seed=1))
    async with running(settings, directory({"id": "a", "base_url": t.fhir, "retry": {"jitter": 0}}), tmp_path):
        await publish(settings, [emit])
        await events_of(settings, emit.envelope.transfer_id, "delivered")
    rows = t.received(f"{emit.envelope.transfer_id}/a")
    assert [r["status"] for r in rows] == [500, 500, 200]
    gaps = [b - a for a, b in zip(times(rows), times(rows)[1:], strict=False)]
    assert 0.4 <= gaps[0] < 0.4 + 1.5 and 0.8 <= gaps[1] < 0.8 + 1.5, gaps


async def test_503_retry_after_and_429_are_honoured(kafka_bootstrap: str, make_settings: Callable[..., Settings],
                                                   targets: Callable[..., Target], tmp_path: Path) -> None:
    settings = make_settings(kafka_bootstrap=kafka_bootstrap, retry_delays_s=[0.2, 0.5, 1.0])
    t = targets()
    t.fault(status=503, retry_after="2")
    t.fault(status=429)
    emit = delivery("a", make_bundle(3, seed=2))
    async with running(settings, directory({"id": "a", "base_url": t.fhir}), tmp_path):
        await publish(settings, [emit])
        await events_of(settings, emit.envelope.transfer_id, "delivered")
    rows = t.received(f"{emit.envelope.transfer_id}/a")
    assert [r["status"] for r in rows] == [503, 429, 200]
    first_gap = times(rows)[1] - times(rows)[0]
    assert first_gap >= 2.0, f"Retry-After: 2 not honoured ({first_gap:.2f}s)"


async def test_exhausted_retries_dead_letter_with_everything_an_operator_needs(
        kafka_bootstrap: str, make_settings: Callable[..., Settings], targets: Callable[..., Target],
        tmp_path: Path) -> None:
    settings = make_settings(kafka_bootstrap=kafka_bootstrap, max_attempts=4)
    t = targets()
    t.fault(status=500, count=-1)
    emit = delivery("a", make_bundle(3, seed=3))
    tid = emit.envelope.transfer_id
    async with running(settings, directory({"id": "a", "base_url": t.fhir}), tmp_path):
        await publish(settings, [emit])
        [dead] = await events_of(settings, tid, "dead_lettered")
    assert len(t.received(f"{tid}/a")) == 4
    d = detail(dead)
    assert d["attempts"] == 4 and d["http_status"] == 500 and "gave up after 4" in d["reason"]
    assert d["outcome"]["resourceType"] == "OperationOutcome"
    assert d["orig_topic"].startswith("deliveries.retry.") and d["first_failure"] <= d["last_failure"]
    [dlq] = [r for r in await read_topic(settings, DELIVERIES_DLQ, expect=1) if r.envelope.transfer_id == tid]
    x = dlq.envelope.extra
    assert dlq.envelope.attempt == 4 and x["httpstatus"] == "500" and x["origtopic"].startswith("deliveries.retry.")
    assert {"origpartition", "origoffset", "firstfailure", "lastfailure", "blob", "blobsha256"} <= set(x)


async def test_400_is_permanent_one_attempt_and_keeps_the_outcome(
        kafka_bootstrap: str, make_settings: Callable[..., Settings], targets: Callable[..., Target],
        tmp_path: Path) -> None:
    settings = make_settings(kafka_bootstrap=kafka_bootstrap)
    t = targets()
    outcome = {"resourceType": "OperationOutcome",
               "issue": [{"severity": "error", "code": "invalid", "diagnostics": "Patient.birthDate missing"}]}
    t.fault(status=400, body=outcome)
    emit = delivery("a", make_bundle(3, seed=4))
    async with running(settings, directory({"id": "a", "base_url": t.fhir}), tmp_path):
        await publish(settings, [emit])
        [dead] = await events_of(settings, emit.envelope.transfer_id, "dead_lettered")
    assert len(t.received(f"{emit.envelope.transfer_id}/a")) == 1
    assert detail(dead)["outcome"] == outcome and "permanent" in detail(dead)["reason"]


# --- ambiguous failures ----------------------------------------------------------------------------

@pytest.mark.parametrize(("policy", "posts", "kind"), [
    ("probe", 1, "delivered_unconfirmed"), ("retry", 2, "delivered"), ("dead-letter", 1, "dead_lettered")])
async def test_read_timeout_after_the_target_applied_it(
        kafka_bootstrap: str, make_settings: Callable[..., Settings], targets: Callable[..., Target],
        tmp_path: Path, policy: str, posts: int, kind: str) -> None:
    settings = make_settings(kafka_bootstrap=kafka_bootstrap)
    t = targets()
    t.fault(apply_then=504, delay_s=3)  # applied at once, answer after the client's 2 s timeout
    emit = delivery("a", make_bundle(6, seed=5))
    tid = emit.envelope.transfer_id
    async with running(settings, directory({"id": "a", "base_url": t.fhir, "ambiguous": policy}), tmp_path):
        await publish(settings, [emit])
        await events_of(settings, tid, kind)
    rows = t.received(f"{tid}/a")
    assert len(rows) == posts
    assert sum(r["applied"] for r in rows) == posts  # probe: one copy at the target, not two


async def test_connection_reset_after_apply_is_probed_not_duplicated(
        kafka_bootstrap: str, make_settings: Callable[..., Settings], targets: Callable[..., Target],
        tmp_path: Path) -> None:
    settings = make_settings(kafka_bootstrap=kafka_bootstrap)
    t = targets()
    t.fault(apply_then="drop")
    emit = delivery("a", make_bundle(6, seed=6))
    async with running(settings, directory({"id": "a", "base_url": t.fhir}), tmp_path):
        await publish(settings, [emit])
        [ev] = await events_of(settings, emit.envelope.transfer_id, "delivered_unconfirmed")
    assert len(t.received(f"{emit.envelope.transfer_id}/a")) == 1
    assert detail(ev)["found"]


# --- circuit breaker, isolation --------------------------------------------------------------------

async def test_breaker_holds_records_while_the_target_is_down_then_delivers(
        kafka_bootstrap: str, make_settings: Callable[..., Settings], targets: Callable[..., Target],
        tmp_path: Path) -> None:
    settings = make_settings(kafka_bootstrap=kafka_bootstrap, max_attempts=4)
    port = free_port()
    dirs = directory({"id": "a", "base_url": f"http://127.0.0.1:{port}/fhir",
                      "breaker": {"failures": 2, "probe_every_s": 0.5}})
    emits = [delivery("a", make_bundle(3, seed=70 + i), subject=f"s{i}") for i in range(5)]
    async with running(settings, dirs, tmp_path, tracker=False) as stage:
        await publish(settings, emits)
        await wait_for(lambda: stage.breaker("a").circuit is Circuit.OPEN, timeout_s=20)  # type: ignore[union-attr]
        await asyncio.sleep(4)  # far longer than max_attempts x tiers: without the breaker, all dead
        dead = [r for r in await read_topic(settings, DELIVERIES_DLQ, expect=10**9, timeout_s=1)]
        assert dead == [], "records were dead-lettered while the circuit was open"
        t = targets(port=port)  # the target comes back on the same address
        await all_delivered(settings, {e.envelope.transfer_id for e in emits})
    assert len(t.received()) == 5  # each delivered once; nothing was flooded at the target



async def test_a_dead_target_does_not_slow_a_healthy_one(
        kafka_bootstrap: str, make_settings: Callable[..., Settings], targets: Callable[..., Target],
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = make_settings(kafka_bootstrap=kafka_bootstrap, max_attempts=50, topic_partitions=3)
    healthy = targets()
    dirs = directory({"id": "ok", "base_url": healthy.fhir},
                     {"id": "dead", "base_url": f"http://127.0.0.1:{free_port()}/fhir",
                      "breaker": {"failures": 3, "probe_every_s": 1}})

    async def latencies(with_dead: bool) -> list[float]:
        emits = [delivery("ok", make_bundle(5, seed=80 + i), subject=f"p{i}") for i in range(20)]
        if with_dead:
            emits += [delivery("dead", make_bundle(5, seed=90 + i), subject=f"p{i}") for i in range(20)]
        sent = time.time()
        await publish(settings, emits)
        await all_delivered(settings, {e.envelope.transfer_id for e in emits[:20]})
        rows = [r for r in healthy.received() if any(r["request_id"] == f"{e.envelope.transfer_id}/ok"
                                                     for e in emits[:20])]
        return [t - sent for t in times(rows)]

    async with running(settings, dirs, tmp_path):
        alone = await latencies(False)
        beside_dead = await latencies(True)
    with capsys.disabled():
        print(f"\n[isolation] healthy target delivery latency: alone p50 {statistics.median(alone):.3f}s "
              f"max {max(alone):.3f}s; beside a dead target p50 {statistics.median(beside_dead):.3f}s "
              f"max {max(beside_dead):.3f}s")
    assert max(beside_dead) < max(alone) + 1.5


# --- credentials -----------------------------------------------------------------------------------

async def test_mutual_tls(kafka_bootstrap: str, make_settings: Callable[..., Settings],
                          targets: Callable[..., Target], tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    settings = make_settings(kafka_bootstrap=kafka_bootstrap, max_attempts=2)
    t = targets("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                "--tls-client-ca", str(pki.ca), cert=(str(pki.client_cert), str(pki.client_key)))
    good, bad = delivery("mtls", make_bundle(3, seed=11)), delivery("nocert", make_bundle(3, seed=12))
    dirs = directory(
        {"id": "mtls", "base_url": t.fhir, "tls": {"client_cert": str(pki.client_cert),
                                                   "client_key": str(pki.client_key), "ca_bundle": str(pki.ca)}},
        {"id": "nocert", "base_url": t.fhir, "tls": {"ca_bundle": str(pki.ca)}})
    async with running(settings, dirs, tmp_path):
        await publish(settings, [good, bad])
        await events_of(settings, good.envelope.transfer_id, "delivered")
        [dead] = await events_of(settings, bad.envelope.transfer_id, "dead_lettered")
    assert len(t.received(f"{good.envelope.transfer_id}/mtls")) == 1
    assert t.received(f"{bad.envelope.transfer_id}/nocert") == []  # refused during the TLS handshake
    assert detail(dead)["http_status"] is None and "gave up after 2" in detail(dead)["reason"]


async def test_oauth2_token_fetched_once_and_refreshed_on_401(
        kafka_bootstrap: str, make_settings: Callable[..., Settings], targets: Callable[..., Target],
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_OAUTH_SECRET", "s3cret")
    settings = make_settings(kafka_bootstrap=kafka_bootstrap)
    t = targets("--oauth-client", "relais:s3cret")
    dirs = directory({"id": "a", "base_url": t.fhir, "auth": {
        "type": "oauth2", "token_url": f"{t.base}/oauth/token", "client_id": "relais",
        "client_secret_env": "TEST_OAUTH_SECRET"}})
    first = [delivery("a", make_bundle(3, seed=20 + i), subject=f"o{i}") for i in range(5)]
    async with running(settings, dirs, tmp_path):
        await publish(settings, first)
        await all_delivered(settings, {e.envelope.transfer_id for e in first})
        assert t.tokens()["issued"] == 1
        t.revoke_tokens()
        later = delivery("a", make_bundle(3, seed=30), subject="o9")
        await publish(settings, [later])
        await events_of(settings, later.envelope.transfer_id, "delivered")
    assert t.tokens()["issued"] == 2
    assert len(t.received(f"{later.envelope.transfer_id}/a")) == 2  # 401, then the same POST with a new token


# --- claim check -----------------------------------------------------------------------------------

async def test_a_20_mb_bundle_is_delivered_intact_through_the_claim_check(
        kafka_bootstrap: str, make_settings: Callable[..., Settings], targets: Callable[..., Target],
        tmp_path: Path) -> None:
    settings = make_settings(kafka_bootstrap=kafka_bootstrap, max_body_bytes=25 * 1024 * 1024,
                             claim_check_bytes=1024 * 1024)
    t = targets()
    bundle = with_document(make_bundle(10, seed=40), 20 * 1024 * 1024)
    body = orjson.dumps(bundle)
    assert len(body) > 20 * 1024 * 1024
    tid = str(uuid.uuid4())
    validated = Envelope(type="fr.relais.transfer.validated", source="/relais/tests", transfer_id=tid, data=body,
                         producer="dui-a", extra={"targets": "a", "subject": "big"})
    async with running(settings, directory({"id": "a", "base_url": t.fhir, "timeouts": {"total_s": 60}}),
                       tmp_path, router=True):
        await publish(settings, [Emit(VALIDATED, tid.encode(), validated)])
        await events_of(settings, tid, "delivered", timeout_s=60)
    [record] = [r for r in await read_topic(settings, DELIVERIES, expect=1) if r.envelope.transfer_id == tid]
    assert record.envelope.data == b"" and record.envelope.extra["blobsha256"] == hashlib.sha256(body).hexdigest()
    [got] = t.received(f"{tid}/a")
    assert got["body"] == mark_transfer(bundle, settings.transfer_tag_system, tid)  # intact, plus the marker


# --- dead letters and replay -----------------------------------------------------------------------

async def test_replay_after_the_fault_is_cleared_delivers_and_is_tracked(
        kafka_bootstrap: str, make_settings: Callable[..., Settings], targets: Callable[..., Target],
        tmp_path: Path) -> None:
    settings = make_settings(kafka_bootstrap=kafka_bootstrap, max_attempts=2)
    t = targets()
    t.fault(status=503, count=-1)
    emits = [delivery("a", make_bundle(3, seed=50 + i), subject=f"r{i}") for i in range(3)]
    ledger = Ledger(settings.database_url)
    async with running(settings, directory({"id": "a", "base_url": t.fhir}), tmp_path, tracker=True):
        bus = KafkaBus(settings)
        await bus.start()
        # The ledger needs each transfer's routed event to know its producer.
        await publish(settings, [_routed(e) for e in emits] + emits)
        service = DlqService(ledger, bus, LocalBlobStore(tmp_path / "blobs"))
        await wait_for(lambda: _at_least(lambda: service.list(), 3), timeout_s=30)
        listed = await service.list()
        assert {d.transfer_id for d in listed} == {e.envelope.transfer_id for e in emits}
        assert all(d.last_http_status == 503 and d.detail["attempts"] == 2 for d in listed)
        summary = listed[0].summary()
        assert "bundle" not in summary and summary["original"]["topic"]
        t.clear_faults()
        replayed, skipped = await service.replay_all(service_filter("a"), "tests")
        assert len(replayed) == 3 and not skipped
        await all_delivered(settings, {e.envelope.transfer_id for e in emits})
        await wait_for(lambda: _all_delivered(ledger, emits), timeout_s=30)
        await bus.stop()
    await ledger.close()


def service_filter(target: str) -> Any:
    from services.dlq.logic import DlqFilter

    return DlqFilter(target=target)


async def _all_delivered(ledger: Ledger, emits: list[Emit]) -> bool:
    views = [await ledger.get(e.envelope.transfer_id) for e in emits]
    return all(v is not None and v.status == "delivered" for v in views)


def _routed(e: Emit) -> Emit:
    env = Envelope(type="fr.relais.event.routed", source="/relais/router", transfer_id=e.envelope.transfer_id,
                   data=orjson.dumps({"kind": "routed", "stage": "router", "targets": [e.envelope.target]}),
                   producer=e.envelope.producer, content_type=JSON)
    return Emit(EVENTS, e.envelope.transfer_id.encode(), env)


# --- the probe proves *this* transfer; a crash leaves an attempt in doubt, never blindly re-sent --------

def _resource(bundle: dict[str, Any], rtype: str) -> dict[str, Any]:
    return next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype)


def _stored(t: Target, rtype: str, system: str, value: str) -> int:
    """How many resources of a type with that identifier the target holds (counted by content)."""
    with t._client() as c:
        return int(c.get(f"{t.fhir}/{rtype}", params={"identifier": f"{system}|{value}"}).json()["total"])


async def test_a_timed_out_bundle_sharing_an_identifier_with_a_delivered_one_is_not_called_delivered(
        kafka_bootstrap: str, make_settings: Callable[..., Settings], targets: Callable[..., Target],
        tmp_path: Path) -> None:
    """Issue 11's X/Y: Y times out unapplied; X's Encounter has Y's identifier. Y is re-sent, not "unconfirmed"."""
    settings = make_settings(kafka_bootstrap=kafka_bootstrap)
    t = targets()
    x_bundle, y_bundle = make_bundle(6, seed=901), make_bundle(6, seed=902)  # two persons
    _resource(y_bundle, "Encounter")["identifier"] = _resource(x_bundle, "Encounter")["identifier"]
    x, y = delivery("a", x_bundle, subject="person-x"), delivery("a", y_bundle, subject="person-y")
    async with running(settings, directory({"id": "a", "base_url": t.fhir, "ambiguous": "probe"}), tmp_path):
        await publish(settings, [x])
        await events_of(settings, x.envelope.transfer_id, "delivered")
        t.fault(status=503, delay_s=3)  # Y: no answer within the client's 2 s, and never applied
        await publish(settings, [y])
        [ev] = await events_of(settings, y.envelope.transfer_id, "delivered", timeout_s=60)
        kinds = [detail(r)["kind"] for r in await read_topic(settings, EVENTS, expect=10**9, timeout_s=1)
                 if r.envelope.transfer_id == y.envelope.transfer_id]
    assert "delivered_unconfirmed" not in kinds and "retry_scheduled" in kinds
    assert ev.envelope.attempt == 2  # the timed-out attempt, then the one that delivered
    [y_ident] = [i for i in _resource(y_bundle, "Patient")["identifier"] if i.get("system")][:1]
    assert _stored(t, "Patient", y_ident["system"], y_ident["value"]) == 1  # Y applied exactly once
    enc = _resource(x_bundle, "Encounter")["identifier"][0]
    assert _stored(t, "Encounter", enc["system"], enc["value"]) == 2  # X's and Y's


async def test_a_partly_applied_transfer_is_dead_lettered_with_what_to_check(
        kafka_bootstrap: str, make_settings: Callable[..., Settings], targets: Callable[..., Target],
        tmp_path: Path) -> None:
    settings = make_settings(kafka_bootstrap=kafka_bootstrap)
    t = targets()
    emit = delivery("a", make_bundle(6, seed=903))
    tid = emit.envelope.transfer_id
    # Half of the transfer's resources, marked with it, are already at the target (a server that is
    # not transactional applied part of it before failing).
    marked = mark_transfer(orjson.loads(emit.envelope.data), settings.transfer_tag_system, tid)
    half = {**marked, "entry": marked["entry"][:3]}
    with t._client() as c:
        assert c.post(t.fhir, json=half, headers={"Content-Type": "application/fhir+json"}).status_code == 200
    t.fault(status=503, delay_s=3)
    async with running(settings, directory({"id": "a", "base_url": t.fhir, "ambiguous": "probe"}), tmp_path):
        await publish(settings, [emit])
        [dead] = await events_of(settings, tid, "dead_lettered", timeout_s=60)
    assert "only part of this transfer" in detail(dead)["reason"]
    assert tid in detail(dead)["reason"]  # the marker an operator searches for
    assert len(t.received(f"{tid}/a")) == 1  # never sent again on top of the half


async def test_ambiguous_failure_at_a_target_without_search_follows_the_dead_letter_path(
        kafka_bootstrap: str, make_settings: Callable[..., Settings], targets: Callable[..., Target],
        tmp_path: Path) -> None:
    settings = make_settings(kafka_bootstrap=kafka_bootstrap)
    t = targets("--no-search")
    t.fault(apply_then=504, delay_s=3)
    emit = delivery("a", make_bundle(4, seed=904))
    async with running(settings, directory({"id": "a", "base_url": t.fhir, "ambiguous": "probe"}), tmp_path):
        await publish(settings, [emit])
        [dead] = await events_of(settings, emit.envelope.transfer_id, "dead_lettered", timeout_s=60)
    assert "refuses a _tag search" in detail(dead)["reason"]
    assert len(t.received(f"{emit.envelope.transfer_id}/a")) == 1


@pytest.mark.parametrize(("applied", "posts", "kind"), [(True, 1, "delivered_unconfirmed"), (False, 2, "delivered")])
async def test_an_attempt_left_in_doubt_by_a_crash_is_probed_not_resent(
        kafka_bootstrap: str, make_settings: Callable[..., Settings], targets: Callable[..., Target],
        tmp_path: Path, applied: bool, posts: int, kind: str) -> None:
    """The journal says attempt 1 started and nothing more (the process died): probe, then send only if absent."""
    settings = make_settings(kafka_bootstrap=kafka_bootstrap)
    t = targets()
    emit = delivery("a", make_bundle(5, seed=905 + applied))
    tid = emit.envelope.transfer_id
    with t._client() as c:  # the crashed process's POST, as the target got it (or not)
        marked = mark_transfer(orjson.loads(emit.envelope.data), settings.transfer_tag_system, tid)
        c.post(t.fhir, json=marked if applied else {"resourceType": "Bundle", "type": "transaction", "entry": []},
               headers={"Content-Type": "application/fhir+json", "X-Request-Id": f"{tid}/a"})
    ledger = Ledger(settings.database_url)
    await ledger.create_schema()
    await AttemptJournal(ledger, "crashed-process").claim(AttemptKey(tid, "a", 0, 1), in_flight_s=60)
    async with ledger.engine.begin() as conn:  # long enough ago that its POST cannot still be running
        await conn.execute(sa.update(delivery_attempts).values(started_at=datetime.now(UTC) - timedelta(hours=1)))
    await ledger.close()
    async with running(settings, directory({"id": "a", "base_url": t.fhir, "ambiguous": "probe"}), tmp_path):
        await publish(settings, [emit])
        await events_of(settings, tid, kind, timeout_s=60)
        [doubt] = await events_of(settings, tid, "in_doubt")
    assert "crashed-process" in detail(doubt)["reason"]
    assert len(t.received(f"{tid}/a")) == posts
    ident = _resource(orjson.loads(emit.envelope.data), "Encounter")["identifier"][0]
    assert _stored(t, "Encounter", ident["system"], ident["value"]) == 1  # applied once, whatever happened
