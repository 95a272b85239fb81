"""A real Kafka from devtools.devkafka, and proof that aiokafka's idempotence and transactions work on it."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from devtools.devkafka import BOOTSTRAP_ENV, CACHE_ENV, KAFKA_VERSION, DevKafkaUnavailable, LocalKafka
from devtools.devkafka.local import default_cache_root

REPO_ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 30.0  # upper bound for any single condition; generous for a loaded 2-core CI machine

Records = list[ConsumerRecord[bytes, bytes]]


def start_or_skip(kafka: LocalKafka) -> None:
    """Start `kafka`; without Java or Maven the test skips (fails in CI, where Kafka tests are required)."""
    try:
        kafka.start()
    except DevKafkaUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Kafka tests are required in CI: {exc}")
        pytest.skip(f"no local Kafka: {exc}")


@pytest.fixture(scope="module")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap address of a LocalKafka started for this module (skips without Java/Maven, unless CI)."""
    kafka = LocalKafka()
    start_or_skip(kafka)
    try:
        yield kafka.bootstrap
    finally:
        kafka.stop()


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def _create_topics(bootstrap: str, *names: str, partitions: int = 1) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        response = await admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1) for name in names]
        )
    finally:
        await admin.close()
    # create_topics reports per-topic failures in the response instead of raising.
    errors = {topic: code for topic, code, *_ in response.topic_errors if code != 0}
    assert not errors, f"topic creation failed: {errors}"


async def _consume_until(
    consumer: AIOKafkaConsumer, done: Callable[[Records], bool], within_s: float = WAIT_S
) -> Records:
    """Collect records until `done(records)` holds; fail with what was seen if it never does."""
    records: Records = []
    deadline = time.monotonic() + within_s
    while not done(records):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"condition not met within {within_s} s; got {[r.value for r in records]}")
        batches = await consumer.getmany(timeout_ms=int(min(remaining, 1.0) * 1000))
        for batch in batches.values():
            records.extend(batch)
    return records


def _values(records: Sequence[ConsumerRecord[bytes, bytes]]) -> list[bytes]:
    return [r.value for r in records if r.value is not None]


async def _wait_committed(consumer: AIOKafkaConsumer, tp: TopicPartition, expected: int) -> None:
    """Poll the group's committed offset for `tp` until it equals `expected`."""
    deadline = time.monotonic() + WAIT_S
    while (committed := await consumer.committed(tp)) != expected:
        if time.monotonic() > deadline:
            pytest.fail(f"committed offset of {tp} is {committed}, expected {expected} within {WAIT_S} s")
        await asyncio.sleep(0.1)  # poll interval, not a synchronisation delay


