"""The embedded log shared by several members and processes: group commit, leases, fencing, faults, retention.

Real SQLite files in a temporary directory; "another process" is another EmbeddedBus on the same
file (its own connections and threads), and in tests/e2e/test_supervised.py a real OS process.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devtools.devkafka.local import free_port
from services.app import create_app
from services.core.bus import Partition
from services.core.embedded import STORAGE_UNWRITABLE, EmbeddedBus, EmbeddedSubscription, Fenced
from services.core.embedded_log import EmbeddedLog
from services.core.envelope import Emit, Envelope, Record
from services.core.errors import BusUnavailable
from services.core.settings import Settings
from services.core.topics import RECEIVED, VALIDATED
from services.launcher import _server
from services.tracker.ledger import Ledger
from tests.support.earlier_log import lay_out_as_before_2026_12

Factory = Callable[..., Settings]


def emit(n: int, topic: str = RECEIVED) -> Emit:
    env = Envelope(type="fr.relais.transfer.received", source="/test", transfer_id=f"t{n}", data=b'{"n": %d}' % n)
    return Emit(topic, f"t{n}".encode(), env)


@pytest.fixture
def embedded(make_settings: Factory, tmp_path: Path) -> Callable[..., Settings]:
    return lambda **kw: make_settings(kafka_bootstrap=None, embedded_log_path=tmp_path / "log.db", **kw)


@contextlib.asynccontextmanager
async def started(settings: Settings) -> AsyncIterator[EmbeddedBus]:
    bus = EmbeddedBus(settings)
    await bus.start()
    try:
        yield bus
    finally:
        await bus.stop()


async def drain(sub: EmbeddedSubscription, sink: list[Record], *, until: Callable[[], bool], timeout_s: float = 20,
                out_topic: str = VALIDATED) -> None:
    """Consume like a stage: poll, copy each record to `out_topic`, complete; until `until()` holds."""
    deadline = time.monotonic() + timeout_s
    while not until() and time.monotonic() < deadline:
        records = await sub.poll(50, 0.2)
        if records:
            offsets = {Partition(r.topic, r.partition): r.offset + 1 for r in records}
            await sub.complete([Emit(out_topic, r.key, r.envelope) for r in records], offsets)
            sink += records


async def consumed(bus: EmbeddedBus, count: int, group: str = "validator", topic: str = RECEIVED) -> list[Record]:
    """What `group` handles (and commits) of `topic`, until `count` records, as a stage would."""
    consumer = bus.subscribe(group, [topic])
    await consumer.start()
    seen: list[Record] = []
    try:
        await drain(consumer, seen, until=lambda: len(seen) >= count)
    finally:
        await consumer.stop()
    return seen


async def all_records(bus: EmbeddedBus, topic: str) -> list[Record]:
    reader = bus.subscribe(f"reader-{time.monotonic_ns()}", [topic])
    await reader.start()
    out: list[Record] = []
    try:
        for _ in range(20):
            got = await reader.poll(1000, 0.1)
            if not got and out:
                break
            out += got
    finally:
        await reader.stop()
    return out


async def test_concurrent_publishes_share_one_fsync(embedded: Factory) -> None:
    async with started(embedded()) as bus:
        before = bus.inbox.commits
        await asyncio.gather(*(bus.publish([emit(n)]) for n in range(200)))
        commits = bus.inbox.commits - before
        assert len(await all_records(bus, RECEIVED)) == 200
    assert commits < 50, f"200 concurrent publishes took {commits} commits: no group commit"


async def test_checkpoints_run_beside_the_commits_and_keep_the_wal_small(embedded: Factory, tmp_path: Path) -> None:
    # The commits never checkpoint (a 202 would wait behind it, issue 16): without the checkpointer thread
    # the WAL would hold all 48 MB written here.
    big = b"x" * 200_000
    async with started(embedded()) as bus:
        wal = tmp_path / "log.db-wal"
        largest = 0
        for n in range(240):
            env = Envelope(type="fr.relais.transfer.received", source="/test", transfer_id=f"t{n}", data=big)
            await bus.publish([Emit(RECEIVED, f"t{n}".encode(), env)])
            largest = max(largest, wal.stat().st_size)
            await asyncio.sleep(0.005)  # ~2 s of writing: the checkpointer gets its turns
        assert bus.log.checkpoints > 0
        assert sum((await bus.lag("nobody", [RECEIVED])).values()) == 240  # every record kept
    assert largest < 36_000_000, f"the WAL grew to {largest} bytes for 48 MB written: it never started again"


async def test_two_members_share_the_partitions_and_handle_each_record_once(embedded: Factory) -> None:
    async with started(embedded()) as one, started(embedded()) as two:  # two files' owners = two processes
        await one.publish([emit(n) for n in range(300)])
        a, b = one.subscribe("stage", [RECEIVED]), two.subscribe("stage", [RECEIVED])
        await a.start()
        await b.start()
        await asyncio.sleep(1.5)  # a's heartbeat learns that b joined: a holds more than its share
        [first] = await a.poll(1, 0.1)  # between two batches, a gives the surplus back ...
        a.pause_until(Partition(first.topic, first.partition), first.offset, 0)  # (polled again below)
        await asyncio.sleep(1.5)  # ... and b's heartbeat takes it
        assert a.assignment() and b.assignment() and not (a.assignment() & b.assignment())
        seen_a: list[Record] = []
        seen_b: list[Record] = []
        done = lambda: len(seen_a) + len(seen_b) >= 300  # noqa: E731
        await asyncio.gather(drain(a, seen_a, until=done), drain(b, seen_b, until=done))
        ids = [r.envelope.transfer_id for r in seen_a + seen_b]
        assert sorted(ids) == sorted(f"t{n}" for n in range(300))
        assert seen_a and seen_b
        out = [r.envelope.transfer_id for r in await all_records(one, VALIDATED)]
        assert sorted(out) == sorted(ids)
        await a.stop()
        await b.stop()


async def test_a_member_that_lost_its_partitions_cannot_commit(embedded: Factory) -> None:
    async with started(embedded()) as one, started(embedded()) as two:
        await one.publish([emit(n) for n in range(10)])
        stale = one.subscribe("stage", [RECEIVED])
        await stale.start()
        records = await stale.poll(100, 1)
        assert len(records) == 10
        # The stale member freezes (no heartbeat) past its lease: the group declares it dead.
        assert stale._heartbeat is not None
        stale._heartbeat.cancel()
        one.log.unregister(stale.group, stale.member)
        await two.write(lambda conn: conn.execute("UPDATE members SET expires=0 WHERE member=?", (stale.member,)))
        fresh = two.subscribe("stage", [RECEIVED])
        await fresh.start()
        assert fresh.assignment() == {Partition(RECEIVED, p) for p in range(3)}
        offsets = {Partition(r.topic, r.partition): r.offset + 1 for r in records}
        with pytest.raises(Fenced):
            await stale.complete([Emit(VALIDATED, r.key, r.envelope) for r in records], offsets)
        assert await all_records(two, VALIDATED) == []  # nothing of the fenced batch was written
        again: list[Record] = []
        await drain(fresh, again, until=lambda: len(again) >= 10)
        assert sorted(r.envelope.transfer_id for r in again) == sorted(f"t{n}" for n in range(10))
        await fresh.stop()


@contextlib.contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    """Make files unwritable even for root (chattr +i), as a read-only remount would."""
    present = [str(p) for p in paths if p.exists()]
    subprocess.run(["chattr", "+i", *present], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *present], check=True)


async def test_an_unwritable_log_is_transient_and_recovers_without_restart(embedded: Factory, tmp_path: Path) -> None:
    async with started(embedded()) as bus:
        await bus.publish([emit(0)])
        db = tmp_path / "log.db"
        accepted = ["t0"]
        with immutable(db, db.with_name("log.db-wal")):  # not -shm: it is mmapped (SIGBUS)
            # The inbox may take a publish or two until moving them into the log fails; from then on, refused.
            for n in range(1, 200):
                try:
                    await bus.publish([emit(n)])
                except BusUnavailable:
                    break
                accepted.append(f"t{n}")
                await asyncio.sleep(0.05)
            else:
                pytest.fail("publishes were still accepted ten seconds after the log became unwritable")
            with pytest.raises(BusUnavailable):  # twice: the second must not trip on what the first left open
                await bus.publish([emit(99)])
            problem = await bus.storage_problem()
            assert problem is not None
            gauge = STORAGE_UNWRITABLE.labels("embedded-log", bus.problem_reason)._value.get()
            assert gauge == 1
        await bus.publish([emit(100)])  # same bus, same process: writable again
        assert await bus.storage_problem() is None
        # Nothing accepted was lost: what the inbox took during the fault reached the log after it.
        assert sorted(r.envelope.transfer_id for r in await all_records(bus, RECEIVED)) == sorted([*accepted, "t100"])


async def test_retention_prunes_old_records_every_group_has_committed(embedded: Factory) -> None:
    settings = embedded(topic_retention_days=1 / 86400)  # one second
    async with started(settings) as bus:
        await bus.publish([emit(n) for n in range(20)])
        seen = await consumed(bus, 20)
        lagging = bus.subscribe("router", [VALIDATED])  # a stage's group that has committed nothing of validated
        await lagging.start()
        await lagging.stop()  # even while it is down, its records are kept for it
        gone = bus.subscribe("reader-gone", [RECEIVED])  # a throwaway group, left: holds nothing back
        await gone.start()
        await gone.stop()
        await asyncio.sleep(1.2)
        pruned = await bus.prune()
        assert pruned == 20  # received: old and committed by its stage; validated: the router has not committed
        count = await bus.log.read(lambda conn: dict(conn.execute(
            "SELECT topic, COUNT(*) FROM records GROUP BY topic").fetchall()))
        assert count == {settings.topic(VALIDATED): 20}
        await bus.publish([emit(99)])  # offsets go on after pruning: never reused
        [fresh] = await all_records(bus, RECEIVED)
        assert fresh.offset == sum(1 for r in seen if r.partition == fresh.partition)


@contextlib.contextmanager
def small_disk(path: Path, size: str = "3m") -> Iterator[Path]:
    """A small tmpfs mounted at `path` (root, as CI runs): a disk that really fills up."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


