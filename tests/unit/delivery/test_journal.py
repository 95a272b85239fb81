"""The attempt journal as the delivery stage uses it: a real SQLite ledger, a real HTTP target scripted in-process.

An attempt is journaled before its POST; one the journal cannot record is not made; one found started
but unanswered (a crash) follows the target's ambiguous policy; one whose answer was journaled is
completed from it; a DLQ replay starts a new round and is never taken for an in-doubt attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from services.core.blobstore import LocalBlobStore
from services.core.envelope import Emit, Envelope, Record
from services.core.errors import TransientError
from services.core.settings import Settings
from services.core.targets import Target, TargetDirectory
from services.core.topics import DELIVERIES, DELIVERIES_DLQ
from services.delivery.journal import (
    DEAD_SETTLE_MARGIN_S,
    DELIVERED,
    IN_DOUBT,
    NOT_APPLIED,
    AttemptJournal,
    AttemptKey,
    ClaimVerdict,
    Liveness,
    Prior,
    judge,
    settle_s,
)
from services.delivery.liveness import incarnation_of
from services.delivery.stage import BUSY_RECHECK_S, DeliveryStage
from services.tracker.ledger import Ledger, delivery_attempts
from tests.fixtures.tddui import make_bundle
from tests.support.scripted_target import Answer, ScriptedTarget, Seen

OK = {"resourceType": "Bundle", "type": "transaction-response", "entry": []}


class Scene:
    """A delivery stage on a real SQLite ledger; its target (a real HTTP server) answers as scripted and counts
    the POSTs it received."""

    def __init__(self, tmp_path: Path, ledger: Ledger, policy: str, server: ScriptedTarget) -> None:
        self.posts: list[Seen] = []
        self.answers: list[Answer] = []
        self.ledger = ledger
        server.script = self._answer
        self.target = Target(id="t", base_url=server.base_url, ambiguous=policy)  # type: ignore[arg-type]
        settings = Settings(database_url=ledger.url, retry_delays_s=[0.2, 0.5], max_attempts=4,
                            auth_disabled=True, log_format="console")
        self.stage = DeliveryStage(settings, TargetDirectory(targets=[self.target]),
                                   LocalBlobStore(tmp_path / "blobs"), AttemptJournal(ledger, "this"))

    def _answer(self, seen: Seen) -> Answer:
        if seen.method != "POST":  # the capability read (once per process and base URL), searches
            return Answer(404)
        self.posts.append(seen)
        return self.answers.pop(0) if self.answers else Answer(200, json=OK)

    async def handle(self, env: Envelope) -> list[Emit]:
        return list(await self.stage.handle(Record(DELIVERIES, 0, 0, b"t|p", env)))


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    ledger = Ledger(f"sqlite+aiosqlite:///{tmp_path}/ledger.db")
    await ledger.create_schema()
    yield ledger
    await ledger.close()


@pytest.fixture
async def scene(tmp_path: Path, ledger: Ledger) -> AsyncIterator[Callable[[str], Awaitable[Scene]]]:
    """`await scene(policy)`: a new delivery stage (a process of its own) with a target of its own."""
    made: list[Scene] = []
    async with contextlib.AsyncExitStack() as servers:
        async def make(policy: str = "probe") -> Scene:
            server = await servers.enter_async_context(ScriptedTarget(lambda _: Answer(500)))
            made.append(Scene(tmp_path, ledger, policy, server))
            return made[-1]

        yield make
        for s in made:
            await s.stage.aclose()


def record(seed: int = 1, **extra: str) -> Envelope:
    return Envelope(type="fr.relais.delivery", source="/relais/router", transfer_id=f"tr-{seed}",
                    data=orjson.dumps(make_bundle(3, seed=seed)), producer="p", target="t", extra=extra)


def kinds(emits: list[Emit]) -> list[str]:
    return [e.envelope.type.removeprefix("fr.relais.event.") if e.topic != DELIVERIES_DLQ else "dlq" for e in emits]


async def started_by_a_crashed_process(ledger: Ledger, env: Envelope, attempt: int = 1) -> None:
    """A row a process left `started` long ago: its POST cannot still be in flight, the attempt is in doubt."""
    await started_by_another_process(ledger, env, attempt, ago_s=3600)


async def started_by_another_process(ledger: Ledger, env: Envelope, attempt: int = 1, ago_s: float = 0,
                                     incarnation: str | None = None) -> None:
    """A row another process left `started` `ago_s` ago (by default a live one: this test process)."""
    key = AttemptKey(env.transfer_id, "t", 0, attempt)
    assert (await AttemptJournal(ledger, "other").claim(key, in_flight_s=60)).verdict is ClaimVerdict.GO
    values: dict[str, Any] = {"started_at": datetime.now(UTC) - timedelta(seconds=ago_s)}
    if incarnation is not None:
        values["incarnation"] = incarnation
    async with ledger.engine.begin() as conn:
        await conn.execute(sa.update(delivery_attempts).where(delivery_attempts.c.transfer_id == key.transfer_id)
                           .values(**values))


def retried(emits: list[Emit]) -> Envelope:
    [retry] = [e.envelope for e in emits if e.topic.startswith("deliveries.retry")]
    return retry


# --- copies: a record read twice (Kafka hands a partition over from a committed offset that can lag its last
# transaction), so two copies of one delivery record go their ways. The journal keeps one chain of attempts.

async def test_a_copy_of_a_failed_attempt_resent_before_its_retry_comes_back_applies_the_bundle_once(
        scene: Callable[[str], Scene]) -> None:
    first, second = await scene("probe"), await scene("probe")
    first.answers.append(Answer(503))
    env = record()
    retry = retried(await first.handle(env))        # attempt 1 refused: attempt 2 waits in a retry tier
    assert "delivered" in kinds(await second.handle(env))  # a copy of the record makes attempt 1 again: applied
    assert "delivered" in kinds(await first.handle(retry))  # attempt 2 finds the Bundle delivered: no POST
    assert [len(first.posts), len(second.posts)] == [1, 1]


async def test_a_copy_of_a_failed_attempt_read_after_its_retry_was_made_is_dropped(
        scene: Callable[[str], Scene]) -> None:
    first, second = await scene("probe"), await scene("probe")
    first.answers.append(Answer(503))
    env = record()
    retry = retried(await first.handle(env))
    assert "delivered" in kinds(await first.handle(retry))  # attempt 2 applied
    assert await second.handle(env) == []  # the copy of attempt 1 comes late: a later attempt exists, it goes
    assert [len(first.posts), len(second.posts)] == [2, 0]


async def test_a_copy_of_a_delivered_record_reports_the_same_delivered_event_not_a_second_one(
        scene: Callable[[str], Scene]) -> None:
    # Read twice after a rebalance: the copy finds the delivery journaled and reports it; the ledger keeps events
    # by id, so an equal id is what keeps "delivered" once in the transfer's history.
    first, second = await scene("probe"), await scene("probe")
    env = record()
    [original] = [e for e in await first.handle(env) if e.envelope.type.endswith(".delivered")]
    [copy] = [e for e in await second.handle(env) if e.envelope.type.endswith(".delivered")]
    assert copy.envelope.id == original.envelope.id and len(first.posts) + len(second.posts) == 1
    replayed = record(replays="1")  # an operator's replay starts a new round: a delivery of its own
    [again] = [e for e in await first.handle(replayed) if e.envelope.type.endswith(".delivered")]
    assert again.envelope.id != original.envelope.id


async def test_an_attempt_another_process_may_still_be_making_is_waited_for_not_taken_for_in_doubt(
        scene: Callable[[str], Scene], ledger: Ledger) -> None:
    s = await scene("retry")
    env = record()
    await started_by_another_process(ledger, env)  # e.g. the partition's previous holder, its POST in flight
    parked = await s.handle(env)
    assert len(parked) == 1 and parked[0].topic.startswith("deliveries.retry") and not s.posts  # no in_doubt
    assert parked[0].envelope.attempt == 0  # waiting burns no attempt
    key = AttemptKey.next_of(env)
    await AttemptJournal(ledger, "other").finish(key, DELIVERED, 200, OK, {})
    await asyncio.sleep(BUSY_RECHECK_S)  # when the parked record is due again
    assert kinds(await s.handle(parked[0].envelope)) == ["delivered"] and not s.posts  # its outcome, once known


async def test_each_post_is_journaled_before_it_is_made_and_its_answer_after(
        scene: Callable[[str], Scene], ledger: Ledger) -> None:
    s = await scene("probe")
    env = record()
    assert "delivered" in kinds(await s.handle(env))
    prior = await s.stage.journal.prior(AttemptKey.next_of(env))
    assert prior is not None and prior.state == DELIVERED and prior.response == OK and prior.process == "this"


async def test_an_attempt_that_cannot_be_journaled_is_not_made(scene: Callable[[str], Scene], ledger: Ledger,
                                                               tmp_path: Path) -> None:
    s = await scene("probe")
    journal = s.stage.journal
    # The ledger database cannot be reached (its volume is gone): nothing can be recorded.
    unreachable = Ledger(f"sqlite+aiosqlite:///{tmp_path}/gone/ledger.db")
    s.stage.journal = AttemptJournal(unreachable, "this")
    try:
        with pytest.raises(TransientError, match=r"delivery waits|not made"):
            await s.handle(record())
    finally:
        await unreachable.close()
    assert not s.posts  # "when the log cannot be written, delivery floods the target" cannot happen
    s.stage.journal = journal
    assert "delivered" in kinds(await s.handle(record()))  # the fault clears: the record goes on
    assert len(s.posts) == 1


async def test_an_attempt_whose_start_cannot_be_written_is_not_made(scene: Callable[[str], Scene],
                                                                    ledger: Ledger) -> None:
    s = await scene("probe")
    async with ledger.engine.begin() as conn:  # reads work, every write of the journal fails (as on a full disk)
        await conn.execute(sa.text("CREATE TRIGGER full BEFORE INSERT ON delivery_attempts "
                                   "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"))
    with pytest.raises(TransientError, match="not made"):
        await s.handle(record())
    assert not s.posts


async def test_an_answer_journaled_before_a_crash_completes_the_record_without_a_post(
        scene: Callable[[str], Scene], ledger: Ledger) -> None:
    s = await scene("probe")
    env = record()
    journal = AttemptJournal(ledger, "crashed")
    await journal.claim(AttemptKey.next_of(env), in_flight_s=60)
    await journal.finish(AttemptKey.next_of(env), DELIVERED, 200, OK, {"urn:uuid:a": "Patient/1"})
    emits = await s.handle(env)
    assert kinds(emits) == ["delivered"] and not s.posts
    assert orjson.loads(emits[0].envelope.data)["assigned"] == {"urn:uuid:a": "Patient/1"}


@pytest.mark.parametrize(("policy", "expected"), [
    ("probe", ["in_doubt", "deliveries.retry.1", "retry_scheduled"]),  # probed when it comes back
    ("retry", ["in_doubt", "deliveries.retry.1", "retry_scheduled"]),  # the target's policy accepts a resend
    ("dead-letter", ["in_doubt", "dlq", "dead_lettered"]),
])
async def test_an_attempt_left_in_doubt_follows_the_policy_and_is_not_resent_now(
        scene: Callable[[str], Scene], ledger: Ledger, policy: str, expected: list[str]) -> None:
    s = await scene(policy)
    env = record()
    await started_by_a_crashed_process(ledger, env)
    emits = await s.handle(env)
    assert [e.topic if e.topic.startswith("deliveries.retry") else k for e, k in zip(emits, kinds(emits),
                                                                                     strict=True)] == expected
    assert not s.posts
    retry = [e for e in emits if e.topic.startswith("deliveries.retry")]
    if retry:
        assert retry[0].envelope.attempt == 1  # the in-doubt attempt counts
        assert (retry[0].envelope.extra.get("probe") == "1") is (policy == "probe")
    prior = await s.stage.journal.prior(AttemptKey.next_of(env))
    assert prior is not None and prior.state == IN_DOUBT


async def test_a_replayed_dead_letter_starts_a_new_round_and_is_not_in_doubt(
        scene: Callable[[str], Scene], ledger: Ledger) -> None:
    s = await scene("dead-letter")
    s.answers.append(Answer(504))  # ambiguous; policy dead-letter: an operator decides
    env = record()
    assert "dead_lettered" in kinds(await s.handle(env))
    # What services/dlq/logic.replay_emits publishes: attempts from zero, one more replay.
    replayed = env.evolve(attempt=0, extra={**env.extra, "replays": "1"})
    assert "delivered" in kinds(await s.handle(replayed))
    assert len(s.posts) == 2


async def test_every_resource_sent_carries_the_transfer_marker(scene: Callable[[str], Scene]) -> None:
    s = await scene("probe")
    await s.handle(record(seed=7))
    sent: dict[str, Any] = s.posts[0].json()
    tags = [e["resource"]["meta"]["tag"] for e in sent["entry"]]
    assert all({"system": s.stage.settings.transfer_tag_system, "code": "tr-7"} in t for t in tags)


# --- group commit: claims, answers and closes queued together share a transaction, and decide the same --------

async def claim_scenario(journal: AttemptJournal, ledger: Ledger, together: bool) -> list[ClaimVerdict]:
    """Chains in every state, two copies of one attempt, and fresh attempts: claimed at once or one by one."""
    other = AttemptJournal(ledger, "other")
    for key, state in [(AttemptKey("delivered", "t", 0, 1), DELIVERED), (AttemptKey("later", "t", 0, 2), None),
                       (AttemptKey("failed", "t", 0, 1), NOT_APPLIED)]:
        assert (await other.claim(key, in_flight_s=60)).verdict is ClaimVerdict.GO
        if state is not None:
            await other.finish(key, state, 200 if state == DELIVERED else 503)
    keys = [AttemptKey("delivered", "t", 0, 2), AttemptKey("later", "t", 0, 1), AttemptKey("failed", "t", 0, 1),
            AttemptKey("copy", "t", 0, 1), AttemptKey("copy", "t", 0, 1),
            *(AttemptKey(f"fresh-{i}", "t", 0, 1) for i in range(20))]
    if together:
        claims = await asyncio.gather(*(journal.claim(k, in_flight_s=60) for k in keys))
    else:
        claims = [await journal.claim(k, in_flight_s=60) for k in keys]
    return [c.verdict for c in claims]


async def test_claims_made_at_once_share_transactions_and_decide_as_one_by_one(tmp_path: Path, ledger: Ledger) -> None:
    alone = Ledger(f"sqlite+aiosqlite:///{tmp_path}/alone.db")
    await alone.create_schema()
    try:
        one_by_one = await claim_scenario(AttemptJournal(alone, "this"), alone, together=False)
    finally:
        await alone.close()
    journal = AttemptJournal(ledger, "this")
    together = await claim_scenario(journal, ledger, together=True)
    assert together == one_by_one == [ClaimVerdict.DELIVERED, ClaimVerdict.SUPERSEDED, ClaimVerdict.GO,
                                      ClaimVerdict.GO, ClaimVerdict.BUSY, *[ClaimVerdict.GO] * 20]
    assert journal.transactions <= 3  # 25 claims; the second copy of "copy" waits for the first one's transaction
    async with ledger.engine.connect() as conn:
        rows = (await conn.execute(sa.select(delivery_attempts.c.transfer_id, delivery_attempts.c.state,
                                             delivery_attempts.c.process))).all()
    assert sorted((t, state, p) for t, state, p in rows if t.startswith(("fresh", "copy", "failed"))) == sorted(
        [("copy", "started", "this"), ("failed", "started", "this"),
         *((f"fresh-{i}", "started", "this") for i in range(20))])


async def test_two_processes_claiming_one_attempt_at_once_make_it_once(ledger: Ledger) -> None:
    journals = [AttemptJournal(ledger, f"process-{n}") for n in range(2)]
    keys = [AttemptKey(f"tr-{i}", "t", 0, 1) for i in range(10)]
    claims = await asyncio.gather(*(j.claim(k, in_flight_s=60) for k in keys for j in journals))
    verdicts = [c.verdict for c in claims]
    assert sorted(verdicts[0::2] + verdicts[1::2], key=str) == sorted([ClaimVerdict.GO] * 10 + [ClaimVerdict.BUSY] * 10,
                                                                         key=str)
    assert all({verdicts[2 * i], verdicts[2 * i + 1]} == {ClaimVerdict.GO, ClaimVerdict.BUSY} for i in range(10))


async def test_answers_and_closes_made_at_once_share_transactions(ledger: Ledger) -> None:
    journal = AttemptJournal(ledger, "this")
    keys = [AttemptKey(f"tr-{i}", "t", 0, 1) for i in range(30)]
    await asyncio.gather(*(journal.claim(k, in_flight_s=60) for k in keys))
    before = journal.transactions
    await asyncio.gather(*(journal.finish(k, DELIVERED, 200, OK, {"Patient/1": "Patient/9"}) for k in keys[:20]),
                         *(journal.finish(k, NOT_APPLIED, 503) for k in keys[20:]))
    await asyncio.gather(*(journal.close([k]) for k in keys))
    assert journal.transactions - before <= 4
    for key in keys:
        prior = await journal.prior(key)
        assert prior is not None and prior.state == (DELIVERED if key in keys[:20] else NOT_APPLIED)
        assert (prior.response, prior.assigned) == ((OK, {"Patient/1": "Patient/9"}) if prior.state == DELIVERED
                                                    else (None, None))
    async with ledger.engine.connect() as conn:
        closed = (await conn.execute(sa.select(sa.func.count()).where(delivery_attempts.c.closed_at.is_not(None))
                                     )).scalar()
    assert closed == 30


# --- the verdict itself (pure) ------------------------------------------------------------------------------

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def row(state: str, ago_s: float = 0) -> Prior:
    return Prior(state, NOW - timedelta(seconds=ago_s), "p")


@pytest.mark.parametrize(("attempt", "chain", "verdict"), [
    (1, {}, ClaimVerdict.GO),
    (2, {1: row("not-applied")}, ClaimVerdict.GO),
    (2, {2: row("not-applied")}, ClaimVerdict.GO),               # its answer was a failure, its retry never made
    (1, {1: row("not-applied"), 2: row("started")}, ClaimVerdict.SUPERSEDED),
    (1, {1: row("delivered"), 2: row("not-applied")}, ClaimVerdict.SUPERSEDED),
    (2, {1: row("delivered")}, ClaimVerdict.DELIVERED),          # a copy made attempt 1 again, and it was applied
    (2, {2: row("delivered")}, ClaimVerdict.DELIVERED),
    (2, {1: row("started", ago_s=10)}, ClaimVerdict.BUSY),       # a copy is making attempt 1 again right now
    (2, {1: row("started", ago_s=100)}, ClaimVerdict.GO),        # long over: its own record settles it
    (1, {1: row("started", ago_s=10)}, ClaimVerdict.BUSY),
    (1, {1: row("started", ago_s=59.9)}, ClaimVerdict.BUSY),
    (1, {1: row("started", ago_s=60)}, ClaimVerdict.IN_DOUBT),   # no answer within its time bound
    (1, {1: row("in-doubt", ago_s=1)}, ClaimVerdict.IN_DOUBT),
])
def test_judge_keeps_one_chain_of_attempts(attempt: int, chain: dict[int, Prior], verdict: ClaimVerdict) -> None:
    assert judge(AttemptKey("tr", "t", 0, attempt), chain, NOW, in_flight_s=60).verdict is verdict


def by(incarnation: str | None, ago_s: float) -> Prior:
    return Prior("started", NOW - timedelta(seconds=ago_s), "delivery-1", incarnation=incarnation)


def dead(since_s: float, settle_s: float | None = 4) -> Liveness:
    """Incarnation "gone" seen dead `since_s` ago; the target processes what it received within `settle_s`."""
    return Liveness({"gone": NOW - timedelta(seconds=since_s)}, settle_s)


# A process certainly dead sends nothing more: what it sent before dying has the target's pace to settle, counted
# from when its death was seen (it died before that, and sent nothing after), never longer than the whole bound.
@pytest.mark.parametrize(("attempt", "prior", "liveness", "verdict"), [
    (1, by("gone", 10), dead(since_s=5), ClaimVerdict.IN_DOUBT),          # dead, settled: resolve it now
    (1, by("gone", 10), dead(since_s=3.9), ClaimVerdict.BUSY),            # dead, but what it sent may still run
    (1, by("gone", 10), dead(since_s=5, settle_s=None), ClaimVerdict.BUSY),  # the target's pace unknown: the bound
    (1, by("alive", 10), dead(since_s=5), ClaimVerdict.BUSY),             # not known dead: the whole bound
    (1, by(None, 10), dead(since_s=5), ClaimVerdict.BUSY),                # a row from before incarnations
    (1, by("gone", 2), dead(since_s=9), ClaimVerdict.BUSY),               # counted from its start at the earliest
    (1, by("gone", 60), dead(since_s=0, settle_s=100), ClaimVerdict.IN_DOUBT),  # never past the whole bound
    (2, by("gone", 10), dead(since_s=5), ClaimVerdict.GO),                # its retry need not wait for it either
    (2, by("gone", 10), dead(since_s=1), ClaimVerdict.BUSY),
])
def test_an_attempt_of_a_process_certainly_dead_waits_only_for_its_target_to_settle(
        attempt: int, prior: Prior, liveness: Liveness, verdict: ClaimVerdict) -> None:
    key = AttemptKey("tr", "t", 0, attempt)
    assert judge(key, {1: prior}, NOW, in_flight_s=60, liveness=liveness).verdict is verdict


@pytest.mark.parametrize(("answers_s", "settle"), [
    ([], None),                     # the target's pace unknown: the whole bound
    ([0.03, 0.5, 0.1], 2.5),        # a fast target: its slowest answer and the margin
    ([1.0, 3.0], 6.0),              # a slow one: twice its slowest answer
])
def test_a_target_settles_within_twice_its_slowest_recent_answer_and_at_least_a_margin_more(
        answers_s: list[float], settle: float | None) -> None:
    assert settle_s(answers_s) == settle


async def test_a_killed_process_attempt_is_resolved_after_the_target_settles_a_live_one_waits_the_bound(
        ledger: Ledger) -> None:
    """Real processes on this host: one alive, then SIGKILLed; the target's pace read from the journal."""
    env = record()
    key = AttemptKey(env.transfer_id, "t", 0, 1)
    judging = AttemptJournal(ledger, "this")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        them = incarnation_of(sleeper.pid)
        assert them is not None
        await started_by_another_process(ledger, env, ago_s=10, incarnation=str(them))
        assert (await judging.claim(key, in_flight_s=60)).verdict is ClaimVerdict.BUSY  # alive, unknown pace
        os.kill(sleeper.pid, signal.SIGKILL)
        sleeper.wait(10)
        await asyncio.sleep(DEAD_SETTLE_MARGIN_S + 0.2)
        # Dead, but the target's pace is unknown (nothing answered yet): the whole bound still holds.
        assert (await judging.claim(key, in_flight_s=60)).verdict is ClaimVerdict.BUSY
        paced = AttemptKey("tr-paced", "t", 0, 1)  # an answer of the target, in 0.1 s: its pace
        assert (await AttemptJournal(ledger, "another").claim(paced, in_flight_s=60)).verdict is ClaimVerdict.GO
        async with ledger.engine.begin() as conn:
            await conn.execute(sa.update(delivery_attempts).where(delivery_attempts.c.transfer_id == "tr-paced")
                               .values(state=DELIVERED, http_status=200, started_at=datetime.now(UTC),
                                       finished_at=datetime.now(UTC) + timedelta(seconds=0.1)))
        fresh = AttemptJournal(ledger, "fresh")  # sees the death now: waits for the target to settle
        assert (await fresh.claim(key, in_flight_s=60)).verdict is ClaimVerdict.BUSY
        await asyncio.sleep(DEAD_SETTLE_MARGIN_S + 0.3)
        assert (await fresh.claim(key, in_flight_s=60)).verdict is ClaimVerdict.IN_DOUBT  # not 50 s more
    finally:
        if sleeper.poll() is None:
            os.kill(sleeper.pid, signal.SIGKILL)
            sleeper.wait(10)


