"""Benchmark: ingress acceptance rate and end-to-end throughput, on a real Kafka, as processes.

Prints figures; asserts nothing. One ingress process, workers as separate processes, the demo
target as the ESSMS, 30-entry TDDUI Bundles, acks=all.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.fixtures.tddui import make_bundle
from tests.support.processes import Broker, DemoTarget
from tests.support.producers import TOKEN_A, write_producers, write_targets

AUTH = {"Authorization": f"Bearer {TOKEN_A}", "Content-Type": "application/fhir+json",
        "X-Relais-Target": "essms-a"}


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(label: str, count: int, elapsed: float, latencies_ms: list[float]) -> str:
    return (f"{label}: {count} in {elapsed:.1f}s = {count / elapsed:.0f} Bundles/s; "
            f"p50 {percentile(latencies_ms, 50):.1f} ms, p99 {percentile(latencies_ms, 99):.1f} ms")


async def post_many(url: str, bodies: list[bytes],
                    concurrency: int) -> tuple[float, list[float], list[tuple[str, float]]]:
    """POST every body with `concurrency` clients; returns elapsed, latencies (ms), (transfer id, sent at)."""
    latencies: list[float] = []
    sent: list[tuple[str, float]] = []
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        async def worker() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                started_wall, started = time.time(), time.perf_counter()
                response = await client.post(url, content=body, headers=AUTH)
                latencies.append((time.perf_counter() - started) * 1000)
                if response.status_code != 202:
                    raise RuntimeError(f"ingress answered {response.status_code}: {response.text[:300]}")
                sent.append((response.headers["X-Relais-Transfer-Id"], started_wall))

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - began, latencies, sent


async def run(bootstrap: str, workdir: Path, *, accept_count: int, e2e_count: int, concurrency: int) -> list[str]:
    target = DemoTarget(workdir / "target.log").start()
    env = {
        "RELAIS_KAFKA_BOOTSTRAP": bootstrap,
        "RELAIS_TOPIC_PREFIX": f"bench{uuid.uuid4().hex[:6]}.",
        "RELAIS_DATABASE_URL": f"sqlite+aiosqlite:///{workdir}/ledger.db",
        "RELAIS_PRODUCERS_FILE": str(write_producers(workdir / "producers.yaml")),
        "RELAIS_TARGETS_FILE": str(write_targets(workdir / "targets.yaml", {"essms-a": target.fhir})),
        "RELAIS_LOG_LEVEL": "warning",
    }
    broker = Broker(workdir, env)
    lines = []
    try:
        # 1. Ingress alone: workers stopped, so the figure is the door's, not the pipeline's.
        broker.start()
        for name in ("validator", "router", "delivery", "tracker"):
            broker.kill(name)
        bodies = [orjson.dumps(make_bundle(30, seed=i)) for i in range(accept_count)]
        await post_many(f"{broker.url}/fhir", bodies[:100], concurrency)  # warm-up
        elapsed, latencies, _ = await post_many(f"{broker.url}/fhir", bodies, concurrency)
        lines.append(summary(f"ingress acceptance ({concurrency} clients, 30 entries, acks=all)",
                             len(bodies), elapsed, latencies))
        # 2. The whole pipeline: drain the backlog first, then time fresh Bundles to the target.
        for name in ("validator", "router", "delivery", "tracker"):
            broker.restart(name)
        backlog = accept_count + 100
        await wait_received(target, backlog, timeout_s=600)
        httpx.delete(f"{target.base_url}/_received", timeout=30)
        bodies = [orjson.dumps(make_bundle(30, seed=10_000 + i)) for i in range(e2e_count)]
        began = time.perf_counter()
        _, _, sent = await post_many(f"{broker.url}/fhir", bodies, concurrency)
        received = await wait_received(target, e2e_count, timeout_s=600)
        elapsed = time.perf_counter() - began
        arrival = {r["request_id"].split("/")[0]: datetime.fromisoformat(r["time"]).timestamp() for r in received}
        e2e_ms = [(arrival[t] - at) * 1000 for t, at in sent if t in arrival]
        lines.append(summary("end to end POST → delivered at target", len(e2e_ms), elapsed, e2e_ms))
    finally:
        broker.stop()
        target.stop()
    return lines


async def wait_received(target: DemoTarget, count: int, timeout_s: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    last = -1
    while time.monotonic() < deadline:
        total = int(target.summary()["total"])  # type: ignore[arg-type]
        if total >= count:
            return [r for r in target.received() if r.get("status") == 200]
        if total != last:
            print(f"  ... target has {total}/{count}", flush=True)
            last = total
        await asyncio.sleep(0.5)
    raise RuntimeError(f"target received fewer than {count} in {timeout_s}s")


def median(values: list[float]) -> float:
    return statistics.median(values)
