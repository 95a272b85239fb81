"""A delivery process SIGKILLed while its POST is in flight: another process resolves the attempt in seconds.

Real processes, a real SQLite ledger and a real demo target that applies each transaction 2 s after it
arrives (so the dead process's request is still executing at the target when it dies). A first Bundle
is delivered normally, which gives the journal the target's pace; the second one's delivery process is
SIGKILLed mid-POST. This test process then handles the same delivery record, as the next holder of its
partition would. What counts is at the target, by content: the Bundle applied once, POSTed once.

Before incarnations were journaled, the record waited out the whole time bound of the dead process's
POST (connect_s + total_s + 5 s = 40 s with the default timeouts); the attempt of a process this host
knows is dead waits only for what it already sent to settle at the target. A process still alive is
waited for as before.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.core.envelope import Envelope, Record
from services.core.topics import DELIVERIES, EVENTS
from services.delivery.stage import DeliveryStage
from tests.fixtures.tddui import make_bundle, patient_identifier
from tests.support.delivery_once import delivery_record, make_stage
from tests.support.processes import REPO, DemoTarget

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="incarnations are read from /proc")
PACE_S = 2.0  # the target applies each transaction this long after it arrives
DELIVERED = "fr.relais.event.delivered"  # the outcome journaled by the process that made the attempt
OUTCOMES = {f"{EVENTS}:{DELIVERED}", f"{EVENTS}:{DELIVERED}_unconfirmed"}  # or found by a probe


@pytest.fixture
def target(tmp_path: Path) -> Iterator[DemoTarget]:
    demo = DemoTarget(tmp_path / "target.log").start()
    yield demo
    demo.stop()


class Delivery:
    """A delivery process (tests/support/delivery_once.py) handling the record of transfer tr-<seed>."""

    def __init__(self, tmp_path: Path, target: DemoTarget, seed: int) -> None:
        self.log = tmp_path / f"delivery-{seed}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.delivery_once", "--database-url", database_url(tmp_path),
             "--base-url", target.fhir, "--blobs", str(tmp_path / "blobs"), "--process", "delivery-1",
             "--seed", str(seed)], cwd=REPO, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)

    def finish(self) -> str:
        assert self.proc.wait(60) == 0, self.log.read_text()
        return self.log.read_text()

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def database_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path}/ledger.db"


def posts_of(target: DemoTarget, seed: int) -> tuple[int, int]:
    """(POSTs received, transactions applied) of transfer tr-<seed>'s Bundle, by the person it is about."""
    person = patient_identifier(make_bundle(3, seed=seed))
    rows = [r for r in target.received() if isinstance(r["body"], dict) and patient_identifier(r["body"]) == person]
    return len(rows), sum(1 for r in rows if r["applied"])


def wait_for_post(target: DemoTarget, seed: int, delivery: Delivery) -> None:
    deadline = time.monotonic() + 30
    while posts_of(target, seed)[0] < 1:
        assert delivery.proc.poll() is None and time.monotonic() < deadline, delivery.log.read_text()
        time.sleep(0.05)


async def deliver_here(tmp_path: Path, target: DemoTarget, seed: int,
                       within_s: float) -> list[tuple[float, list[str]]]:
    """Delivery record `seed` handled in this process (a delivery stage of its own, `delivery-2`), as the next
    holder of its partition would: each retry the stage parks is followed until an outcome is emitted; returns
    (seconds since start, emitted types) of every handling."""
    stage, ledger = make_stage(database_url(tmp_path), target.fhir, tmp_path / "blobs", "delivery-2")
    try:
        return await _until_delivered(stage, delivery_record(seed), within_s)
    finally:
        await stage.aclose()
        await ledger.close()


async def _until_delivered(stage: DeliveryStage, env: Envelope, within_s: float) -> list[tuple[float, list[str]]]:
    start, seen = time.monotonic(), []
    while time.monotonic() - start < within_s:
        emits = list(await stage.handle(Record(DELIVERIES, 0, 0, b"t|p", env)))
        seen.append((time.monotonic() - start, [f"{e.topic}:{e.envelope.type}" for e in emits]))
        if OUTCOMES & set(seen[-1][1]):
            return seen
        parked = [e.envelope for e in emits if e.topic.startswith("deliveries.retry")]
        assert parked, seen[-1]
        env = parked[0]
        await asyncio.sleep(0.2)
    raise AssertionError(f"not delivered within {within_s:g}s: {seen[-3:]}")


async def test_a_killed_delivery_process_attempt_is_resolved_in_seconds_and_applied_once(
        tmp_path: Path, target: DemoTarget, capsys: pytest.CaptureFixture[str]) -> None:
    target.fault(delay_s=PACE_S, count=-1)
    assert DELIVERED in Delivery(tmp_path, target, seed=1).finish()  # the target's pace, journaled
    dying = Delivery(tmp_path, target, seed=2)
    wait_for_post(target, 2, dying)
    dying.kill9()  # its POST is executing at the target: applied PACE_S after it arrived
    killed = time.monotonic()
    seen = await deliver_here(tmp_path, target, 2, within_s=60)
    resolved_s = time.monotonic() - killed
    with capsys.disabled():
        print(f"\n[kill -9 mid-POST] attempt resolved {resolved_s:.1f}s after the kill "
              f"({len(seen)} handlings); target POSTs/applied for the Bundle: {posts_of(target, 2)}")
    assert not OUTCOMES & set(seen[0][1])  # the first look waited: the request was still executing at the target
    assert posts_of(target, 2) == (1, 1)  # probed, found, never sent again
    assert resolved_s < 12, f"the dead process's attempt waited {resolved_s:.1f}s"


async def test_a_live_process_attempt_is_waited_for_as_long_as_its_post_may_run(
        tmp_path: Path, target: DemoTarget) -> None:
    target.fault(delay_s=PACE_S, count=1)
    assert DELIVERED in Delivery(tmp_path, target, seed=1).finish()  # the target's pace: 2 s
    target.fault(delay_s=4 * PACE_S, count=1)  # the next POST takes 8 s; its process lives through it
    living = Delivery(tmp_path, target, seed=2)
    try:
        wait_for_post(target, 2, living)
        seen = await deliver_here(tmp_path, target, 2, within_s=30)
        assert DELIVERED in living.finish()
    finally:
        living.kill9()
    # Waited for the live process's answer (journaled), past the time a dead one's would have settled in.
    assert seen[-1][0] > 2 * PACE_S + 1, seen
    assert not any("in_doubt" in t for _, types in seen for t in types), seen
    assert posts_of(target, 2) == (1, 1)
    assert Counter(t for _, types in seen for t in types)[f"{EVENTS}:{DELIVERED}"] == 1  # the journaled answer