async def test_a_ledger_from_before_incarnations_gets_the_column_and_its_rows_wait_the_whole_bound(
        ledger: Ledger) -> None:
    key = AttemptKey("tr-old", "t", 0, 1)
    async with ledger.engine.begin() as conn:
        await conn.execute(sa.text("ALTER TABLE delivery_attempts DROP COLUMN incarnation"))
        await conn.execute(sa.text("INSERT INTO delivery_attempts (transfer_id, target, round, attempt, state, "
                                   "process, started_at) VALUES ('tr-old', 't', 0, 1, 'started', 'gone-1', :at)"),
                           {"at": datetime.now(UTC) - timedelta(seconds=10)})
    await ledger.create_schema()  # as every delivery process does at start
    assert (await AttemptJournal(ledger, "new").claim(key, in_flight_s=60)).verdict is ClaimVerdict.BUSY
    prior = await AttemptJournal(ledger, "new").prior(key)
    assert prior is not None and prior.incarnation is None


async def test_each_attempt_records_the_incarnation_that_makes_it(ledger: Ledger) -> None:
    key = AttemptKey("tr-1", "t", 0, 1)
    assert (await AttemptJournal(ledger, "delivery-1").claim(key, in_flight_s=60)).verdict is ClaimVerdict.GO
    prior = await AttemptJournal(ledger, "x").prior(key)
    assert prior is not None and prior.process == "delivery-1"  # the name people read stays as it was
    assert prior.incarnation == str(incarnation_of(os.getpid()))


