"""A publisher process for the inbox's crash test: publishes as fast as it can and says what was acknowledged.

`python -m tests.support.inbox_publisher LOG_PATH PREFIX TAG` starts an EmbeddedBus on LOG_PATH (topic
prefix PREFIX), publishes keyed records from 8 concurrent senders (key k<sender>; transfer ids
TAGk<sender>-<n>, numbered in each sender's order), and prints `ACK TAGk<sender> <n>` once each
publish returned. The test kills it with
SIGKILL at a moment of its choosing: whatever was acknowledged must reach the log once, in order.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from services.core.embedded import EmbeddedBus
from services.core.envelope import Emit, Envelope
from services.core.settings import Settings
from services.core.topics import RECEIVED

SENDERS = 8


async def send(bus: EmbeddedBus, tag: str, sender: int) -> None:
    n = 0
    while True:
        env = Envelope(type="fr.relais.transfer.received", source="/test", transfer_id=f"{tag}k{sender}-{n}",
                       data=b"x" * 20_000)
        await bus.publish([Emit(RECEIVED, f"k{sender}".encode(), env)])
        print(f"ACK {tag}k{sender} {n}", flush=True)
        n += 1


async def main(path: Path, prefix: str, tag: str) -> None:
    bus = EmbeddedBus(Settings(kafka_bootstrap=None, embedded_log_path=path, topic_prefix=prefix,
                               topic_partitions=3, auth_disabled=True), path)
    await bus.start()
    print("STARTED", flush=True)
    await asyncio.gather(*(send(bus, tag, s) for s in range(SENDERS)))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3]))
