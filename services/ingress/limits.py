"""Abuse limits at the ingress: per-producer rate and concurrency, body read time, JSON shape.

All limits answer with a FHIR OperationOutcome: 429 + `Retry-After` (rate, concurrency), 408 (a body
that does not arrive in time), 400 (nesting too deep), 413 (too many entries). Defaults keep a laptop
and the test suite unconstrained; README "Security" gives production values.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from services.core.settings import Settings
from services.ingress import checks
from services.ingress.checks import Refusal


@dataclass
class _Bucket:
    tokens: float
    stamp: float


@dataclass
class ProducerLimiter:
    """A token bucket and an in-flight counter per producer (in this process)."""

    rate_per_s: float = 0.0  # 0: no rate limit
    burst: int = 100
    max_concurrent: int = 0  # 0: no concurrency limit
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _in_flight: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> ProducerLimiter:
        """The limits the settings ask for."""
        return cls(settings.producer_rate_per_s, settings.producer_rate_burst, settings.producer_max_concurrent)

    def take(self, producer: str, now: float | None = None) -> Refusal | None:
        """Spend one request of `producer`'s budget, or the 429 that says when to come back."""
        if self.rate_per_s <= 0:
            return None
        moment = time.monotonic() if now is None else now
        bucket = self._buckets.get(producer)
        if bucket is None:
            bucket = self._buckets[producer] = _Bucket(float(self.burst), moment)
        bucket.tokens = min(float(self.burst), bucket.tokens + (moment - bucket.stamp) * self.rate_per_s)
        bucket.stamp = moment
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        wait = math.ceil((1.0 - bucket.tokens) / self.rate_per_s)
        return too_many(f"producer '{producer}' sends faster than {self.rate_per_s:g} requests/s "
                        f"(burst {self.burst})", max(1, wait))

    @contextlib.asynccontextmanager
    async def slot(self, producer: str) -> AsyncIterator[None]:
        """Hold one of `producer`'s concurrent-request slots for the duration; 429 when none is free."""
        refusal = self.take(producer)
        if refusal is not None:
            raise refusal
        if self.max_concurrent <= 0:
            yield
            return
        if self._in_flight.get(producer, 0) >= self.max_concurrent:
            raise too_many(f"producer '{producer}' already has {self.max_concurrent} requests in flight", 1)
        self._in_flight[producer] = self._in_flight.get(producer, 0) + 1
        try:
            yield
        finally:
            left = self._in_flight[producer] - 1
            if left:
                self._in_flight[producer] = left
            else:
                del self._in_flight[producer]


def too_many(why: str, retry_after_s: int) -> Refusal:
    """The 429 refusal, with the Retry-After HTTP asks for."""
    return checks.refuse(429, "throttled", f"{why}; retry after {retry_after_s}s", rule="relais-ingress-rate",
                         headers={"Retry-After": str(retry_after_s)})


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused as soon as it passes `limit` bytes (413) or takes longer than `timeout_s` (408):
    neither a lying Content-Length nor a slow, endless upload holds a worker."""
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise checks.too_large(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise checks.refuse(408, "timeout", f"the request body did not arrive within {timeout_s:g}s; "
                            "send it again over a working connection", rule="relais-ingress-read-time",
                            headers={"Connection": "close"}) from None
    return b"".join(chunks)


def json_depth(value: Any, limit: int) -> int:
    """The nesting depth of parsed JSON, counting stops as soon as it passes `limit`."""
    # Level by level, one comprehension per level (not a Python step per container); orjson builds plain
    # dicts and lists, so an exact type test does.
    level, depth = [value], 0
    while level:
        depth += 1
        if depth > limit:
            return depth
        level = [child for node in level for child in (node.values() if type(node) is dict else node)
                 if type(child) in _CONTAINERS]
    return depth


_CONTAINERS = frozenset({dict, list})


def check_shape(bundle: dict[str, Any], settings: Settings) -> Refusal | None:
    """400 when the JSON nests deeper than allowed, 413 when the Bundle has too many entries."""
    entries = bundle.get("entry")
    if isinstance(entries, list) and len(entries) > settings.max_bundle_entries:
        return checks.refuse(413, "too-costly", f"the Bundle has {len(entries)} entries; this Relais accepts at "
                             f"most {settings.max_bundle_entries} per transaction (RELAIS_MAX_BUNDLE_ENTRIES): "
                             "split the export", "Bundle.entry", rule="relais-ingress-entries")
    if json_depth(bundle, settings.max_json_depth) > settings.max_json_depth:
        return checks.refuse(400, "structure", f"the JSON nests deeper than {settings.max_json_depth} levels "
                             "(RELAIS_MAX_JSON_DEPTH); no TDDUI Bundle needs that", "Bundle",
                             rule="relais-ingress-depth")
    return None
