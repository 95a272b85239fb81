"""The HTTP edge of delivery: POST one transaction to a target's FHIR base, report what happened."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from services.core.envelope import FHIR_JSON
from services.core.targets import Target


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one POST produced: an HTTP answer, or the reason there was none."""

    status: int | None
    body: bytes = b""
    retry_after: str | None = None
    error: str | None = None
    duration_s: float = 0.0

    def json(self) -> dict[str, Any] | None:
        """The answer's body as a JSON object, if it is one."""
        try:
            value = orjson.loads(self.body) if self.body else None
        except orjson.JSONDecodeError:
            return None
        return value if isinstance(value, dict) else None

    def describe(self) -> str:
        """One line for logs, events and dead letters."""
        return f"HTTP {self.status}" if self.status is not None else f"no answer ({self.error})"


def make_client(connect_timeout_s: float, total_timeout_s: float) -> httpx.AsyncClient:
    """One pooled client for every target; per-target settings are applied per request."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(total_timeout_s, connect=connect_timeout_s),
        limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        follow_redirects=False,  # a FHIR base that redirects a POST is misconfigured; say so, don't guess
    )


def request_headers(target: Target, request_id: str) -> dict[str, str]:
    """Headers of a transaction POST: FHIR JSON, a request id stable across attempts, target extras."""
    headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON, "X-Request-Id": request_id, **target.headers}
    if target.bearer_token_env:
        token = os.environ.get(target.bearer_token_env)
        if token:
            headers["Authorization"] = f"Bearer {token}"
    return headers


async def post_transaction(client: httpx.AsyncClient, target: Target, body: bytes, request_id: str) -> Attempt:
    """POST the transaction Bundle to the target's base URL; never raises for network trouble."""
    started = time.perf_counter()
    try:
        response = await client.post(target.base_url, content=body, headers=request_headers(target, request_id))
    except httpx.HTTPError as exc:
        return Attempt(None, error=f"{type(exc).__name__}: {exc}"[:500], duration_s=time.perf_counter() - started)
    return Attempt(response.status_code, response.content, response.headers.get("Retry-After"),
                   duration_s=time.perf_counter() - started)