async def _read_all(bootstrap: str, topic: str, isolation_level: str, until: bytes) -> list[bytes]:
    """Values of `topic` from the start up to and including `until`, as one isolation level sees them."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=isolation_level,
    )
    await consumer.start()
    try:
        records = await _consume_until(consumer, lambda rs: until in _values(rs))
    finally:
        await consumer.stop()
    return _values(records)


@pytest.mark.kafka
async def test_idempotent_producer_round_trip(kafka_bootstrap: str) -> None:
    topic = _unique("devkafka-idem")
    await _create_topics(kafka_bootstrap, topic, partitions=3)
    sent = {f"key-{i % 3}".encode(): [f"value-{i}".encode() for i in range(i % 3, 30, 3)] for i in range(3)}

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for i in range(30):
            await producer.send_and_wait(topic, f"value-{i}".encode(), key=f"key-{i % 3}".encode())
        # Private, but the only way to see that the broker granted a producer id (InitProducerId).
        assert producer._txn_manager is not None and producer._txn_manager.producer_id >= 0
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    try:
        records = await _consume_until(consumer, lambda rs: len(rs) >= 30)
    finally:
        await consumer.stop()

    assert len(records) == 30, "no duplicates"
    received: dict[bytes, list[bytes]] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        assert record.key is not None and record.value is not None
        received.setdefault(record.key, []).append(record.value)
    assert received == sent, "every key's records arrive once each, in order"


@pytest.mark.kafka
async def test_transactions_commit_offsets_and_hide_aborted_records(kafka_bootstrap: str) -> None:
    source, sink = _unique("devkafka-src"), _unique("devkafka-sink")
    group, transactional_id = _unique("devkafka-group"), _unique("devkafka-txn")
    await _create_topics(kafka_bootstrap, source, sink)
    source_tp = TopicPartition(source, 0)

    async with AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all") as seeder:
        for i in range(3):
            await seeder.send_and_wait(source, f"in-{i}".encode())

    # consume-transform-produce, as a Relais stage does it
    consumer = AIOKafkaConsumer(
        source,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap,
        transactional_id=transactional_id,
        enable_idempotence=True,
        acks="all",
    )
    await consumer.start()
    await producer.start()
    try:
        inputs = await _consume_until(consumer, lambda rs: len(rs) >= 3)
        assert _values(inputs) == [b"in-0", b"in-1", b"in-2"]
        async with producer.transaction():
            for value in _values(inputs):
                await producer.send(sink, value.replace(b"in-", b"out-"))
            await producer.send_offsets_to_transaction({source_tp: inputs[-1].offset + 1}, group)
        # commit_transaction() returns once the coordinator decided; the markers that make the
        # offset visible land just after, and aiokafka's OffsetFetch (v2/v3) can't ask to wait.
        await _wait_committed(consumer, source_tp, 3)

        # An aborted transaction: its records and its offset commit must both vanish.
        await producer.begin_transaction()
        await producer.send_and_wait(sink, b"aborted-0")
        await producer.send_and_wait(sink, b"aborted-1")
        await producer.send_offsets_to_transaction({source_tp: 1}, group)
        await producer.abort_transaction()
        # A committed marker after it, so readers have a point where they know they saw everything.
        # A new transaction only begins once the previous one's markers are all written, so the
        # abort (offsets included) is final by now: the pending offset 1 must not have landed.
        async with producer.transaction():
            await producer.send(sink, b"marker")
        assert await consumer.committed(source_tp) == 3
    finally:
        await producer.stop()
        await consumer.stop()

    committed_view = await _read_all(kafka_bootstrap, sink, "read_committed", until=b"marker")
    assert committed_view == [b"out-0", b"out-1", b"out-2", b"marker"]
    # The aborted records were really written: only the isolation level hides them.
    uncommitted_view = await _read_all(kafka_bootstrap, sink, "read_uncommitted", until=b"marker")
    assert b"aborted-0" in uncommitted_view and b"aborted-1" in uncommitted_view

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    assert offsets[source_tp].offset == 3


async def _read_line(stream: asyncio.StreamReader, within_s: float) -> str:
    line = await asyncio.wait_for(stream.readline(), within_s)
    if not line:
        pytest.fail("relais dev-kafka closed its output early")
    return line.decode().rstrip("\n")


async def _stderr_until(stream: asyncio.StreamReader, pattern: str, within_s: float) -> tuple[re.Match[str], str]:
    """Read stderr lines until one matches; returns the match and everything read."""
    seen: list[str] = []
    deadline = time.monotonic() + within_s
    while True:
        line = await _read_line(stream, max(0.1, deadline - time.monotonic()))
        seen.append(line)
        if match := re.search(pattern, line):
            return match, "\n".join(seen)


def _is_dir(path: Path) -> bool:
    return path.is_dir()  # a local stat: fine to call from a test coroutine


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.kafka
async def test_cli_prints_bootstrap_first_and_cleans_up_on_sigterm(kafka_bootstrap: str) -> None:
    # Depends on the module fixture only so the jar cache is warm and a failure to start skips here too.
    env = {**os.environ, CACHE_ENV: str(default_cache_root().resolve())}
    env.pop(BOOTSTRAP_ENV, None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devtools.devkafka",
        cwd=REPO_ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        first = await _read_line(proc.stdout, within_s=90)
        assert re.fullmatch(rf"{BOOTSTRAP_ENV}=127\.0\.0\.1:\d+", first), first
        bootstrap = first.partition("=")[2]
        pid_match, _ = await _stderr_until(proc.stderr, r"pid (\d+)$", within_s=10)
        dir_match, _ = await _stderr_until(proc.stderr, r"data dir (.+)$", within_s=10)
        broker_pid, data_dir = int(pid_match.group(1)), Path(dir_match.group(1))
        assert _is_dir(data_dir)

        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            cluster = await admin.describe_cluster()
            await admin.list_topics()
        finally:
            await admin.close()
        assert [b["port"] for b in cluster["brokers"]] == [int(bootstrap.rpartition(":")[2])]

        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
        assert proc.returncode == 0, err.decode()
        assert out == b"", "nothing but the bootstrap line on stdout"
        assert not _is_dir(data_dir), "relais dev-kafka left its data behind"
        assert not _alive(broker_pid), "the broker JVM outlived relais dev-kafka"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)  # lets the CLI stop its broker; SIGKILL would orphan it
            try:
                await asyncio.wait_for(proc.wait(), timeout=30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_cli_help_names_the_pinned_version() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devtools.devkafka",
        "--help",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0
    assert f"Apache Kafka {KAFKA_VERSION}" in out.decode()
    assert "--port" in out.decode()


def test_cluster_id_starting_with_a_dash_formats(monkeypatch: pytest.MonkeyPatch) -> None:
    """1 in 64 random ids starts with "-"; the storage tool must not read it as an option."""
    import devtools.devkafka.local as local

    monkeypatch.setattr(local, "new_cluster_id", lambda: "-" + local.base64.urlsafe_b64encode(
        uuid.uuid4().bytes).rstrip(b"=").decode()[1:])
    kafka = LocalKafka()
    start_or_skip(kafka)
    try:
        assert kafka.bootstrap.startswith("127.0.0.1:")
    finally:
        kafka.stop()
