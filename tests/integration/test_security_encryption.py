"""Encryption at rest through the bus (real Kafka and the embedded log): round trip, rotation, tampering; and key
rotation on a real Kafka: records waiting for a stage under a removed key stop the start; once the stage has
handled them (re-sealing its output under the current key), the old key can go."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from services.core import crypto
from services.core.bus import Bus
from services.core.buses import make_bus
from services.core.embedded import EmbeddedBus, _encode_headers
from services.core.envelope import Emit, Record
from services.core.errors import ConfigurationError
from services.core.kafka import KafkaBus
from services.core.runner import run_stage
from services.core.settings import Settings
from services.core.topics import EVENTS, POISON, RECEIVED, VALIDATED
from services.keyrotation import check_keys_at_start, live_keys
from tests.integration.test_stage_buses import read_all
from tests.support.kafka import received, wait_for

Factory = Callable[..., Settings]
K_OLD = crypto.new_key("2024-01")
K_NEW = crypto.new_key("2025-06")
SECRET = b'{"resourceType":"Bundle","type":"transaction","entry":[{"resource":{"name":[{"family":"ZORGLUBINE"}]}}]}'


class CopyStage:
    name = "copy"
    topics: Sequence[str] = (RECEIVED,)

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    async def handle(self, record: Record) -> Sequence[Emit]:
        self.seen.append(record.envelope.data)
        return [Emit(VALIDATED, record.key, record.envelope.evolve())]


class ValidatorStandIn(CopyStage):
    name = "validator"  # its group consumes transfers.received: live_keys counts what it has yet to read


@contextlib.asynccontextmanager
async def stage_running(stage: CopyStage, bus: Bus, settings: Settings) -> AsyncIterator[None]:
    """`bus` started and `stage` consuming from it under the real runner; both stopped on the way out."""
    stop = asyncio.Event()
    await bus.start()
    task = asyncio.create_task(run_stage(stage, bus, settings, stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await bus.stop()


async def raw_values(bus: Bus, settings: Settings, topic: str) -> list[tuple[bytes, dict[str, bytes]]]:
    """What is actually stored in the log, bypassing decryption."""
    if isinstance(bus, EmbeddedBus):
        def rows(conn):  # type: ignore[no-untyped-def]
            return conn.execute("SELECT value, headers FROM records WHERE topic=?", (settings.topic(topic),)).fetchall()
        from services.core.embedded import _decode_headers
        return [(v, dict(_decode_headers(h))) for v, h in await bus.log.read(rows)]
    consumer = AIOKafkaConsumer(settings.topic(topic), bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                auto_offset_reset="earliest", isolation_level="read_committed")
    await consumer.start()
    try:
        batches = await consumer.getmany(timeout_ms=3000)
        return [(m.value or b"", dict(m.headers)) for ms in batches.values() for m in ms]
    finally:
        await consumer.stop()


async def publish_raw(bus: Bus, settings: Settings, emit: Emit, value: bytes, headers: list[tuple[str, bytes]]) -> None:
    if isinstance(bus, EmbeddedBus):
        await bus.log.write(bus.log.append, [(settings.topic(emit.topic), emit.key, value, _encode_headers(headers))])
        bus.announce([settings.topic(emit.topic)])
        return
    assert isinstance(bus, KafkaBus) and bus._producer is not None
    await bus._producer.send_and_wait(settings.topic(emit.topic), value=value, key=emit.key, headers=headers)


async def test_records_are_encrypted_in_the_log_and_decrypted_for_stages(bus_settings: Factory) -> None:
    s = bus_settings(encryption_keys=K_OLD)
    bus, stage = make_bus(s), CopyStage()
    async with stage_running(stage, bus, s):
        await bus.publish([received(data=SECRET)])
        out = await read_all(bus, VALIDATED, expect=1)
        assert [r.envelope.data for r in out] == [SECRET]
        assert stage.seen == [SECRET]
        for topic in (RECEIVED, VALIDATED):
            stored = await raw_values(bus, s, topic)
            assert stored and all(b"ZORGLUBINE" not in v and h["ce_enckid"] == b"2024-01" for v, h in stored)


async def test_record_sealed_with_old_key_still_decrypts_after_rotation(bus_settings: Factory) -> None:
    before = bus_settings(encryption_keys=K_OLD)
    bus = make_bus(before)
    await bus.start()
    await bus.publish([received(data=SECRET)])
    await bus.stop()

    after = before.model_copy(update={"encryption_keys": f"{K_NEW},{K_OLD}"})
    bus, stage = make_bus(after), CopyStage()
    async with stage_running(stage, bus, after):
        out = await read_all(bus, VALIDATED, expect=1)
        assert [r.envelope.data for r in out] == [SECRET] and stage.seen == [SECRET]
        stored = await raw_values(bus, after, VALIDATED)
        assert {h["ce_enckid"] for _, h in stored} == {b"2025-06"}  # re-sealed with the new key


async def test_tampered_record_is_dead_lettered_not_handled(bus_settings: Factory) -> None:
    s = bus_settings(encryption_keys=K_OLD)
    bus, stage = make_bus(s), CopyStage()
    keyring = crypto.Keyring.from_settings(s)
    good, bad = received(data=SECRET), received(data=SECRET)
    value, headers = crypto.seal_envelope(keyring, bad.envelope)
    value = value[:-5] + bytes([value[-5] ^ 0x40]) + value[-4:]
    async with stage_running(stage, bus, s):
        await publish_raw(bus, s, bad, value, headers)
        await bus.publish([good])
        poisoned = await read_all(bus, POISON, expect=1)
        assert [r.envelope.transfer_id for r in poisoned] == [bad.envelope.transfer_id]
        assert "DecryptionError" in poisoned[0].envelope.extra["reason"]
        events = await read_all(bus, EVENTS, expect=1)
        failed = [e for e in events if e.envelope.transfer_id == bad.envelope.transfer_id]
        assert failed and failed[0].envelope.type == "fr.relais.event.failed"
        out = await read_all(bus, VALIDATED, expect=1, settle_s=0.5)
        assert [r.envelope.transfer_id for r in out] == [good.envelope.transfer_id]
        await wait_for(lambda: _true(len(stage.seen) == 1))
        assert stage.seen == [SECRET]  # the stage never saw the tampered record
        # The poison copy keeps what arrived (still sealed), for forensics.
        stored = await raw_values(bus, s, POISON)
        assert stored[0][0] == value


async def _true(value: bool) -> bool:
    return value


async def test_records_waiting_under_a_removed_key_are_counted_and_refuse_the_start(
        kafka_bootstrap: str, make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    def settings(keys: str) -> Settings:
        return make_settings(kafka_bootstrap=kafka_bootstrap, encryption_keys=keys, blob_dir=tmp_path / "blobs")

    bus = KafkaBus(settings(K_OLD))
    await bus.start()
    await bus.publish([received(data=b'{"resourceType":"Bundle"}') for _ in range(3)])
    never_opened = received(enckid="ancient", decrypterror="unknown encryption key id 'ancient'")
    await bus.publish([Emit(POISON, never_opened.key, never_opened.envelope)])  # kept as it came: not live
    await bus.stop()

    only_new = KafkaBus(settings(K_NEW))
    assert (await live_keys(only_new, settings(K_NEW))).kafka == {"2024-01": 3}
    with pytest.raises(ConfigurationError, match=r"key '2024-01': 3 records waiting on Kafka"):
        await check_keys_at_start(only_new, settings(K_NEW))

    both = settings(f"{K_NEW},{K_OLD}")  # rotation: the new key first, the old one still there
    bus = KafkaBus(both)
    async with stage_running(ValidatorStandIn(), bus, both):
        async def drained() -> bool:
            return (await live_keys(bus, both)).kafka.get("2024-01", 0) == 0

        await wait_for(drained, timeout_s=60, interval_s=1.0)
        assert set((await live_keys(bus, both)).kafka) <= {"2025-06"}  # the router's input: sealed under the new key
    await check_keys_at_start(KafkaBus(settings(K_NEW)), settings(K_NEW))  # the old key can go
