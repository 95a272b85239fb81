"""Delivery benchmark: throughput to 1 and 10 healthy targets, and what a dead target costs the others.

`python -m tests.bench.delivery [--count N] [--only slow] [--bus kafka|embedded] [--repeat R]` — on Kafka, uses
RELAIS_KAFKA_BOOTSTRAP, else starts a local Kafka. One delivery stage in-process (the real runner),
demo targets as processes, 10-entry TDDUI Bundles. Prints figures; asserts nothing.

What is timed: a Bundle's latency is from the moment it was on the bus (written as the router writes
`deliveries`: a round's records in one Kafka transaction or one embedded log transaction, committed; that is
where delivery's work starts) to its arrival at its target (the demo target's receipt time). The measured
records are published by a process of their own (`tests.bench.publisher`), so the publisher's work is
neither counted nor run on the delivery stage's event loop; only warm-up records (not timed) are published
from this process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

from services.core.envelope import Emit, Envelope
from services.core.logging import configure_logging
from services.core.settings import Settings
from services.core.targets import TargetDirectory
from services.core.topics import DELIVERIES
from tests.bench import kafka_bootstrap
from tests.bench.pipeline import percentile
from tests.bench.publisher import write_records
from tests.fixtures.tddui import make_bundle
from tests.support.delivering import delivering
from tests.support.processes import DemoTarget, free_port


def _emit(target: str, body: bytes, subject: str) -> Emit:
    env = Envelope(type="fr.relais.delivery.requested", source="/relais/bench", transfer_id=str(uuid.uuid4()),
                   data=body, producer="bench", target=target, extra={"subject": subject})
    return Emit(DELIVERIES, f"{target}|{subject}".encode(), env)


async def _count(client: httpx.AsyncClient, url: str) -> int:
    return int((await client.get(f"{url}/_received", params={"summary": 1})).json()["total"])


async def _received(url: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=60) as client:
        return (await client.get(f"{url}/_received")).json()  # type: ignore[no-any-return]


async def _run(settings: Settings, directory: TargetDirectory, emits: list[Emit], watch: dict[str, str],
               work: Path, *, round_size: int = 0, pace_s: float = 0.0,
               warmup: Sequence[tuple[Emit, str]] = ()) -> tuple[float, list[float]]:
    """Have `emits` published (at once, or `round_size` at a time every `pace_s`) by a publisher process of
    their own (`tests.bench.publisher`), wait until every watched target has its share; (elapsed, latencies
    in s: each Bundle's arrival at its target since its round was committed, i.e. since it was on the
    bus, where the delivery stage's work starts). The publisher's own work is neither timed nor run on the
    stage's event loop.

    `warmup` (records, each with its target's base URL) is delivered first and not measured: the group has
    joined, the connections are open, every target has answered once (so the stage knows its pace, as a
    process that has been running does), so the figures are the steady state's, not the start-up's."""
    async with delivering(settings, directory, work) as (bus, stage):
        expected = {t: sum(1 for e in emits if e.envelope.target == t) for t in watch}
        records, acks = work / f"records-{uuid.uuid4().hex[:6]}.jsonl", work / f"acks-{uuid.uuid4().hex[:6]}.json"
        write_records(records, emits)
        where = ["--bootstrap", settings.kafka_bootstrap] if settings.kafka_bootstrap else \
            ["--log-path", str(settings.embedded_log_path)]
        publisher = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.bench.publisher", "--records", str(records), "--acks", str(acks),
            "--topic-prefix", settings.topic_prefix, "--partitions", str(settings.topic_partitions), *where,
            "--round-size", str(round_size), "--pace-s", str(pace_s),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert publisher.stdin is not None and publisher.stdout is not None
        if warmup:
            await bus.publish([emit for emit, _ in warmup])
            for emit, _ in warmup:  # the stage has had each target's answer (a slow target's, 5 s later)
                latency = stage.runtimes[emit.envelope.target or ""].latency
                for _ in range(600):  # at most a minute
                    if latency.summary().calls:
                        break
                    await asyncio.sleep(0.1)
            async with httpx.AsyncClient(timeout=60) as client:
                for _, url in warmup:
                    await client.delete(f"{url}/_received")
        # Made before the clock starts: a new client loads the CA bundle, which stalled the shared loop 40-220 ms.
        poller = httpx.AsyncClient(timeout=60)
        ready = await asyncio.wait_for(publisher.stdout.readline(), 120)
        if ready.strip() != b"ready":
            raise RuntimeError(f"the publisher process did not start (it said {ready!r}); see its error above")
        began = time.perf_counter()
        publisher.stdin.write(b"go\n")
        await publisher.stdin.drain()
        # The bench shares the stage's event loop: it polls counts (`?summary=1`) on one client, never the bodies
        # (decoding every received Bundle five times a second took more CPU than the stage it measures).
        async with poller:
            while True:
                counts = {t: await _count(poller, url) for t, url in watch.items()}
                if all(counts[t] >= expected[t] for t in watch):
                    break
                await asyncio.sleep(0.2)
        elapsed = time.perf_counter() - began
        if await asyncio.wait_for(publisher.wait(), 60):
            raise RuntimeError(f"the publisher process failed (exit {publisher.returncode}); see its error above")
        published: dict[str, float] = orjson.loads(acks.read_bytes())
    lat = []
    for url in watch.values():
        lat += [datetime.fromisoformat(r["time"]).timestamp() - published[r["request_id"].split("/")[0]]
                for r in await _received(url)]
        async with httpx.AsyncClient() as client:
            await client.delete(f"{url}/_received")
    return elapsed, lat


def _settings(bootstrap: str | None, work: Path) -> Settings:
    # No bootstrap: the embedded SQLite log, a fresh file per run.
    return Settings(kafka_bootstrap=bootstrap, embedded_log_path=work / f"log-{uuid.uuid4().hex[:6]}.db",
                    topic_prefix=f"bench{uuid.uuid4().hex[:6]}.", topic_partitions=6,
                    retry_delays_s=[0.5, 1, 2], max_attempts=50, database_url=f"sqlite+aiosqlite:///{work}/l.db",
                    log_level="warning", batch_size=200)


SLOW_PHASE_BUNDLES = 60
REPEAT = 3  # runs of each setting of the slow-target phases (taking turns); medians printed
PACE_S = 0.05  # paced phases: one Bundle per target every 50 ms (20/s to the fast target)


def _ms(seconds: float) -> str:
    """Milliseconds, with a decimal below 10 (a paced delivery takes a few: whole ones would hide a ratio)."""
    return f"{seconds * 1000:.1f}" if seconds < 0.01 else f"{seconds * 1000:.0f}"


async def bench(bootstrap: str | None, work: Path, count: int, only_slow: bool = False,
                repeat: int = REPEAT) -> list[str]:
    body = orjson.dumps(make_bundle(10, seed=1))
    targets = [DemoTarget(work / f"t{i}.log").start() for i in range(11)]
    lines: list[str] = []
    try:
        if only_slow:
            return await _beside_slow_targets(bootstrap, work, body, targets, repeat)
        for n in (1, 10):
            dirs = TargetDirectory.model_validate({"targets": [
                {"id": f"t{i}", "base_url": targets[i].fhir, "max_concurrency": 16} for i in range(n)]})
            emits = [_emit(f"t{i % n}", body, f"p{i}") for i in range(count)]
            elapsed, lat = await _run(_settings(bootstrap, work), dirs, emits,
                                      {f"t{i}": targets[i].base_url for i in range(n)}, work)
            lines.append(f"delivery to {n:2d} healthy target(s): {count} Bundles in {elapsed:.1f}s = "
                         f"{count / elapsed:.0f}/s; latency p50 {percentile(lat, 50) * 1000:.0f} ms, "
                         f"p99 {percentile(lat, 99) * 1000:.0f} ms")
        dead = f"http://127.0.0.1:{free_port()}/fhir"
        for label, with_dead in (("alone", False), ("beside a dead target", True)):
            dirs = TargetDirectory.model_validate({"targets": [
                {"id": "ok", "base_url": targets[0].fhir, "max_concurrency": 16},
                {"id": "dead", "base_url": dead, "timeouts": {"connect_s": 1, "total_s": 5},
                 "breaker": {"failures": 5, "probe_every_s": 2}}]})
            half = count // 2
            emits = [_emit("ok", body, f"p{i}") for i in range(half)]
            if with_dead:
                emits = [e for pair in zip(emits, [_emit("dead", body, f"p{i}") for i in range(half)],
                                           strict=True) for e in pair]
            elapsed, lat = await _run(_settings(bootstrap, work), dirs, emits, {"ok": targets[0].base_url}, work)
            lines.append(f"healthy target {label}: {half} Bundles in {elapsed:.1f}s; latency p50 "
                         f"{statistics.median(lat) * 1000:.0f} ms, p99 {percentile(lat, 99) * 1000:.0f} ms")
        lines += await _beside_slow_targets(bootstrap, work, body, targets, repeat)
    finally:
        for t in targets:
            t.stop()
    return lines


async def _beside_slow_targets(bootstrap: str | None, work: Path, body: bytes,
                               targets: list[DemoTarget], repeat: int = REPEAT) -> list[str]:
    """Issue 15: a fast target's latency alone, beside one target answering in 5 s, beside five such.

    Twice: paced (one Bundle per target every PACE_S, as producers send: the latency of a Bundle) and
    as one burst (everything published at once: mostly the time to drain the burst, which the work
    done for the slow targets' first attempts competes with on a shared machine). A round (a burst: all of
    it) is written in one transaction, as a stage writes its outputs, and each record timed from its commit:
    a read_committed consumer sees none of it before. (Published one call per record, as the ingress does,
    360 records took the publisher half a second on Kafka, so the "burst" reached the stage as a stream.)
    Each setting runs `repeat` times, the settings taking turns (alone, beside 1, beside 5, alone, ...), so
    a change in the machine's load meets every setting alike; the figures are the medians of the runs' p50
    and p99.

    A control runs beside them: the fast target beside 5 *quick* targets, the same records on the bus as
    beside 5 slow ones. What beside 5 slow costs more than the control is what their slowness costs; what the
    control costs over alone is the bus and the stage carrying 6x the records.
    """
    slow, quick = targets[6:11], targets[1:6]
    for t in slow:
        t.fault(delay_s=5, count=-1)
    neighbours: dict[str, list[DemoTarget]] = {"alone": [], "beside 1 target(s) answering in 5 s": slow[:1],
                "beside 5 target(s) answering in 5 s": slow, "control: beside 5 quick targets": quick}
    lines = []
    for mode, pace in (("paced", PACE_S), ("burst", 0.0)):
        runs: dict[str, list[tuple[float, float]]] = {label: [] for label in neighbours}
        for _ in range(repeat):
            for label, others in neighbours.items():
                runs[label].append(await _fast_latency(bootstrap, work, body, targets[0], others, pace))
        alone = statistics.median(f[0] for f in runs["alone"])
        for label, figures in runs.items():
            p50, p99 = (statistics.median(f[i] for f in figures) for i in range(2))
            each = ", ".join(_ms(f[0]) for f in figures)
            goal = " (goal <= 1.1)" if label.startswith("beside") else ""
            lines.append(f"{mode}: fast target {label}: p50 {_ms(p50)} ms (runs: {each}), p99 {_ms(p99)} ms"
                         + (f"; p50 ratio to alone {p50 / alone:.2f}{goal}" if neighbours[label] else ""))
    for t in slow:
        httpx.delete(f"{t.base_url}/_faults", timeout=10)
    return lines


async def _fast_latency(bootstrap: str | None, work: Path, body: bytes, fast: DemoTarget,
                        others: list[DemoTarget], pace: float) -> tuple[float, float]:
    """One run: SLOW_PHASE_BUNDLES to the fast target interleaved with as many to each of `others` (slow or
    not); its (p50, p99)."""
    dirs = TargetDirectory.model_validate({"targets": [
        {"id": "fast", "base_url": fast.fhir},
        *({"id": f"other{i}", "base_url": t.fhir, "timeouts": {"total_s": 30}} for i, t in enumerate(others))]})
    emits = []
    for i in range(SLOW_PHASE_BUNDLES):  # interleaved, one person per Bundle, as the issue measured
        emits.append(_emit("fast", body, f"f{i}"))
        emits += [_emit(f"other{k}", body, f"s{k}-{i}") for k in range(len(others))]
    warmup = [(_emit("fast", body, "warmup"), fast.base_url),
              *((_emit(f"other{i}", body, "warmup"), t.base_url) for i, t in enumerate(others))]
    _, lat = await _run(_settings(bootstrap, work), dirs, emits, {"fast": fast.base_url}, work,
                        round_size=(1 + len(others)) if pace else 0, pace_s=pace, warmup=warmup)
    return statistics.median(lat), percentile(lat, 99)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.delivery", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000, help="deliveries per run")
    parser.add_argument("--only", choices=["slow"], help="slow: only the fast target beside 0, 1 and 5 slow ones")
    parser.add_argument("--bus", choices=["kafka", "embedded"], default="kafka")
    parser.add_argument("--repeat", type=int, default=REPEAT,
                        help="runs of each slow-target setting, taking turns (medians are printed)")
    args = parser.parse_args()
    # The runs' level (warning): unconfigured, structlog rendered every record's info line on the shared loop.
    configure_logging(_settings(None, Path(tempfile.gettempdir())))
    with contextlib.ExitStack() as stack:
        bootstrap = stack.enter_context(kafka_bootstrap()) if args.bus == "kafka" else None
        work = stack.enter_context(tempfile.TemporaryDirectory(prefix="relais-bench-delivery-"))
        lines = asyncio.run(bench(bootstrap, Path(work), args.count, only_slow=args.only == "slow",
                                  repeat=args.repeat))
    print("\n".join(["", f"== Relais delivery benchmark (one delivery process, demo targets, {args.bus} bus) ==",
                     *lines]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
