"""The embedded log's read of another process's fresh commit, in each layout of its records table.

`python -m tests.bench.logread [--rounds N] [--size BYTES]`: a writer commits a round of records (6 partitions,
one record each, `--size` bytes), then a reader on connections of its own reads them from its positions as a
member's poll does (`EmbeddedLog.records` on its reader thread; its page cache is cold after the other
connection's commit). Printed: the read's p50 and p99, and the round's commit, for today's layout (a rowid
table, records appended at its end) and the one of logs written before 2026-12 (a WITHOUT ROWID table
clustered by position), then the same with 1 partition. No bus, no stage: the log file alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from services.core.embedded_log import EmbeddedLog, Row, partition_for
from tests.bench.pipeline import percentile
from tests.support.earlier_log import EARLIER_RECORDS

TOPIC, PARTITIONS = "bench.deliveries", 6


def _earlier_layout(conn: sqlite3.Connection) -> None:
    """Lay the (empty) records table out as logs written before 2026-12 had it."""
    conn.execute("DROP TABLE records")
    conn.execute(EARLIER_RECORDS)


async def reads(work: Path, *, earlier: bool, rounds: int, size: int,
                partitions: int) -> tuple[list[float], list[float]]:
    """(read seconds, commit seconds) per round."""
    path = work / f"log-{'earlier' if earlier else 'today'}-{partitions}.db"
    writer, reader = EmbeddedLog(path), EmbeddedLog(path)  # two processes' connections, as a stage and its producer
    try:
        await writer.write(writer.ensure_topics, [(TOPIC, PARTITIONS)])
        if earlier:
            await writer.write(_earlier_layout)
        positions = {(TOPIC, p): 0 for p in range(PARTITIONS)}
        keys = _keys_by_partition()
        value = os.urandom(size)
        read_s, commit_s = [], []
        for _ in range(rounds):
            rows: list[Row] = [(TOPIC, keys[p], value, '[["ce_id", "x"]]') for p in range(partitions)]
            began = time.perf_counter()
            await writer.write(writer.append, rows)
            commit_s.append(time.perf_counter() - began)
            began = time.perf_counter()
            _, got = await reader.read(reader.records, positions, 500)
            read_s.append(time.perf_counter() - began)
            assert len(got) == partitions, got
            for topic, p, offset, *_ in got:
                positions[(topic, p)] = offset + 1
        return read_s, commit_s
    finally:
        writer.close()
        reader.close()


def _keys_by_partition() -> dict[int, bytes]:
    """A key landing in each partition (`partition_for`: crc32 of the key)."""
    keys: dict[int, bytes] = {}
    n = 0
    while len(keys) < PARTITIONS:
        key = f"target|p{n}".encode()
        keys.setdefault(partition_for(key, PARTITIONS, 0), key)
        n += 1
    return keys


async def bench(rounds: int, size: int) -> list[str]:
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for partitions in (PARTITIONS, 1):
            for earlier in (False, True):
                read_s, commit_s = await reads(Path(tmp), earlier=earlier, rounds=rounds, size=size,
                                               partitions=partitions)
                layout = "before 2026-12 (WITHOUT ROWID)" if earlier else "today (rowid, appended)"
                lines.append(f"{partitions} x {size // 1000} kB from {partitions} partition(s), layout {layout}: "
                             f"read p50 {statistics.median(read_s) * 1e6:.0f} us, p99 "
                             f"{percentile(read_s, 99) * 1e6:.0f} us; commit p50 "
                             f"{statistics.median(commit_s) * 1e3:.2f} ms")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.logread", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=500, help="rounds written and read, per layout")
    parser.add_argument("--size", type=int, default=10_000, help="bytes per record (the official example: ~10 kB)")
    args = parser.parse_args()
    for line in asyncio.run(bench(args.rounds, args.size)):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