async def test_a_full_disk_is_transient_and_recovers_when_space_returns(
        make_settings: Factory, tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk") as disk:
        settings = make_settings(kafka_bootstrap=None, embedded_log_path=disk / "log.db")
        async with started(settings) as bus:
            await bus.publish([emit(0)])
            accepted = {b"t0"}
            ballast = disk / "ballast"
            with ballast.open("wb") as out:  # fill the disk to the last byte
                with contextlib.suppress(OSError):
                    while True:
                        out.write(b"\0" * 65536)
                        out.flush()
            # The WAL may have room left, and a checkpoint lets the WAL start again from its beginning (its
            # pages are reused): write until a write is refused and the readiness probe is refused too.
            problem = None
            for n in range(1, 200):
                with contextlib.suppress(BusUnavailable):
                    await bus.publish([emit(n)])
                    accepted.add(f"t{n}".encode())
                    continue
                assert bus.problem_reason == "disk-full", bus.log.problem or bus.inbox.problem
                problem = await bus.storage_problem()
                if problem is not None:
                    break
            assert problem is not None and bus.problem_reason == "disk-full", problem
            ballast.unlink()  # space returns
            await bus.publish([emit(999)])
            assert await bus.storage_problem() is None
            await bus.move_inbox()
            # What was acknowledged is there, once; the refused writes left nothing behind.
            assert await stored_keys(bus) == accepted | {b"t999"}


async def stored_keys(bus: EmbeddedBus) -> set[bytes]:
    keys = [k for (k,) in await bus.log.read(lambda conn: conn.execute("SELECT key FROM records").fetchall())]
    assert len(keys) == len(set(keys)), "a record was appended twice"
    return set(keys)


async def test_ingress_on_an_unwritable_log_serves_health_saying_why_and_recovers(
        make_settings: Factory, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the log's directory should be")
    settings = make_settings(kafka_bootstrap=None, embedded_log_path=blocker / "log.db", http_port=free_port())
    base = f"http://127.0.0.1:{settings.http_port}"
    app_task = asyncio.create_task(_serve_until_cancelled(settings, base))
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            answer = await _eventually(client, f"{base}/readyz", lambda r: r.status_code == 503)
            assert "not-a-dir" in answer.json()["status"], answer.text  # says what is wrong
            assert (await client.get(f"{base}/healthz")).status_code == 200
            blocker.unlink()  # the operator fixes the path: no restart
            await _eventually(client, f"{base}/readyz", lambda r: r.status_code == 200, timeout_s=15)
    finally:
        app_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await app_task


async def _serve_until_cancelled(settings: Settings, base: str) -> None:
    server = _server(create_app(settings, EmbeddedBus(settings), Ledger(settings.database_url)), "127.0.0.1",
                     settings.http_port, settings)
    try:
        await server.serve()
    finally:
        server.should_exit = True


async def _eventually(client: Any, url: str, ok: Callable[[Any], bool], timeout_s: float = 20) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            last = await client.get(url)
            if ok(last):
                return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"{url} never answered as expected; last: {last and last.text}")


def records_layout(path: Path) -> tuple[bool, list[str]]:
    """(whether the records table is clustered by position, as before 2026-12; the indexes on it)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        [sql] = db.execute("SELECT sql FROM sqlite_master WHERE type='table' AND name='records'").fetchone()
        indexes = [name for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type='index' AND tbl_name='records' AND sql IS NOT NULL")]
    return "WITHOUT ROWID" in sql, indexes


async def _committed_then_more(settings: Settings) -> list[Record]:
    """10 records consumed and committed by the validator's group, then 20 more not yet: the later 20."""
    async with started(settings) as bus:
        await bus.publish([emit(n) for n in range(10)])
        seen = await consumed(bus, 10)
        await bus.publish([emit(n) for n in range(10, 30)])
        return [r for r in await all_records(bus, RECEIVED) if r.envelope.transfer_id not in
                {s.envelope.transfer_id for s in seen}]


async def test_a_log_written_before_2026_12_moves_its_records_once_and_goes_on_where_it_was(
        embedded: Factory) -> None:
    settings = embedded()
    later = await _committed_then_more(settings)
    lay_out_as_before_2026_12(settings.embedded_log_path)
    assert records_layout(settings.embedded_log_path) == (True, [])
    async with started(settings) as bus:
        assert records_layout(settings.embedded_log_path) == (False, ["records_position"])
        seen = await consumed(bus, 20)
        # The group goes on from its committed offsets: the 20 later records, each once, same place, same content.
        assert sorted((r.partition, r.offset, r.envelope.transfer_id, r.envelope.data) for r in seen) == \
            sorted((r.partition, r.offset, r.envelope.transfer_id, r.envelope.data) for r in later)
        before = await all_records(bus, RECEIVED)
        await bus.publish([emit(99)])  # offsets go on from each partition's head
        [fresh] = [r for r in await all_records(bus, RECEIVED) if r.envelope.transfer_id == "t99"]
        assert fresh.offset == sum(1 for r in before if r.partition == fresh.partition)
    # A process of an earlier release writing beside this one inserts the 7 columns in the same order.
    with contextlib.closing(sqlite3.connect(settings.embedded_log_path)) as db:
        db.execute("INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?)", ("x", 0, 0, b"k", b"v", "[]", time.time()))
        assert db.execute("SELECT topic, partition, offset, key, value, headers FROM records WHERE topic = 'x'"
                          ).fetchall() == [("x", 0, 0, b"k", b"v", "[]")]


async def test_a_log_whose_records_cannot_move_goes_on_as_it_was_and_moves_them_at_a_later_start(
        embedded: Factory) -> None:
    settings = embedded()
    later = await _committed_then_more(settings)
    lay_out_as_before_2026_12(settings.embedded_log_path)
    with contextlib.closing(sqlite3.connect(settings.embedded_log_path)) as db:
        db.execute("CREATE TABLE records_by_position (x)")  # the move's table name taken: the move fails
    async with started(settings) as bus:
        assert records_layout(settings.embedded_log_path) == (True, [])
        await bus.publish([emit(30)])
        seen = await consumed(bus, 21)
        assert sorted(r.envelope.transfer_id for r in seen) == sorted([*(r.envelope.transfer_id for r in later), "t30"])
    with contextlib.closing(sqlite3.connect(settings.embedded_log_path, isolation_level=None)) as db:
        # Within a process the move is tried once: its writer reconnects after every storage fault, and a move
        # failing for want of disk space must not copy the whole log again at each.
        same_process = EmbeddedLog(settings.embedded_log_path)
        db.execute("DROP TABLE records_by_position")
        same_process._lay_out_records(db)
        assert records_layout(settings.embedded_log_path) == (False, ["records_position"])
        lay_out_as_before_2026_12(settings.embedded_log_path)
        same_process._lay_out_records(db)  # its second writer connection: the log goes on as it is
        assert records_layout(settings.embedded_log_path) == (True, [])
        same_process.close()
    async with started(settings) as bus:  # the next process to start
        assert records_layout(settings.embedded_log_path) == (False, ["records_position"])
        assert len(await all_records(bus, RECEIVED)) == 31
