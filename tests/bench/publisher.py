"""A benchmark's publisher in a process of its own: publishes records at a pace, and says when each was on the bus.

`python -m tests.bench.publisher --records FILE --acks FILE --topic-prefix P --partitions N
(--bootstrap HOST:PORT | --log-path PATH) [--round-size N --pace-s S]`

A bench that publishes from the process it measures counts its own publish in the latencies and runs it on
the measured stage's event loop (issue 15: a 360-record burst beside 5 slow targets). This process opens
the bus (Kafka, or the embedded log: both take several writing processes), prints `ready`, waits for a
line on its standard input, then publishes the records of `--records` (JSON lines written by
`write_records`), `--round-size` at a time every `--pace-s` (all at once without a round size), each round
as a stage writes its outputs: one `complete` of a consumer-group member of its own (Kafka: one
transaction; embedded: one log transaction), as the router writes `deliveries`. Once it has returned, the
round is on the bus, which is where delivery's work starts: that moment (epoch seconds) is written per
transfer id to `--acks` (a JSON object) before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import orjson

from services.core.buses import make_bus
from services.core.envelope import Emit, Envelope
from services.core.logging import configure_logging
from services.core.settings import Settings
from services.core.topics import DELIVERIES


def write_records(path: Path, emits: Sequence[Emit]) -> None:
    """The records for `--records`: one JSON line each (topic, key, the envelope's headers, its data)."""
    with path.open("wb") as out:
        for e in emits:
            out.write(orjson.dumps({
                "topic": e.topic, "key": None if e.key is None else base64.b64encode(e.key).decode(),
                "headers": [(k, v.decode()) for k, v in e.envelope.to_headers()],
                "data": base64.b64encode(e.envelope.data).decode()}) + b"\n")


def read_records(path: Path) -> list[Emit]:
    """The records written by `write_records`."""
    emits = []
    for line in path.read_bytes().splitlines():
        r = orjson.loads(line)
        env = Envelope.from_headers([(k, v.encode()) for k, v in r["headers"]], base64.b64decode(r["data"]))
        emits.append(Emit(r["topic"], None if r["key"] is None else base64.b64decode(r["key"]), env))
    return emits


async def publish(settings: Settings, emits: list[Emit], round_size: int, pace_s: float) -> dict[str, float]:
    """Publish once told to (a line on stdin); each record's transfer id -> when its round was on the bus."""
    bus = make_bus(settings)
    await bus.start()
    # As the router writes `deliveries`: a stage's outputs, in one `complete` (Kafka: one transaction, whose records
    # a read_committed consumer sees at once when it commits; embedded: one log transaction). A publish call per
    # record, as the ingress publishes, made a burst of 360 records a stream of half a second on Kafka, and went
    # through the embedded log's inbox, which no record for delivery takes.
    member = bus.subscribe(f"bench-publisher-{uuid.uuid4().hex[:6]}", [DELIVERIES])
    await member.start()
    acked: dict[str, float] = {}
    try:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        rounds = [emits[i:i + round_size] for i in range(0, len(emits), round_size)] if round_size else [emits]
        began = time.perf_counter()
        for n, batch in enumerate(rounds):
            if n:
                await asyncio.sleep(max(0.0, began + n * pace_s - time.perf_counter()))
            await member.complete(batch, {})
            now = time.time()
            acked |= {e.envelope.transfer_id: now for e in batch}
    finally:
        await member.stop()
        await bus.stop()
    return acked


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.publisher", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=Path, required=True)
    parser.add_argument("--acks", type=Path, required=True)
    parser.add_argument("--topic-prefix", required=True)
    parser.add_argument("--partitions", type=int, required=True)
    bus = parser.add_mutually_exclusive_group(required=True)
    bus.add_argument("--bootstrap", help="Kafka bootstrap servers")
    bus.add_argument("--log-path", type=Path, help="the embedded log's file")
    parser.add_argument("--round-size", type=int, default=0, help="records per publish (0: all at once)")
    parser.add_argument("--pace-s", type=float, default=0.0, help="seconds between rounds' starts")
    args = parser.parse_args(argv)
    log = {"embedded_log_path": args.log_path} if args.log_path else {}
    settings = Settings(kafka_bootstrap=args.bootstrap, **log, topic_prefix=args.topic_prefix,
                        topic_partitions=args.partitions, log_level="warning")
    configure_logging(settings)  # to stderr, at warning: stdout carries `ready`
    acked = asyncio.run(publish(settings, read_records(args.records), args.round_size, args.pace_s))
    args.acks.write_bytes(orjson.dumps(acked))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
