"""The delivery journal alone (issue 16): CPU per delivery of its claim, answer and close.

`python -m tests.bench.journal [--deliveries N] [--lanes 1,4,16] [--database-url URL]` makes N deliveries'
journal writes, `lanes` at once (the delivery stage's lanes: each claims attempt 1 of a transfer, waits 2 ms
for the target, records a 30-entry transaction-response's answer, then closes the row), and prints the
process's CPU time per delivery (every thread: the loop and the ledger's writer) and the journal's
transactions per delivery (group commits share them between lanes). No bus, no HTTP: the journal's part of
what `python -m tests.bench.cores` part 4 counts for the delivery stage.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time

from services.delivery.journal import DELIVERED, AttemptJournal, AttemptKey
from services.tracker.ledger import Ledger

ENTRIES = 30
RESPONSE = {"resourceType": "Bundle", "type": "transaction-response",
            "entry": [{"response": {"status": "201 Created", "location": f"Observation/{i}/_history/1"}}
                      for i in range(ENTRIES)]}
ASSIGNED = {f"urn:uuid:{i:08d}-0000-4000-8000-000000000000": f"Observation/{i}" for i in range(ENTRIES)}


async def cpu_per_delivery(url: str, deliveries: int, lanes: int) -> tuple[float, float]:
    """(CPU ms, journal transactions) per delivery, after a warm-up round of the same size."""
    ledger = Ledger(url)
    await ledger.create_schema()
    journal = AttemptJournal(ledger, "bench")

    async def lane(first: int, last: int) -> None:
        for i in range(first, last, lanes):
            key = AttemptKey(f"tr-{i}", "demo", 0, 1)
            await journal.claim(key, in_flight_s=40)
            await asyncio.sleep(0.002)  # the POST
            await journal.finish(key, DELIVERED, 200, RESPONSE, ASSIGNED)
            await journal.close([key])

    try:
        measured = (0.0, 0.0)
        for first in (0, deliveries):  # warm-up (imports, compiled statements), then measured
            cpu, transactions = time.process_time(), journal.transactions
            await asyncio.gather(*(lane(first + k, first + deliveries) for k in range(lanes)))
            measured = ((time.process_time() - cpu) / deliveries * 1000,
                        (journal.transactions - transactions) / deliveries)
        return measured
    finally:
        await ledger.close()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.journal", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deliveries", type=int, default=500)
    parser.add_argument("--lanes", type=lambda text: [int(n) for n in text.split(",")], default=[1, 4, 16],
                        metavar="1,4,16", help="deliveries at once")
    parser.add_argument("--database-url", default=None, help="default: a new SQLite file per lane count")
    args = parser.parse_args()
    print(f"== the delivery journal alone: {args.deliveries} deliveries (claim, answer, close); load average "
          f"{os.getloadavg()[0]:.1f} ==")
    for lanes in args.lanes:
        with tempfile.TemporaryDirectory(prefix="relais-bench-journal-") as work:
            url = args.database_url or f"sqlite+aiosqlite:///{work}/ledger.db"
            ms, transactions = asyncio.run(cpu_per_delivery(url, args.deliveries, lanes))
        print(f"{lanes:3d} lanes: {ms:.2f} ms CPU per delivery, {transactions:.2f} journal transactions per delivery")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
