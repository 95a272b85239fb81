"""A replica whose consumer group never finishes its rebalance gives up joining and says so, instead of hanging.

Seen on a fresh broker with two validator replicas started together: one member rejoined at every heartbeat
(78 generations in a minute) while the other's JoinGroup never returned, so that replica never started and the
group never settled. Here the group is held deterministically: a first member stays inside its revoke callback,
so the rebalance that a second member's JoinGroup starts cannot finish. The second member — Relais's own
subscription — must give up within its join timeout with BusUnavailable, which the runner treats like any bus
fault: it leaves, backs off and joins again as a new member.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener

from services.core import kafka as kafka_module
from services.core.errors import BusUnavailable
from services.core.kafka import KafkaBus
from services.core.settings import Settings
from services.core.topics import RECEIVED

pytestmark = pytest.mark.kafka


class _StuckInRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    """Never returns from a revocation: the member never rejoins, the rebalance never finishes."""

    def __init__(self) -> None:
        self.revoking = asyncio.Event()

    async def on_partitions_revoked(self, revoked: object) -> None:
        if revoked:
            self.revoking.set()
            await asyncio.Event().wait()

    async def on_partitions_assigned(self, assigned: object) -> None:
        return None


async def test_a_join_that_cannot_finish_gives_up_with_bus_unavailable(
        kafka_bootstrap: str, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(kafka_bootstrap=kafka_bootstrap)
    bus = KafkaBus(settings)
    await bus.start()
    listener = _StuckInRevoke()
    holder = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=settings.group("joiner"),
                              enable_auto_commit=False, rebalance_timeout_ms=120_000, max_poll_interval_ms=120_000)
    holder.subscribe(topics=[settings.topic(RECEIVED)], listener=listener)
    await holder.start()  # the group's only member, holding every partition
    monkeypatch.setattr(kafka_module, "JOIN_TIMEOUT_S", 3.0)
    sub = bus.subscribe("joiner", [RECEIVED])
    began = time.monotonic()
    try:
        async with asyncio.timeout(60):  # without the join timeout, start() waits for the 120 s rebalance
            with pytest.raises(BusUnavailable, match="joining the consumer group"):
                await sub.start()
        assert listener.revoking.is_set(), "the holder was never asked to give its partitions back"
        assert time.monotonic() - began < 15
        stopping = time.monotonic()
        await sub.stop()  # it never joined: nothing to hand back, no wait for the stuck JoinGroup's answer
        assert time.monotonic() - stopping < 10, "stop() waited out the abandoned JoinGroup (40 s request timeout)"
    finally:
        await sub.stop()
        await bus.stop()
        holder_stop = asyncio.create_task(holder.stop())
        done, _ = await asyncio.wait([holder_stop], timeout=10)
        if not done:
            holder_stop.cancel()
