"""A stage process that can die at the worst moments, for the runner's crash tests.

Runs an echo stage (transfers.received → transfers.validated, copying each record) on a real Kafka.
`--crash-after-produce` makes the first transaction send its outputs, wait for the broker to hold
them, print PRODUCED and hang, so the test can SIGKILL it between produce and commit.
`--crash-in-handle` prints HANDLING and hangs inside the first handle() instead.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Mapping, Sequence

from services.core.bus import Partition
from services.core.envelope import Emit, Record
from services.core.kafka import KafkaBus, KafkaSubscription
from services.core.runner import run_stage
from services.core.settings import Settings
from services.core.topics import RECEIVED, VALIDATED


class EchoStage:
    name = "echo"
    topics: Sequence[str] = (RECEIVED,)

    def __init__(self, hang_in_handle: bool) -> None:
        self.hang_in_handle = hang_in_handle

    async def handle(self, record: Record) -> Sequence[Emit]:
        if self.hang_in_handle:
            print("HANDLING", flush=True)
            await asyncio.sleep(3600)
        print(f"HANDLED {record.envelope.transfer_id}", flush=True)
        return [Emit(VALIDATED, record.key, record.envelope.evolve())]


class CrashAfterProduce(KafkaSubscription):
    async def complete(self, emits: Sequence[Emit], offsets: Mapping[Partition, int]) -> None:
        assert self._producer is not None
        await self._producer.begin_transaction()
        futures = [await self.bus._send(self._producer, e) for e in emits]
        await asyncio.gather(*futures)  # the broker holds the outputs; the offsets are not committed
        print("PRODUCED", flush=True)
        await asyncio.sleep(3600)


class CrashingBus(KafkaBus):
    def subscribe(self, stage: str, topics: Sequence[str]) -> KafkaSubscription:
        return CrashAfterProduce(self, stage, topics, f"{self.settings.group(stage)}-{self._instance}")


async def main(args: argparse.Namespace) -> None:
    settings = Settings(kafka_bootstrap=args.bootstrap, topic_prefix=args.prefix, topic_partitions=3,
                        instance_id=args.instance, batch_size=args.batch_size)
    bus = (CrashingBus if args.crash_after_produce else KafkaBus)(settings)
    await bus.start()
    stop = asyncio.Event()
    try:
        await run_stage(EchoStage(args.crash_in_handle), bus, settings, stop)
    finally:
        await bus.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--instance", required=True)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--crash-after-produce", action="store_true")
    parser.add_argument("--crash-in-handle", action="store_true")
    asyncio.run(main(parser.parse_args()))
    sys.exit(0)
