"""Benchmark of issue 16, "every core": `relais run` (defaults, embedded bus) beside one core's parse floor.

`python -m tests.bench.cores [--bundles N] [--rate R] [--seconds S] [--workers 1,2] [--validators 1,2]` prints,
from one run on this machine:

1. the floor: one core parsing the 30-entry Bundle with fhir.resources (R4B `Bundle.model_validate`);
2. end-to-end Bundles/s of `relais run` with no flags (POST -> applied at the demo target), 16 clients
   (vegeta in a closed loop: each of 16 workers posts its next Bundle once answered),
   and its ratio to the floor (goal >= 1.0): the median of `--runs` runs, each on a fresh broker (one run's
   figure moves 20% with the machine's other tenants); with `--workers 1,2`, once per worker count
   (RELAIS_WORKERS), so the default can be chosen on evidence;
3. a transfer's transit: from its 202 to its arrival at the target, one Bundle every 200 ms (nothing queues);
4. the 202's p50/p99 at R Bundles/s offered open-loop by `vegeta` while the pipeline works through a
   backlog (goal p99 < 100 ms); vegeta is installed with `go install` into .cache/bin when missing;
5. CPU seconds per Bundle by stage: the same pipeline with one `relais <stage>` process per stage on
   the embedded bus, each process's CPU time divided by the Bundles it carried;
6. with `--kafka`: one process per stage plus one extra validator on Kafka, its ratio to the floor (goal >= 0.7).
   A broker's JVM compiles its hot paths over its first thousands of requests (a production broker has long
   done so): the first run on the fresh local broker is printed as "cold", the next one is the figure.

`--validators 1,2` measures only how `relais validator` replicas scale on Kafka's partitions: the ingress posts
a backlog of `--bundles` Bundles, then 1 (then 2) validator processes take it; Bundles/s from their first
commit to the group's lag of 0, each count `--runs` times, taking turns.

Prints figures; asserts nothing. The load generator shares the machine's cores with the broker.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

from services.core.kafka import KafkaBus
from services.core.settings import Settings
from services.core.topics import RECEIVED
from tests.bench.pipeline import percentile
from tests.fixtures.tddui import make_bundle
from tests.support.processes import REPO, free_port, readyz, wait_until
from tests.support.producers import write_targets

VEGETA = "github.com/tsenart/vegeta/v12@v12.13.0"
HEADERS = {"Authorization": "Bearer demo-token", "Content-Type": "application/fhir+json", "X-Relais-Target": "demo"}
STAGES = ("ingress", "validator", "router", "delivery", "tracker")
TRANSIT_BUNDLES = 50


def floor(seconds: float = 5.0) -> float:
    """Bundles/s one core parses the 30-entry Bundle into fhir.resources R4B models."""
    from fhir.resources.R4B.bundle import Bundle

    raw = orjson.dumps(make_bundle(30, seed=1))
    for _ in range(20):
        Bundle.model_validate(orjson.loads(raw))
    n, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        Bundle.model_validate(orjson.loads(raw))
        n += 1
    return n / (time.perf_counter() - began)


def vegeta() -> str:
    """The vegeta binary: on PATH, in .cache/bin, or installed there now with `go install`."""
    found = shutil.which("vegeta") or (REPO / ".cache/bin/vegeta")
    if Path(found).exists():
        return str(found)
    print(f"bench: installing vegeta ({VEGETA}) into .cache/bin ...", file=sys.stderr)
    subprocess.run(["go", "install", VEGETA], check=True, env={**os.environ, "GOBIN": str(REPO / ".cache/bin")})
    return str(REPO / ".cache/bin/vegeta")


class Broker:
    """`relais run` (no flags), or one `relais <stage>` process per stage, on a fresh embedded log."""

    def __init__(self, work: Path, per_stage: bool, kafka: str | None = None, workers: int | None = None,
                 stages: Sequence[str] | None = None) -> None:
        self.work, self.per_stage, self.kafka = work, per_stage, kafka
        self.stages = stages  # per stage: only these (default: every stage, plus a second validator on Kafka)
        self.target_port, self.http_port = free_port(), free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RELAIS_")} | {
            "RELAIS_HTTP_PORT": str(self.http_port), "RELAIS_LOG_LEVEL": "warning",
            "RELAIS_DATABASE_URL": f"sqlite+aiosqlite:///{work}/ledger.db",
            "RELAIS_EMBEDDED_LOG_PATH": str(work / "log.db"), "RELAIS_BLOB_DIR": str(work / "blobs"),
            "RELAIS_PRODUCERS_FILE": str(REPO / "deploy/dev/producers.yaml"),
            "RELAIS_TARGETS_FILE": str(write_targets(work / "t.yaml", {"demo": f"{self.target}/fhir"})),
        }
        if workers is not None:
            self.env["RELAIS_WORKERS"] = str(workers)
        if kafka:  # one process per stage plus one extra validator, on Kafka
            self.env |= {"RELAIS_KAFKA_BOOTSTRAP": kafka, "RELAIS_TOPIC_PREFIX": f"bench{free_port()}."}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def target(self) -> str:
        return f"http://127.0.0.1:{self.target_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> Broker:
        self.log = (self.work / "broker.log").open("ab")
        self.procs["target"] = subprocess.Popen([sys.executable, "-m", "devtools.demotarget", "--port",
                                                 str(self.target_port)], cwd=REPO, stderr=subprocess.DEVNULL)
        default = [*STAGES, *(["validator-2"] if self.kafka else [])]
        self.launch(*((self.stages or default) if self.per_stage else ["run"]))
        wait_until(readyz(self.url), alive=lambda: all(p.poll() is None for p in self.procs.values()),
                   explain=lambda: (self.work / "broker.log").read_text()[-2000:], timeout_s=120, what="readiness")
        time.sleep(3)  # the workers join their groups
        return self

    def launch(self, *names: str) -> None:
        """Start `relais <stage>` (or `relais run`) processes; `validator-2` is a second validator replica."""
        for name in names:
            argv = [sys.executable, "-m", "services.cli", name.split("-")[0]]
            env = {**self.env, "RELAIS_INSTANCE_ID": f"bench-{name}"}
            self.procs[name] = subprocess.Popen(argv, env=env, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()

    def applied(self) -> int:
        return int(httpx.get(f"{self.target}/_received", params={"summary": 1}, timeout=30).json()["applied"])

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) of each broker process and its children, by name."""
        ticks = os.sysconf("SC_CLK_TCK")
        out = {}
        for name, proc in self.procs.items():
            if name == "target":
                continue
            pids = [proc.pid, *_children(proc.pid)]
            out[name] = sum(_cpu(pid, ticks) for pid in pids)
        return out


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _cpu(pid: int, ticks: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime


async def post_all(url: str, bodies: list[bytes], concurrency: int = 16) -> None:
    queue = list(reversed(bodies))
    async with httpx.AsyncClient(timeout=60) as client:
        async def worker() -> None:
            while queue:
                body = queue.pop()
                response = await client.post(f"{url}/fhir", content=body, headers=HEADERS)
                if response.status_code != 202:
                    raise RuntimeError(f"ingress answered {response.status_code}: {response.text[:200]}")
        await asyncio.gather(*(worker() for _ in range(concurrency)))


def wait_applied(broker: Broker, count: int, timeout_s: float = 900) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if broker.applied() >= count:
            return time.perf_counter()
        time.sleep(0.25)
    raise RuntimeError(f"fewer than {count} Bundles reached the target in {timeout_s}s")


def write_targets_file(path: Path, url: str, bodies: list[bytes]) -> Path:
    """vegeta's JSON targets: one POST /fhir per body, in order."""
    with path.open("wb") as out:
        for body in bodies:
            out.write(orjson.dumps({"method": "POST", "url": f"{url}/fhir",
                                    "header": {k: [v] for k, v in HEADERS.items()},
                                    "body": base64.b64encode(body).decode()}) + b"\n")
    return path


def post_closed_loop(targets: Path, count: int, clients: int = 16) -> None:
    """POST every target once with vegeta, `clients` requests at a time, each sent as soon as one is answered
    (a closed loop: -rate=0). Not a Python client: on the same two cores httpx took ~2 ms of CPU per Bundle,
    counted against the broker (ratio 0.96-0.97 with it, 1.05-1.06 with vegeta, same runs)."""
    binary = vegeta()
    attack = subprocess.run([binary, "attack", "-lazy", "-format=json", f"-targets={targets}", "-rate=0",
                             f"-workers={clients}", f"-max-workers={clients}", "-timeout=60s"],
                            capture_output=True, check=True)
    report = orjson.loads(subprocess.run([binary, "report", "-type=json"], input=attack.stdout,
                                         capture_output=True, check=True).stdout)
    codes = report.get("status_codes", {})
    # -lazy: the workers that find the file at its end each count one "no targets to attack" (code 0).
    stray = set(report.get("errors") or []) - {"no targets to attack"}
    if codes.get("202") != count or stray:
        raise RuntimeError(f"the ingress did not accept every Bundle: {codes}, {stray}")


def end_to_end(work: Path, count: int, workers: int | None = None) -> tuple[float, dict[str, float]]:
    """Bundles/s from the first POST to the last Bundle applied at the target, and CPU s by process."""
    broker = Broker(work, per_stage=False, workers=workers).start()
    try:
        asyncio.run(post_all(broker.url, [orjson.dumps(make_bundle(30, seed=50_000 + i)) for i in range(30)]))
        wait_applied(broker, 30)  # warm-up: imports, first fhir.resources models, connections
        targets = write_targets_file(work / "e2e.jsonl", broker.url,
                                     [orjson.dumps(make_bundle(30, seed=i)) for i in range(count)])
        cpu0 = broker.cpu_seconds()
        began = time.perf_counter()
        post_closed_loop(targets, count)
        ended = wait_applied(broker, count + 30)
        cpu = {k: v - cpu0.get(k, 0) for k, v in broker.cpu_seconds().items()}
        return count / (ended - began), cpu
    finally:
        broker.stop()


def transit(work: Path, count: int, every_s: float = 0.2) -> list[float]:
    """Seconds from each 202 to the Bundle's arrival at the target, one Bundle at a time every `every_s` through
    `relais run` (defaults): the time a transfer spends in the pipeline's four hops when nothing queues."""
    broker = Broker(work, per_stage=False).start()
    try:
        asyncio.run(post_all(broker.url, [orjson.dumps(make_bundle(30, seed=70_000 + i)) for i in range(10)]))
        wait_applied(broker, 10)  # warm-up
        httpx.delete(f"{broker.target}/_received", timeout=30)
        answered: dict[str, float] = {}
        with httpx.Client(timeout=60) as client:
            for i in range(count):
                response = client.post(f"{broker.url}/fhir", content=orjson.dumps(make_bundle(30, seed=80_000 + i)),
                                       headers=HEADERS)
                answered[response.headers["X-Relais-Transfer-Id"]] = time.time()
                time.sleep(every_s)
        wait_applied(broker, count)
        received = httpx.get(f"{broker.target}/_received", timeout=30).json()
        return [datetime.fromisoformat(r["time"]).timestamp() - answered[r["request_id"].split("/")[0]]
                for r in received if r["request_id"].split("/")[0] in answered]
    finally:
        broker.stop()


def latency_under_load(work: Path, rate: int, seconds: int, backlog: int) -> dict[str, Any]:
    """vegeta's view of the 202 at `rate`/s, open loop, while the workers chew on `backlog` Bundles."""
    binary = vegeta()
    broker = Broker(work, per_stage=False).start()
    try:
        targets = write_targets_file(work / "targets.jsonl", broker.url,
                                     [orjson.dumps(make_bundle(30, seed=200_000 + i)) for i in range(rate * seconds)])
        asyncio.run(post_all(broker.url, [orjson.dumps(make_bundle(30, seed=100_000 + i)) for i in range(backlog)]))
        attack = subprocess.run([binary, "attack", "-format=json", f"-targets={targets}", f"-rate={rate}/s",
                                 f"-duration={seconds}s", "-timeout=30s"], capture_output=True, check=True)
        report = subprocess.run([binary, "report", "-type=json"], input=attack.stdout, capture_output=True, check=True)
        busy = broker.applied() < backlog + rate * seconds  # still working while measured
        return {**orjson.loads(report.stdout), "busy": busy}
    finally:
        broker.stop()


def per_stage_cpu(work: Path, count: int, kafka: str | None = None) -> tuple[float, dict[str, float]]:
    """Bundles/s end to end and CPU seconds per Bundle of each stage, one `relais <stage>` process each."""
    broker = Broker(work, per_stage=True, kafka=kafka).start()
    try:
        asyncio.run(post_all(broker.url, [orjson.dumps(make_bundle(30, seed=60_000 + i)) for i in range(20)]))
        wait_applied(broker, 20)
        targets = write_targets_file(work / "stages.jsonl", broker.url,
                                     [orjson.dumps(make_bundle(30, seed=70_000 + i)) for i in range(count)])
        cpu0 = broker.cpu_seconds()
        began = time.perf_counter()
        post_closed_loop(targets, count)
        ended = wait_applied(broker, count + 20)
        time.sleep(2)  # the tracker projects the last events
        return count / (ended - began), {k: (v - cpu0.get(k, 0)) / count for k, v in broker.cpu_seconds().items()}
    finally:
        broker.stop()


def validator_rate(work: Path, count: int, kafka: str, replicas: int) -> float:
    """Bundles/s that `replicas` `relais validator` processes on Kafka take from a backlog of `count` Bundles in
    transfers.received (the ingress posted them first), from their first commit to the group's lag reaching 0."""
    broker = Broker(work, per_stage=True, kafka=kafka, stages=["ingress"]).start()
    try:
        targets = write_targets_file(work / "backlog.jsonl", broker.url,
                                     [orjson.dumps(make_bundle(30, seed=80_000 + i)) for i in range(count)])
        post_closed_loop(targets, count)
        broker.launch("validator", *(f"validator-{n}" for n in range(2, replicas + 1)))
        return asyncio.run(_drained(KafkaBus(Settings(kafka_bootstrap=kafka,
                                                      topic_prefix=broker.env["RELAIS_TOPIC_PREFIX"]))))
    finally:
        broker.stop()


async def _drained(bus: KafkaBus, timeout_s: float = 600) -> float:
    """Bundles/s the validator group takes from transfers.received: from its first progress (its members have
    joined and committed once) to a lag of 0."""
    started: tuple[float, int] | None = None  # the first read, then the first read that showed progress
    progressed = False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = time.perf_counter()  # before the read: the offsets are read while it runs (about a second)
        lag = sum((await bus.lag("validator", [RECEIVED])).values())
        if started is None or (not progressed and lag < started[1]):
            progressed = started is not None
            started = (now, lag)
        if lag == 0:
            if not progressed:
                raise RuntimeError("the backlog was gone before its first read: post more Bundles (--bundles)")
            return started[1] / (now - started[0])
        await asyncio.sleep(0.5)
    raise RuntimeError(f"the validators did not drain transfers.received in {timeout_s:g}s")


def scaling(bundles: int, replicas: list[int], runs: int) -> list[str]:
    """Kafka: validator replicas taking a backlog, each count `runs` times, the counts taking turns."""
    from tests.bench import kafka_bootstrap

    figures: dict[int, list[float]] = {n: [] for n in replicas}
    with tempfile.TemporaryDirectory(prefix="relais-bench-validators-") as tmp, kafka_bootstrap() as bootstrap:
        (Path(tmp) / "warm-up").mkdir()
        per_stage_cpu(Path(tmp) / "warm-up", 100, kafka=bootstrap)  # the broker's JVM warms up (not measured)
        for r in range(runs):
            for n in replicas:
                (Path(tmp) / f"v{n}-{r}").mkdir()
                figures[n].append(validator_rate(Path(tmp) / f"v{n}-{r}", bundles, bootstrap, n))
                print(f"bench: {n} validator(s), run {r + 1}: {figures[n][-1]:.1f} Bundles/s", file=sys.stderr)
    lines = [f"machine: {platform.machine()}, {os.cpu_count()} cores; Kafka on the same cores; load average now "
             f"{os.getloadavg()[0]:.1f}"]
    one = statistics.median_low(figures[replicas[0]])
    for n, rates in figures.items():
        median = statistics.median_low(rates)
        lines.append(f"{n} `relais validator` process(es) on Kafka, 6 partitions, a backlog of {bundles} 30-entry "
                     f"Bundles: {median:.1f} Bundles/s (runs: {', '.join(f'{x:.1f}' for x in rates)}); "
                     f"x{median / one:.2f} of {replicas[0]}")
    return lines


def run(bundles: int, rate: int, seconds: int, kafka: bool = False, workers: list[int] | None = None,
        runs: int = 3) -> list[str]:
    cores = os.cpu_count()
    lines = [f"machine: {platform.machine()}, {cores} cores, {platform.system()} {platform.release()}, "
             f"Python {platform.python_version()}; load average before the run {os.getloadavg()[0]:.1f}"]
    base = floor()
    lines.append(f"floor: fhir.resources R4B Bundle.model_validate, one core, 30 entries: {base:.0f} Bundles/s")
    with tempfile.TemporaryDirectory(prefix="relais-bench-cores-") as tmp:
        work = Path(tmp)
        for i, n in enumerate(workers or [None]):
            figures = []
            for r in range(1 if workers else runs):
                (work / f"e2e-{i}-{r}").mkdir()
                rate_e2e, cpu = end_to_end(work / f"e2e-{i}-{r}", bundles, n)
                figures.append((rate_e2e, sum(cpu.values()) / bundles))
            rate_e2e, cpu_per_bundle = statistics.median_low(figures)
            how = "defaults" if n is None else f"RELAIS_WORKERS={n}"
            each = f" (median of {len(figures)} runs: " + ", ".join(f"{f[0]:.1f}" for f in figures) + ")" \
                if len(figures) > 1 else ""
            lines.append(f"relais run ({how}, embedded), {bundles} Bundles, 16 vegeta clients (closed loop), POST -> "
                         f"applied at target: {rate_e2e:.1f} Bundles/s{each}; ratio to the floor {rate_e2e / base:.2f} "
                         f"(goal >= 1.0); load average now {os.getloadavg()[0]:.1f}")
            lines.append(f"  CPU s per Bundle, every process of relais run together: {cpu_per_bundle:.4f}")
        if workers:
            return lines  # the worker-count comparison only
        (work / "transit").mkdir()
        spent = transit(work / "transit", TRANSIT_BUNDLES)
        lines.append(f"202 -> at the target, one Bundle every 200 ms through relais run ({len(spent)} Bundles): "
                     f"p50 {statistics.median(spent) * 1000:.1f} ms, p99 {percentile(spent, 99) * 1000:.1f} ms")
        (work / "lat").mkdir()
        report = latency_under_load(work / "lat", rate, seconds, backlog=bundles)
        lat = report["latencies"]
        codes = report.get("status_codes", {})
        lines.append(f"202 at {rate}/s offered open-loop (vegeta, {seconds}s) while the pipeline is "
                     f"{'busy' if report['busy'] else 'idle (backlog drained early)'}: p50 {lat['50th'] / 1e6:.1f} ms, "
                     f"p99 {lat['99th'] / 1e6:.1f} ms, max {lat['max'] / 1e6:.1f} ms (goal p99 < 100 ms); "
                     f"status codes {codes}" + (f"; errors {report.get('errors')}" if report.get("errors") else ""))
        (work / "stages").mkdir()
        _, by_stage = per_stage_cpu(work / "stages", max(100, bundles // 2))
        lines.append("CPU s per Bundle by stage (embedded, one process per stage): "
                     + ", ".join(f"{k} {v:.4f}" for k, v in by_stage.items())
                     + f"; total {sum(by_stage.values()):.4f} (floor: {1 / base:.4f})")
        if kafka:
            from tests.bench import kafka_bootstrap

            (work / "kafka-cold").mkdir()
            (work / "kafka").mkdir()
            with kafka_bootstrap() as bootstrap:
                cold, _ = per_stage_cpu(work / "kafka-cold", bundles, kafka=bootstrap)
                rate_k, by_stage = per_stage_cpu(work / "kafka", bundles, kafka=bootstrap)
            lines.append(f"Kafka, one process per stage + one extra validator, {bundles} Bundles: {rate_k:.1f} "
                         f"Bundles/s (the broker's first run, its JVM cold: {cold:.1f}); ratio to the floor "
                         f"{rate_k / base:.2f} (goal >= 0.7); CPU s per Bundle: "
                         + ", ".join(f"{k} {v:.4f}" for k, v in by_stage.items()))
    return lines


def _counts(text: str) -> list[int]:
    """`1,2` -> [1, 2] (worker or replica counts)."""
    return [int(n) for n in text.split(",")]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.cores", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", type=int, default=400, help="Bundles for the end-to-end run")
    parser.add_argument("--rate", type=int, default=50, help="Bundles/s offered by vegeta")
    parser.add_argument("--seconds", type=int, default=15, help="duration of the vegeta attack")
    parser.add_argument("--kafka", action="store_true", help="also Kafka mode (RELAIS_KAFKA_BOOTSTRAP or local jars)")
    parser.add_argument("--runs", type=int, default=3,
                        help="end-to-end runs of the defaults; their median (low) is the figure")
    parser.add_argument("--workers", type=_counts, default=None,
                        metavar="N,M", help="only the end-to-end run, once per worker count (e.g. 1,2)")
    parser.add_argument("--validators", type=_counts, default=None,
                        metavar="N,M", help="only Kafka's validator replicas: Bundles/s N, then M, `relais validator` "
                        "processes take from a backlog of --bundles (e.g. 1,2); each count --runs times, taking turns")
    args = parser.parse_args()
    if args.validators:
        lines = scaling(args.bundles, args.validators, args.runs)
    else:
        lines = run(args.bundles, args.rate, args.seconds, args.kafka, args.workers, args.runs)
    print("\n".join(["== Relais: every core (issue 16) ==", *lines]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
