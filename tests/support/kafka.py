"""Test helpers that talk to the real broker: publish envelopes, read topics back."""

from __future__ import annotations

import asyncio
import inspect
import time

from aiokafka import AIOKafkaConsumer, ConsumerRecord

from services.core.envelope import Emit, Envelope, Record, new_id
from services.core.kafka import KafkaBus
from services.core.settings import Settings
from services.core.topics import RECEIVED


def received(transfer_id: str | None = None, data: bytes = b'{"resourceType":"Bundle"}', **extra: str) -> Emit:
    """A transfers.received record as ingress would publish it."""
    tid = transfer_id or new_id()
    env = Envelope(type="fr.relais.transfer.received", source="/relais/tests", transfer_id=tid, data=data,
                   producer="tests", extra=extra)
    return Emit(RECEIVED, tid.encode(), env)


async def publish(settings: Settings, emits: list[Emit]) -> None:
    """Publish through a fresh KafkaBus (creating the topics first)."""
    bus = KafkaBus(settings)
    await bus.start()
    try:
        await bus.publish(emits)
    finally:
        await bus.stop()


async def read_topic(settings: Settings, topic: str, *, expect: int, timeout_s: float = 30.0,
                     isolation: str = "read_committed", settle_s: float = 0.0) -> list[Record]:
    """Every record of a logical topic from the start, once `expect` are there (or at the timeout).

    With `settle_s`, keep reading that long after reaching `expect`, to catch unexpected extras.
    """
    consumer = AIOKafkaConsumer(settings.topic(topic), bootstrap_servers=settings.kafka_bootstrap,
                                group_id=None, auto_offset_reset="earliest", isolation_level=isolation,
                                enable_auto_commit=False)
    await consumer.start()
    out: list[ConsumerRecord[bytes, bytes]] = []
    try:
        deadline = time.monotonic() + timeout_s
        settle_until: float | None = None
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            out += [m for msgs in batch.values() for m in msgs]
            if len(out) >= expect:
                if settle_until is None:
                    settle_until = time.monotonic() + settle_s
                if time.monotonic() >= settle_until:
                    break
    finally:
        await consumer.stop()
    return [Record(topic, m.partition, m.offset, m.key, Envelope.from_headers(m.headers, m.value)) for m in out]


async def wait_for(predicate, timeout_s: float = 30.0, interval_s: float = 0.1):  # type: ignore[no-untyped-def]
    """Call a predicate (plain or async) until it returns a truthy value; that value, or AssertionError."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s (last value: {value!r})")
        await asyncio.sleep(interval_s)
