"""The tracker alone (issue 16): CPU per Bundle of projecting its events into the ledger and the audit trail.

`python -m tests.bench.tracker [--bundles N] [--polls 1,4,12,50] [--database-url URL]` drives the auditing
tracker stage (`relais tracker` without its bus) over the four events a Bundle makes in `relais run` —
accepted, validated (29 identifier digests), routed, delivered (a 30-entry transaction-response) — shaped like
the events recorded in the pipeline, in polls of each size (`relais run` gives the tracker polls of ~12 events),
and prints the process's CPU time per Bundle (every thread: the loop and the ledger's writer). No Kafka, no bus:
what `python -m tests.bench.cores` part 4 counts for the tracker, minus the embedded log's own work.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta

import orjson

from services.core.envelope import Envelope, Record
from services.core.settings import Settings
from services.core.topics import EVENTS
from services.tracker import audit
from services.tracker.auditchain import AuditingTracker
from services.tracker.ledger import Ledger
from services.tracker.stage import TrackerStage

AUDIT_KEY = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY="  # 32 bytes, base64: a benchmark's key


def bundle_events(n: int) -> list[Record]:
    """The four event records of one Bundle, as the stages emit them."""
    transfer, now = str(uuid.uuid4()), datetime.now(UTC)
    finess = [f"99{n % 10_000_000:07d}"]
    locations = {f"urn:uuid:{uuid.uuid4()}": f"Observation/{uuid.uuid4().hex}/_history/1" for _ in range(30)}
    response = {"resourceType": "Bundle", "type": "transaction-response", "entry": [
        {"response": {"status": "201 Created", "location": loc, "etag": 'W/"1"'}} for loc in locations.values()]}
    details = [
        ("accepted", "ingress", {"targets": ["demo"], "size": 36523, "entries": 30, "finess": finess, "auth": "token",
                                 "sha256": hashlib.sha256(transfer.encode()).hexdigest(), "cert": None}),
        ("validated", "validator", {"warnings": 0, "finess": finess, "identifiers": [
            hashlib.sha256(f"{transfer}{i}".encode()).hexdigest() for i in range(29)]}),
        ("routed", "router", {"targets": ["demo"], "finess": finess}),
        ("delivered", "delivery", {"http_status": 200, "duration_ms": 10.7, "response": response,
                                   "assigned": locations}),
    ]
    records = []
    for step, (kind, stage, detail) in enumerate(details):
        env = Envelope(type=f"fr.relais.event.{kind}", source=f"/relais/{stage}", transfer_id=transfer,
                       data=orjson.dumps({"kind": kind, "stage": stage, **detail}), producer="demo-dui",
                       target="demo" if kind == "delivered" else None, attempt=1 if kind == "delivered" else 0,
                       time=now + timedelta(milliseconds=50 * step))
        records.append(Record(EVENTS, 0, 4 * n + step, transfer.encode(), env))
    return records


def interleaved(numbers: range, lag: int = 3) -> list[Record]:
    """The Bundles' events in the order the tracker meets them: each stage `lag` Bundles behind the one before."""
    timeline = [(n + lag * step, step, record) for n in numbers for step, record in enumerate(bundle_events(n))]
    return [record for _, _, record in sorted(timeline, key=lambda item: item[:2])]


async def cpu_per_bundle(url: str, bundles: int, poll: int) -> float:
    """CPU ms per Bundle of the auditing tracker over `bundles` Bundles' events, `poll` events at a time."""
    ledger = Ledger(url)
    await audit.open_trail(ledger, Settings(database_url=url, audit_key=AUDIT_KEY))
    stage = AuditingTracker(TrackerStage(ledger), ledger, anchor_every_s=3600)
    warm, measured = (interleaved(range(start, start + count)) for start, count in ((0, 50), (50, bundles)))
    try:
        for records, timed in ((warm, False), (measured, True)):
            began = time.process_time()
            for i in range(0, len(records), poll):
                batch = records[i:i + poll]
                await stage.prepare(batch)
                for record in batch:
                    await stage.handle(record)
            if timed:
                return (time.process_time() - began) / bundles * 1000
    finally:
        await ledger.close()
    raise AssertionError("unreachable")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.tracker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", type=int, default=500)
    parser.add_argument("--polls", type=lambda text: [int(n) for n in text.split(",")], default=[1, 4, 12, 50],
                        metavar="1,4,12,50", help="events per poll")
    parser.add_argument("--database-url", default=None, help="default: a new SQLite file per poll size")
    args = parser.parse_args()
    print(f"== the tracker alone: ledger + audit trail, {args.bundles} Bundles x 4 events; load average "
          f"{os.getloadavg()[0]:.1f} ==")
    for poll in args.polls:
        with tempfile.TemporaryDirectory(prefix="relais-bench-tracker-") as work:
            url = args.database_url or f"sqlite+aiosqlite:///{work}/ledger.db"
            ms = asyncio.run(cpu_per_bundle(url, args.bundles, poll))
        print(f"polls of {poll:3d} events: {ms:.2f} ms CPU per Bundle")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
