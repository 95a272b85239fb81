"""What each target says it supports (its CapabilityStatement), fetched once an hour, and the
conditional-create step of the payload built for a target (services/delivery/conditional.py)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from services.core.logging import get_logger
from services.delivery import conditional
from services.delivery.client import TargetClient

log = get_logger(__name__)

FRESH_S = 3600.0  # a target's capabilities rarely change; re-read hourly
RETRY_S = 60.0  # after a failed read: conditional create stays off meanwhile, ask again soon


@dataclass
class Capabilities:
    """Per target: the resource types it creates conditionally, and when that was learnt."""

    _known: dict[str, tuple[float, frozenset[str]]] = field(default_factory=dict)
    # The read under way per target: every lane that needs it meanwhile awaits that one read (a target
    # that is down would otherwise get, and log, one GET per record in flight).
    _reading: dict[str, asyncio.Future[frozenset[str]]] = field(default_factory=dict)

    async def conditional_types(self, client: TargetClient) -> frozenset[str]:
        """The types the target's CapabilityStatement declares `conditionalCreate` for (empty: none, or unknown)."""
        target = client.target.id
        cached = self._known.get(target)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        reading = self._reading.get(target)
        if reading is None:
            reading = self._reading[target] = asyncio.ensure_future(self._read(client))
            reading.add_done_callback(lambda _: self._reading.pop(target, None))
        return await asyncio.shield(reading)  # one lane cancelled (a stop) does not cancel the others' read

    async def _read(self, client: TargetClient) -> frozenset[str]:
        target = client.target.id
        now = time.monotonic()
        attempt = await client.metadata()
        if attempt.status == 200:
            types = conditional.conditional_types(attempt.json())
            self._known[target] = (now + FRESH_S, types)
            log.info("target capabilities read", target=target, conditional_create_types=len(types))
            return types
        self._known[target] = (now + RETRY_S, frozenset())
        log.warning("cannot read the target's CapabilityStatement; conditional create off for now", target=target,
                    answer=attempt.describe())
        return frozenset()

    async def types_for(self, client: TargetClient) -> frozenset[str] | None:
        """The resource types to create conditionally at this target, per its `conditional_create` option:
        None means every type (`on`); an empty set means none (`off`, or `auto` and not declared)."""
        mode = client.target.conditional_create
        if mode == "off":
            return frozenset()
        return conditional.ALL_TYPES if mode == "on" else await self.conditional_types(client)


_PROCESS_CAPABILITIES = Capabilities()  # one per process, as the delivery stage is


async def conditional_types_for(client: TargetClient) -> frozenset[str] | None:
    """The delivery stage's one call: which entries to make conditional for this target (see `types_for`)."""
    return await _PROCESS_CAPABILITIES.types_for(client)