async def test_copies_claiming_at_once_never_both_make_an_attempt_of_one_chain(ledger: Ledger) -> None:
    """Two processes, each with a copy of a record, claim at the same moment — on PostgreSQL too (test_postgres)."""
    first, second = AttemptJournal(ledger, "first"), AttemptJournal(ledger, "second")
    for n in range(20):
        # Both copies make attempt 1 of a new transfer.
        same = await asyncio.gather(*(j.claim(AttemptKey(f"tr-{n}", "t", 0, 1), in_flight_s=60)
                                      for j in (first, second)), return_exceptions=True)
        assert _made(same) == 1, same
        # Attempt 1 failed; one copy goes on to attempt 2 while the other makes attempt 1 again.
        await first.finish(AttemptKey(f"tr-{n}", "t", 0, 1), "not-applied", 503)
        racing = await asyncio.gather(first.claim(AttemptKey(f"tr-{n}", "t", 0, 2), in_flight_s=60),
                                      second.claim(AttemptKey(f"tr-{n}", "t", 0, 1), in_flight_s=60),
                                      return_exceptions=True)
        assert _made(racing) == 1, racing


def _made(results: list[Any]) -> int:
    """How many claims may POST; the others were told to wait, were dropped, or could not write (TransientError)."""
    assert all(isinstance(r, TransientError) for r in results if isinstance(r, BaseException)), results
    return sum(1 for r in results if not isinstance(r, BaseException) and r.verdict is ClaimVerdict.GO)
