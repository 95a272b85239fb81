"""What the operator API, the dashboard and the alerts loop share: ledger, bus, targets, DLQ, and each stage's
consumer lag and queue depth, read from the bus (`Bus.lag`) and cached for a few seconds."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.core import diskspace
from services.core.blobstore import make_blob_store
from services.core.bus import Bus
from services.core.metrics import CONSUMER_LAG
from services.core.settings import Settings
from services.core.targets import TargetDirectory, over_latency_budget
from services.core.topics import stage_inputs
from services.dlq.store import DlqService
from services.ops.alerts import Observation, TargetObservation
from services.tracker import opstate, queries
from services.tracker.ledger import Ledger

CACHE_S = 5.0  # how long a lag reading is served before the bus is asked again


@dataclass(frozen=True, slots=True)
class StageLag:
    """Records a stage has not committed yet: in total and per topic (the queue depth before it)."""

    stage: str
    lag: int
    topics: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"stage": self.stage, "lag": self.lag, "topics": self.topics}


class LagReader:
    """Asks the bus for every stage's lag at most every CACHE_S seconds, and exports it as a gauge."""

    def __init__(self, bus: Bus, settings: Settings, *, cache_s: float = CACHE_S) -> None:
        self.bus = bus
        self.settings = settings
        self.cache_s = cache_s
        self._at = 0.0
        self._last: list[StageLag] = []

    async def read(self, *, fresh: bool = False) -> list[StageLag]:
        """Every stage's lag (cached unless `fresh`)."""
        if not fresh and self._last and time.monotonic() - self._at < self.cache_s:
            return self._last
        out = [await self._stage(stage, topics) for stage, topics in stage_inputs(self.settings).items()]
        self._last, self._at = out, time.monotonic()
        return out

    async def _stage(self, stage: str, topics: Sequence[str]) -> StageLag:
        per_topic = dict.fromkeys(topics, 0)
        for partition, lag in (await self.bus.lag(stage, topics)).items():
            per_topic[partition.topic] = per_topic.get(partition.topic, 0) + max(lag, 0)
        for topic, lag in per_topic.items():
            CONSUMER_LAG.labels(stage, topic).set(lag)
        return StageLag(stage, sum(per_topic.values()), per_topic)


# Delivery processes report breaker transitions only: no report within the hour means none opened lately.
CIRCUIT_DEFAULT = "closed"


@dataclass
class OpsContext:
    """One per process, on the resources the launcher built once (ledger, bus, targets directory)."""

    settings: Settings
    ledger: Ledger
    bus: Bus
    targets: TargetDirectory
    lag: LagReader = field(init=False)
    _dlq: DlqService | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.lag = LagReader(self.bus, self.settings)

    @property
    def dlq(self) -> DlqService:
        """The dead-letter service (services.dlq), created on first use."""
        if self._dlq is None:
            self._dlq = DlqService(self.ledger, self.bus, make_blob_store(self.settings))
        return self._dlq

    def target_ids(self) -> list[str]:
        """Configured targets, in file order."""
        return [t.id for t in self.targets.targets]

    def finess_targets(self, finess: str) -> tuple[str, ...]:
        """Targets whose configured FINESS is `finess`."""
        return tuple(t.id for t in self.targets.targets if getattr(t, "finess", None) == finess)

    def target_policy(self, target_id: str) -> dict[str, Any] | None:
        """A target's delivery policy as operators see it: never a secret (only the kind of authentication)."""
        t = self.targets.get(target_id)
        if t is None:
            return None
        return {
            "base_url": str(t.base_url), "auth": t.effective_auth.type, "mtls": bool(t.tls and t.tls.client_cert),
            "connect_s": t.timeouts.connect_s, "total_s": t.timeouts.total_s,
            "delays_s": list(t.retry.delays_s or self.settings.retry_delays_s),
            "max_attempts": t.retry.max_attempts or self.settings.max_attempts, "max_age_s": t.retry.max_age_s,
            "jitter": t.retry.jitter, "breaker_failures": t.breaker.failures,
            "breaker_probe_every_s": t.breaker.probe_every_s, "ambiguous": t.ambiguous,
            "max_concurrency": t.max_concurrency, "paused_in_file": t.paused, "enabled": t.enabled,
        }

    def latency_budget_s(self, target_id: str) -> float:
        """The target's latency budget: its own `latency_budget_s`, else RELAIS_TARGET_LATENCY_BUDGET_S."""
        t = self.targets.get(target_id)
        return (t.latency_budget_s if t else None) or self.settings.target_latency_budget_s

    async def targets_view(self) -> list[dict[str, Any]]:
        """Every target: health from the ledger, paused state (file or operator), circuit as delivery reports it."""
        health = await queries.target_health(self.ledger, self.target_ids())
        states = await opstate.target_states(self.ledger)
        circuits = await opstate.circuits(self.ledger)
        out = []
        for h in health:
            configured = self.targets.get(h.target)
            state = states.get(h.target)
            item = h.as_dict()
            item |= {
                "configured": configured is not None,
                "enabled": bool(getattr(configured, "enabled", True)) if configured else False,
                "base_url": str(configured.base_url) if configured else None,
                "paused": bool((state and state.paused) or (configured and configured.paused)),
                "paused_in_file": bool(configured and configured.paused),
                "pause": state.as_dict() if state else None,
                "circuit": circuits.get(h.target, CIRCUIT_DEFAULT),
            }
            budget_s = self.latency_budget_s(h.target)
            slow = over_latency_budget(_s(h.p99_ms), h.attempts, budget_s)
            item |= {"latency_budget_ms": budget_s * 1000, "slow": slow}
            if slow and item["health"] == "ok":  # answering, but slower than its budget
                item["health"] = "degraded"
            if item["circuit"] == "open":  # delivery stopped sending to it: down, whatever the ledger says
                item |= {"health": "down", "down": True}
            out.append(item)
        return out

    async def observe(self) -> Observation:
        """What the alert rules look at, now: dead letters, lag, and each target's state."""
        lags = await self.lag.read(fresh=True)
        health = await queries.target_health(self.ledger, self.target_ids())
        circuits = await opstate.circuits(self.ledger)
        now = datetime.now(UTC)
        targets = {}
        for h in health:
            circuit = circuits.get(h.target, CIRCUIT_DEFAULT)
            oldest = (now - h.oldest_waiting_at).total_seconds() if h.oldest_waiting_at else None
            budget_s = self.latency_budget_s(h.target)
            targets[h.target] = TargetObservation(
                h.waiting, h.down or circuit == "open", circuit, oldest, h.last_error, h.p50_ms, h.p99_ms,
                budget_s * 1000, over_latency_budget(_s(h.p99_ms), h.attempts, budget_s))
        free = {}
        for path in diskspace.local_data_paths(self.settings):
            with contextlib.suppress(OSError):  # a filesystem that cannot be asked is left to the write probes
                free[str(path)] = diskspace.free_bytes(path)
        storage = {"bus": await self.bus.storage_problem(),  # the embedded log (read-only, locked, full ...)
                   "data-disk": diskspace.full_disks({Path(p): n for p, n in free.items()})}
        return Observation(at=time.monotonic(), dlq_size=await queries.dlq_size(self.ledger),
                           lag={s.stage: s.lag for s in lags}, targets=targets, storage=storage, free_bytes=free)


def _s(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000
