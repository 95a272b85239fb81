"""Read a stage's dead letter back from the poison topic (`transfers.dlq`), where the runner keeps the whole record.

The bus has no random access, so this reads the topic from its start with a throw-away consumer group
that never commits, up to the heads it had when asked, and keeps the record with the given id. The
poison topic only holds records no stage could handle, so it stays small; this runs on an operator's
replay or payload read, never on the record path.
"""

from __future__ import annotations

import time
import uuid

from services.core.bus import Bus
from services.core.envelope import Record
from services.core.topics import POISON

READ_TIMEOUT_S = 30.0


async def read_poison(bus: Bus, poison_id: str, *, timeout_s: float = READ_TIMEOUT_S) -> Record | None:
    """The poison record whose envelope id is `poison_id`, or None when the topic no longer holds it."""
    if not poison_id:
        return None
    group = f"dlq-reader-{uuid.uuid4().hex[:12]}"
    heads = {p: head for p, head in (await bus.lag(group, [POISON])).items() if head > 0}
    if not heads:
        return None
    sub = bus.subscribe(group, [POISON])
    await sub.start()
    try:
        positions = dict.fromkeys(heads, -1)
        deadline = time.monotonic() + timeout_s
        while any(positions[p] < head - 1 for p, head in heads.items()) and time.monotonic() < deadline:
            for record in await sub.poll(500, 0.5):
                if record.envelope.id == poison_id:
                    return record
                partition = next((p for p in heads if (p.topic, p.partition) == (record.topic, record.partition)),
                                 None)
                if partition is not None:
                    positions[partition] = record.offset
        return None
    finally:
        await sub.stop()
