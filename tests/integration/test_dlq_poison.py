"""A stage's dead letter is read back from the poison topic, on Kafka and on the embedded log."""

from __future__ import annotations

from collections.abc import Callable

from services.core.buses import make_bus
from services.core.envelope import Emit, Envelope
from services.core.settings import Settings
from services.core.topics import POISON
from services.dlq.poison import read_poison


async def test_read_poison_finds_one_record_among_many(bus_settings: Callable[..., Settings]) -> None:
    settings = bus_settings(topic_partitions=2)
    bus = make_bus(settings)
    await bus.start()
    try:
        envelopes = [Envelope(type="fr.relais.transfer.received", source="/relais/ingress", transfer_id=f"t{n}",
                              data=f'{{"n": {n}}}'.encode(), extra={"failedstage": "validator"}) for n in range(12)]
        await bus.publish([Emit(POISON, e.transfer_id.encode(), e) for e in envelopes])
        found = await read_poison(bus, envelopes[7].id, timeout_s=60)
        assert found is not None and found.envelope.data == b'{"n": 7}' and found.key == b"t7"
        assert await read_poison(bus, "no-such-id", timeout_s=60) is None
        assert await read_poison(bus, "", timeout_s=60) is None
    finally:
        await bus.stop()
