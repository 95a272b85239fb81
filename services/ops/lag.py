"""Consumer lag and queue depth per stage, read from the bus (`Bus.lag`), cached for a few seconds."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.core.bus import Bus
from services.core.metrics import CONSUMER_LAG
from services.core.settings import Settings
from services.core.topics import stage_inputs

CACHE_S = 5.0


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
