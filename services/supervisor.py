"""`relais run`'s supervisor: the broker as several OS processes (one per core), kept alive, stopped together.

The plan (`plan`, pure): one `ingress` process (HTTP and the alerts loop: never CPU-bound work, so a
DUI's 202 never waits behind validation) and `workers` worker processes that each run every worker
stage; the stages' consumer groups share the partitions among them (Kafka's groups, or the embedded
log's leases), so a dead worker's partitions go to the others at once. Workers run at a lower CPU
priority (nice +WORKER_NICE) so the ingress gets a core as soon as a request arrives.

The supervisor restarts a child that dies, with backoff; gives up when one keeps dying (or exits
with a configuration error); on SIGTERM/SIGINT it forwards SIGTERM to every child and waits for
them within the grace period. Its exit code says which child failed: see `exit_code`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from services.core.logging import get_logger

log = get_logger(__name__)

WORKER_NICE = 5
MAX_RESTARTS = 5  # within RESTART_WINDOW_S: past this, a child is crash-looping and the supervisor gives up
RESTART_WINDOW_S = 60.0
EXIT_CONFIGURATION = 2  # what every relais process exits with on a configuration error: restarting cannot help
FIRST_CHILD_EXIT = 10  # child number i failed -> the supervisor exits with 10 + i (0 = ingress, 1.. = workers)
WORKER_STAGES = ("validator", "router", "delivery", "tracker")
INGRESS_STAGES = ("ingress", "alerts")


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """One child process: its name (in logs and exit messages), command line, environment and priority."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    nice: int = 0


def worker_count(setting: int, cores: int | None) -> int:
    """How many worker processes: the setting, or when it is 0 one per core (the ingress, mostly waiting on I/O,
    shares them). Measured on 2 cores (README, issue 16): 2 workers carried 12.0-15.8 Bundles/s end to end,
    1 worker 9.6-10.6. Several workers keep a person's order: the buses hand a partition number over whole
    (a lane's records and its retry tiers in one process) and a worker taking one over learns what waits
    in its retry tiers (issue 15)."""
    return setting if setting > 0 else max(1, cores or 1)


def plan(stages: Sequence[str], workers: int, *, instance_id: str, demo_target_port: int | None = None,
         metrics_port: int | None = None, python: str = sys.executable) -> list[ChildSpec]:
    """The children of `relais run` for these stages: ingress (+ alerts), N workers, the demo target."""
    run = (python, "-m", "services.cli", "run", "--in-process", "--stages")
    children = []
    front = [s for s in INGRESS_STAGES if s in stages]
    if front:
        children.append(ChildSpec("ingress", (*run, ",".join(front)), {"RELAIS_INSTANCE_ID": f"{instance_id}-ingress"}))
    back = [s for s in WORKER_STAGES if s in stages]
    if back:
        # Each worker serves its own /metrics (RELAIS_METRICS_PORT + n - 1) for Prometheus to scrape.
        children += [ChildSpec(f"worker-{n}", (*run, ",".join(back)),
                               {"RELAIS_INSTANCE_ID": f"{instance_id}-worker-{n}",
                                **({"RELAIS_METRICS_PORT": str(metrics_port + n - 1)} if metrics_port else {})},
                               WORKER_NICE)
                     for n in range(1, workers + 1)]
    if demo_target_port is not None:
        children.append(ChildSpec("demo-target",
                                  (python, "-m", "devtools.demotarget", "--port", str(demo_target_port))))
    return children


def restart_delay(recent_restarts: int) -> float:
    """Backoff before restarting a child that died: 0.5 s, doubling, at most 30 s."""
    return float(min(30.0, 0.5 * 2 ** max(0, recent_restarts - 1)))


def exit_code(index: int) -> int:
    """The supervisor's exit code when child number `index` (in plan order) failed."""
    return FIRST_CHILD_EXIT + index


def _die_with_parent() -> None:
    """In the child, before exec: be killed if the supervisor dies (kill -9 of `relais run` kills the broker)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: orphans finish their work and exit on SIGTERM as usual


@dataclass
class _Child:
    index: int
    spec: ChildSpec
    popen: subprocess.Popen[bytes] | None = None
    restarts: deque[float] = field(default_factory=deque)
    due: float | None = None  # monotonic time of a scheduled restart

    def start(self) -> None:
        nice = self.spec.nice

        def prepare() -> None:
            _die_with_parent()
            if nice:
                os.nice(nice)

        self.popen = subprocess.Popen(list(self.spec.argv), env={**os.environ, **self.spec.env},
                                      preexec_fn=prepare)
        self.due = None
        log.info("child started", child=self.spec.name, pid=self.popen.pid)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


class Supervisor:
    """Runs the children until SIGTERM/SIGINT; `run()` returns the exit code."""

    def __init__(self, children: Sequence[ChildSpec], grace_s: float) -> None:
        self.children = [_Child(i, spec) for i, spec in enumerate(children)]
        self.grace_s = grace_s
        self._stopping = False

    def _on_signal(self, signum: int, _: object) -> None:
        self._stopping = True

    def run(self) -> int:
        """Start every child, keep them running, stop them all on a signal; 0 when all stopped cleanly."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        failed: _Child | None = None
        try:
            for child in self.children:
                child.start()
            while not self._stopping and failed is None:
                failed = self._tend()
                time.sleep(0.1)
        finally:
            drained = self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        failed = failed or drained
        if failed is None:
            log.info("relais stopped")
            return 0
        code = failed.popen.returncode if failed.popen is not None else None
        if code == EXIT_CONFIGURATION:
            # The child already said what is wrong; the broker's own answer is the usual one for bad configuration.
            print(f"relais: child {failed.spec.name} refused its configuration (see above); stopped every process",
                  file=sys.stderr)
            return EXIT_CONFIGURATION
        print(f"relais: child {failed.spec.name} failed (exit code {code}); stopped every process; "
              f"exit code {exit_code(failed.index)} means {failed.spec.name}", file=sys.stderr)
        return exit_code(failed.index)

    def _tend(self) -> _Child | None:
        """Restart dead children when due; returns a child that must not be restarted (the supervisor gives up)."""
        now = time.monotonic()
        for child in self.children:
            if child.popen is None or child.alive():
                continue
            if child.due is None:
                code = child.popen.returncode
                while child.restarts and child.restarts[0] < now - RESTART_WINDOW_S:
                    child.restarts.popleft()
                if code == EXIT_CONFIGURATION or len(child.restarts) >= MAX_RESTARTS:
                    log.error("child cannot be kept running; stopping the broker", child=child.spec.name,
                              exit_code=code, restarts=len(child.restarts))
                    return child
                child.restarts.append(now)
                child.due = now + restart_delay(len(child.restarts))
                log.warning("child died; restarting", child=child.spec.name, exit_code=code,
                            restart_in_s=round(child.due - now, 2))
            elif now >= child.due:
                child.start()
        return None

    def _stop_all(self) -> _Child | None:
        """SIGTERM every child, wait within the grace period, SIGKILL stragglers; returns the first that failed."""
        for child in self.children:
            if child.alive():
                assert child.popen is not None
                child.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        failed: _Child | None = None
        for child in self.children:
            if child.popen is None:
                continue
            try:
                child.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("child did not stop within the grace period; killing it", child=child.spec.name)
                child.popen.kill()
                child.popen.wait()
                failed = failed or child
                continue
            if child.popen.returncode not in (0, -signal.SIGTERM) and child.due is None and failed is None:
                failed = child
        return failed
