"""The stage runner on a real Kafka: commits only with its outputs, so a crash loses nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from services.core.envelope import Record
from services.core.kafka import KafkaBus
from services.core.settings import Settings
from services.core.topics import RECEIVED, VALIDATED, declared_topics
from tests.support.kafka import publish, read_topic, received

pytestmark = pytest.mark.kafka
REPO = Path(__file__).resolve().parents[2]


class Harness:
    """Starts tests/support/crashy_stage.py processes and kills them by PID."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, *flags: str, instance: str = "replica-1") -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.crashy_stage", "--bootstrap", str(self.settings.kafka_bootstrap),
             "--prefix", self.settings.topic_prefix, "--instance", instance, *flags],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def harness(kafka_bootstrap: str, make_settings: Callable[..., Settings]) -> Iterator[Harness]:
    h = Harness(make_settings(kafka_bootstrap=kafka_bootstrap))
    yield h
    h.close()


async def wait_line(proc: subprocess.Popen[str], wanted: str, timeout_s: float = 60.0) -> None:
    """Read the child's stdout until a line starts with `wanted`."""
    assert proc.stdout is not None

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith(wanted):
                return
        raise AssertionError(f"process exited (code {proc.poll()}) before printing {wanted}")

    await asyncio.wait_for(asyncio.to_thread(read), timeout_s)


def transfer_ids(records: Sequence[Record]) -> list[str]:
    return [r.envelope.transfer_id for r in records]


async def test_kill_between_produce_and_commit_reprocesses_and_loses_nothing(harness: Harness) -> None:
    s = harness.settings
    inputs = [received() for _ in range(10)]
    await publish(s, inputs)
    expected = sorted(e.envelope.transfer_id for e in inputs)

    crashing = harness.start("--crash-after-produce")
    await wait_line(crashing, "PRODUCED")
    os.kill(crashing.pid, signal.SIGKILL)
    crashing.wait(10)
    # The broker holds the outputs of the dead transaction, but no committed reader sees them.
    uncommitted = await read_topic(s, VALIDATED, expect=1, isolation="read_uncommitted")
    assert uncommitted, "the crash came before anything was produced; the test proved nothing"

    harness.start(instance="replica-1")  # same transactional id: fences the dead transaction at once
    committed = await read_topic(s, VALIDATED, expect=len(inputs), settle_s=2.0)
    assert sorted(transfer_ids(committed)) == expected  # every record, exactly once
    lag = await KafkaBus(s).lag("echo", [RECEIVED])
    assert len(lag) == s.topic_partitions and sum(lag.values()) == 0


async def test_kill_during_handle_reprocesses(harness: Harness) -> None:
    s = harness.settings
    inputs = [received() for _ in range(5)]
    await publish(s, inputs)

    crashing = harness.start("--crash-in-handle")
    await wait_line(crashing, "HANDLING")
    os.kill(crashing.pid, signal.SIGKILL)
    crashing.wait(10)

    harness.start(instance="replica-2")
    committed = await read_topic(s, VALIDATED, expect=len(inputs), settle_s=1.0)
    assert sorted(transfer_ids(committed)) == sorted(e.envelope.transfer_id for e in inputs)


async def test_topics_created_idempotently(kafka_bootstrap: str, make_settings: Callable[..., Settings]) -> None:
    s = make_settings(kafka_bootstrap=kafka_bootstrap)
    buses = [KafkaBus(s) for _ in range(3)]
    await asyncio.gather(*(b.ensure_topics() for b in buses))  # racing creators
    await buses[0].ensure_topics()  # and once more when everything exists
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        names = {t for t in await admin.list_topics() if t.startswith(s.topic_prefix)}
        described = await admin.describe_topics(sorted(names))
    finally:
        await admin.close()
    assert names == {s.topic(t.name) for t in declared_topics(s)}
    assert {len(d["partitions"]) for d in described} == {s.topic_partitions}
