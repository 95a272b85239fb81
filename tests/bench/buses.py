"""Benchmark: the embedded SQLite bus beside Kafka, in one run — raw records/s and end-to-end Bundles/s.

Raw: publish N records (1 kB, keyed), then one stage-like consumer reads them and completes them in
batches (outputs + offsets in one transaction), as the runner does. End to end: `relais run` (every
stage in one process) on each bus, 30-entry Bundles posted by 16 clients, timed to the demo target.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson

from services.core.bus import Bus, Partition
from services.core.buses import make_bus
from services.core.envelope import Emit
from services.core.settings import Settings
from services.core.topics import RECEIVED, VALIDATED
from tests.bench.pipeline import percentile, post_many
from tests.fixtures.tddui import make_bundle
from tests.support.kafka import received
from tests.support.processes import REPO, DemoTarget, free_port, readyz, wait_until
from tests.support.producers import write_producers, write_targets


async def raw(bus: Bus, count: int) -> tuple[float, float]:
    """(publish records/s, consume-and-complete records/s) for `count` 1 kB records."""
    await bus.start()
    try:
        emits = [received(data=b"x" * 1024) for _ in range(count)]
        started = time.perf_counter()
        for i in range(0, count, 100):  # ingress-like: many small acknowledged writes
            await bus.publish(emits[i:i + 100])
        publish_rate = count / (time.perf_counter() - started)
        sub = bus.subscribe(f"bench-{uuid.uuid4().hex[:6]}", [RECEIVED])
        await sub.start()
        done = 0
        started = time.perf_counter()
        while done < count:
            records = await sub.poll(500, 1.0)
            offsets: dict[Partition, int] = {}
            for r in records:
                offsets[Partition(r.topic, r.partition)] = r.offset + 1
            await sub.complete([Emit(VALIDATED, r.key, r.envelope) for r in records], offsets)
            done += len(records)
        consume_rate = count / (time.perf_counter() - started)
        await sub.stop()
        return publish_rate, consume_rate
    finally:
        await bus.stop()


async def end_to_end(env: dict[str, str], work: Path, count: int) -> str:
    """Bundles/s and p50/p99 POST→target latency for `relais run` with the given environment."""
    target = DemoTarget(work / "target.log").start()
    port = free_port()
    full_env = {**{k: v for k, v in os.environ.items() if not k.startswith("RELAIS_")}, **env,
                "RELAIS_HTTP_PORT": str(port), "RELAIS_LOG_LEVEL": "warning",
                "RELAIS_DATABASE_URL": f"sqlite+aiosqlite:///{work}/ledger.db",
                "RELAIS_PRODUCERS_FILE": str(write_producers(work / "producers.yaml")),
                "RELAIS_TARGETS_FILE": str(write_targets(work / "targets.yaml", {"essms-a": target.fhir}))}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "run"], env=full_env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=(work / "run.log").open("wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(readyz(url), alive=lambda: proc.poll() is None, timeout_s=60, interval_s=0.1,
                   explain=lambda: (work / "run.log").read_text()[-3000:], what="relais run to be ready")
        bodies = [orjson.dumps(make_bundle(30, seed=i)) for i in range(count)]
        began = time.perf_counter()
        _, _, sent = await post_many(f"{url}/fhir", bodies, 16)
        while int(target.summary()["total"]) < count:  # type: ignore[arg-type]  # noqa: ASYNC110 - polls another process
            await asyncio.sleep(0.2)
        elapsed = time.perf_counter() - began
        arrival = {r["request_id"].split("/")[0]: r["time"] for r in target.received()}
        from datetime import datetime

        lat = [(datetime.fromisoformat(arrival[t]).timestamp() - at) * 1000 for t, at in sent if t in arrival]
        return (f"{count / elapsed:.0f} Bundles/s; POST→target p50 {percentile(lat, 50):.0f} ms, "
                f"p99 {percentile(lat, 99):.0f} ms")
    finally:
        proc.terminate()
        proc.wait(60)
        target.stop()


def run(bootstrap: str, *, records: int = 5000, bundles: int = 300) -> list[str]:
    lines = []
    with tempfile.TemporaryDirectory(prefix="relais-bench-buses-") as tmp:
        work = Path(tmp)
        for name, settings in (
            ("embedded", Settings(kafka_bootstrap=None, embedded_log_path=work / "raw.db", topic_partitions=6)),
            ("kafka", Settings(kafka_bootstrap=bootstrap, topic_prefix=f"bb{uuid.uuid4().hex[:6]}.",
                               topic_partitions=6)),
        ):
            pub, con = asyncio.run(raw(make_bus(settings), records))
            lines.append(f"{name:8} raw: publish {pub:,.0f} records/s (acknowledged batches of 100), "
                         f"consume+complete {con:,.0f} records/s")
        for name, env in (("embedded", {"RELAIS_EMBEDDED_LOG_PATH": str(work / "e2e.db")}),
                          ("kafka", {"RELAIS_KAFKA_BOOTSTRAP": bootstrap,
                                     "RELAIS_TOPIC_PREFIX": f"be{uuid.uuid4().hex[:6]}."})):
            sub = work / name
            sub.mkdir()
            lines.append(f"{name:8} relais run, end to end: {asyncio.run(end_to_end(env, sub, bundles))}")
    return lines
