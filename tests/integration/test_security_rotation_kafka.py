"""Key rotation on a real Kafka: records waiting for a stage under a removed key stop the start; once the
stage has handled them (re-sealing its output under the current key), the old key can go."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from services.core import crypto
from services.core.envelope import Emit, Record
from services.core.errors import ConfigurationError
from services.core.kafka import KafkaBus
from services.core.runner import run_stage
from services.core.settings import Settings
from services.core.topics import POISON, RECEIVED, VALIDATED
from services.keyrotation import check_keys_at_start, live_keys
from tests.support.kafka import received, wait_for

pytestmark = pytest.mark.kafka
OLD, NEW = crypto.new_key("old"), crypto.new_key("new")


class Validator:  # stands in for the validator stage: its group consumes transfers.received
    name = "validator"
    topics: Sequence[str] = (RECEIVED,)

    async def handle(self, record: Record) -> Sequence[Emit]:
        return [Emit(VALIDATED, record.key, record.envelope.evolve())]


async def test_records_waiting_under_a_removed_key_are_counted_and_refuse_the_start(
        kafka_bootstrap: str, make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    def settings(keys: str) -> Settings:
        return make_settings(kafka_bootstrap=kafka_bootstrap, encryption_keys=keys, blob_dir=tmp_path / "blobs")

    bus = KafkaBus(settings(OLD))
    await bus.start()
    await bus.publish([received(data=b'{"resourceType":"Bundle"}') for _ in range(3)])
    never_opened = received(enckid="ancient", decrypterror="unknown encryption key id 'ancient'")
    await bus.publish([Emit(POISON, never_opened.key, never_opened.envelope)])  # kept as it came: not live
    await bus.stop()

    only_new = KafkaBus(settings(NEW))
    assert (await live_keys(only_new, settings(NEW))).kafka == {"old": 3}
    with pytest.raises(ConfigurationError, match=r"key 'old': 3 records waiting on Kafka"):
        await check_keys_at_start(only_new, settings(NEW))

    both = settings(f"{NEW},{OLD}")  # rotation: the new key first, the old one still there
    bus, stop = KafkaBus(both), asyncio.Event()
    await bus.start()
    task = asyncio.create_task(run_stage(Validator(), bus, both, stop))
    try:
        async def drained() -> bool:
            return (await live_keys(bus, both)).kafka.get("old", 0) == 0

        await wait_for(drained, timeout_s=60, interval_s=1.0)
        assert set((await live_keys(bus, both)).kafka) <= {"new"}  # the router's input: sealed under 'new'
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await bus.stop()
    await check_keys_at_start(KafkaBus(settings(NEW)), settings(NEW))  # the old key can go
