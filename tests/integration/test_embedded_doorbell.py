"""Doorbells: a commit in one process wakes the idle members of another at once (services.core.embedded_doorbell).

The publisher is a real OS process. Where a test is about rings, the subscriber's own looks at the log are
pushed out past the poll's timeout, so only a ring can hand it a record before then: without rings it fails
(each poll returns empty after POLL_TIMEOUT_S). The others check the fallbacks: a member without a bell, and a
writer that rings nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from services.core import embedded
from services.core.embedded import EmbeddedBus
from services.core.embedded_doorbell import Ringer, bell_name
from services.core.settings import Settings
from services.core.topics import RECEIVED

Factory = Callable[..., Settings]

# A rung member has its record by then (a few ms here). Later than that, it came another way: this process sweeps
# the publisher's inbox after embedded.SWEEP_AGE_S (2 s) and wakes its own members then.
RUNG_S = 1.0
POLL_TIMEOUT_S = 20.0  # a record a ring did not announce comes back only after this (looks pushed past it)
ROUNDS = 5

PUBLISHER = """
import asyncio, json, sys
from services.core.embedded import EmbeddedBus
from services.core.envelope import Emit, Envelope
from services.core.settings import Settings
from services.core.topics import RECEIVED

async def main():
    if sys.argv[2:] == ["--silent"]:  # a writer that does not ring (an older Relais, during an upgrade)
        from services.core.embedded_doorbell import Ringer
        Ringer.ring = lambda self, topics, skip=(): 0
    bus = EmbeddedBus(Settings(**json.loads(sys.argv[1])))
    await bus.start()
    while line := await asyncio.to_thread(sys.stdin.readline):  # a record per line, acknowledged once published
        n = int(line)
        env = Envelope(type="fr.relais.transfer.received", source="/test", transfer_id=f"t{n}", data=b"{}")
        await bus.publish([Emit(RECEIVED, f"t{n}".encode(), env)])
        print(n, flush=True)
    await bus.stop()

asyncio.run(main())
"""


@pytest.fixture
def settings(make_settings: Factory, tmp_path: Path) -> Settings:
    return make_settings(kafka_bootstrap=None, embedded_log_path=tmp_path / "log.db")


@pytest.fixture
def looks_pushed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "BELL_POLL_S", 3600.0)
    monkeypatch.setattr(embedded, "IDLE_POLL_S", 3600.0)


class Publisher:
    """A publishing process: `publish(n)` returns once the child has published record t{n}."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def publish(self, n: int) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{n}\n".encode())
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        assert line.strip() == str(n).encode(), line


@contextlib.asynccontextmanager
async def publisher(settings: Settings, *flags: str) -> AsyncIterator[Publisher]:
    config = {"topic_prefix": settings.topic_prefix, "topic_partitions": settings.topic_partitions,
              "kafka_bootstrap": None, "embedded_log_path": str(settings.embedded_log_path),
              "auth_disabled": True, "log_format": "console", "log_level": "warning"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", PUBLISHER, json.dumps(config), *flags,
                                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        yield Publisher(proc)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def received_at(sub: embedded.EmbeddedSubscription, n: int) -> float:
    """When (monotonic) the idle member's poll handed out record t{n}; +inf if not within POLL_TIMEOUT_S."""
    start = time.monotonic()
    while time.monotonic() - start < POLL_TIMEOUT_S:
        records = await sub.poll(10, POLL_TIMEOUT_S - (time.monotonic() - start))
        if any(r.key == f"t{n}".encode() for r in records):
            return time.monotonic()
    return float("inf")


async def wait_after_publish(sub: embedded.EmbeddedSubscription, pub: Publisher, n: int) -> float:
    """Seconds from the publisher's acknowledgement of t{n} to the idle member having it."""
    polled = asyncio.create_task(received_at(sub, n))
    await asyncio.sleep(0.2)  # the member is waiting now
    await pub.publish(n)
    published = time.monotonic()
    return max(0.0, await polled - published)


async def test_a_commit_in_another_process_wakes_an_idle_member_at_once(
        settings: Settings, looks_pushed_out: None) -> None:
    bus = EmbeddedBus(settings)
    await bus.start()
    sub = bus.subscribe("validator", [RECEIVED])
    await sub.start()
    try:
        assert await sub.poll(10, 0.1) == []  # joined, idle
        async with publisher(settings) as pub:
            waits = []
            for n in range(ROUNDS):  # every ring, not only the first (the holders read once, then cached)
                waits.append(await wait_after_publish(sub, pub, n))
            assert max(waits) < RUNG_S, f"records reached the idle member after {waits} s: not rung"
    finally:
        await sub.stop()
        await bus.stop()


async def test_a_member_without_a_bell_is_still_rung_at_its_name_and_polls(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its bell's name taken (as where abstract sockets cannot be bound): it falls back to looking at the log
    every IDLE_POLL_S, and a ring for it reaches whoever holds the name, harmlessly."""
    monkeypatch.setattr(embedded, "BELL_POLL_S", 3600.0)  # with a bell it would never look: it must not have one
    bus = EmbeddedBus(settings)
    await bus.start()
    sub = bus.subscribe("validator", [RECEIVED])
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    squatter.bind(bell_name(settings.embedded_log_path, sub.member))
    squatter.settimeout(10)
    await sub.start()
    try:
        async with publisher(settings) as pub:
            assert await wait_after_publish(sub, pub, 7) < RUNG_S
            assert await asyncio.to_thread(squatter.recv, 64) == b""  # the ring went to the member's name
    finally:
        squatter.close()
        await sub.stop()
        await bus.stop()


async def test_records_from_a_writer_that_does_not_ring_make_the_member_look_often(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """An older Relais during an upgrade rings nobody: once a record came unannounced, the member looks at the
    log every IDLE_POLL_S again (not BELL_POLL_S), so such writers cost what they did before bells."""
    monkeypatch.setattr(embedded, "BELL_POLL_S", 3.0)
    monkeypatch.setattr(embedded, "IDLE_POLL_S", 0.05)
    bus = EmbeddedBus(settings)
    await bus.start()
    sub = bus.subscribe("validator", [RECEIVED])
    await sub.start()
    try:
        async with publisher(settings, "--silent") as pub:
            first = await wait_after_publish(sub, pub, 0)
            assert first < POLL_TIMEOUT_S  # found by a look, BELL_POLL_S at most
            later = [await wait_after_publish(sub, pub, n) for n in range(1, ROUNDS)]
            assert max(later) < RUNG_S, f"after an unannounced record, waits of {later} s: still looking every 3 s"
    finally:
        await sub.stop()
        await bus.stop()


async def test_ringing_members_that_are_gone_is_harmless(tmp_path: Path) -> None:
    async def holders() -> dict[str, set[str]]:
        return {"received": {"gone-1", "gone-2"}}

    ringer = Ringer(tmp_path / "log.db", holders)
    try:
        assert ringer.ring(["received"]) == 0  # nothing read yet: nobody known
        await ringer.refresh()
        assert ringer.ring(["received"]) == 0  # nobody listens at their names: nothing raised
        assert ringer.ring(["validated"]) == 0
    finally:
        ringer.close()


async def test_a_commit_stands_when_the_holders_cannot_be_read(settings: Settings) -> None:
    """A ring is a hint: a log closed under it (its holders unreadable) fails no commit and no refresh."""
    bus = EmbeddedBus(settings)
    await bus.start()
    bus.log.close()
    await bus._ringer.refresh()  # BusUnavailable inside: kept what it knew
    bus.announce([settings.topic(RECEIVED)])
    await bus.stop()
