"""One delivery process handling one delivery record, for the journal's liveness tests.

A real DeliveryStage on a real SQLite ledger POSTs the record's Bundle to a real target, prints what it
emitted (`EMITTED <types>`) and exits. The test can SIGKILL it while its POST is in flight.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import orjson

from services.core.blobstore import LocalBlobStore
from services.core.envelope import Envelope, Record
from services.core.settings import Settings
from services.core.targets import Target, TargetDirectory
from services.core.topics import DELIVERIES
from services.delivery.journal import AttemptJournal
from services.delivery.stage import DeliveryStage
from services.tracker.ledger import Ledger
from tests.fixtures.tddui import make_bundle


def delivery_record(seed: int) -> Envelope:
    """The delivery record of transfer `tr-<seed>` to target `t` (the same in every process)."""
    return Envelope(type="fr.relais.delivery", source="/relais/router", transfer_id=f"tr-{seed}",
                    data=orjson.dumps(make_bundle(3, seed=seed)), producer="p", target="t")


def make_stage(database_url: str, base_url: str, blobs: Path, process: str) -> tuple[DeliveryStage, Ledger]:
    ledger = Ledger(database_url)
    settings = Settings(database_url=database_url, retry_delays_s=[0.2, 0.5], max_attempts=4, auth_disabled=True,
                        log_format="console")
    target = Target(id="t", base_url=base_url, ambiguous="probe")
    return DeliveryStage(settings, TargetDirectory(targets=[target]), LocalBlobStore(blobs),
                         AttemptJournal(ledger, process)), ledger


async def main(args: argparse.Namespace) -> None:
    stage, ledger = make_stage(args.database_url, args.base_url, Path(args.blobs), args.process)
    await ledger.create_schema()
    try:
        emits = await stage.handle(Record(DELIVERIES, 0, 0, b"t|p", delivery_record(args.seed)))
        print("EMITTED", " ".join(e.envelope.type for e in emits), flush=True)
    finally:
        await stage.aclose()
        await ledger.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--blobs", required=True)
    parser.add_argument("--process", required=True)
    parser.add_argument("--seed", type=int, required=True)
    asyncio.run(main(parser.parse_args()))
