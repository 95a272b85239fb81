"""Credentials on either HTTP front: the bearer token of a request, and the audit of refused ones.

Producers (ingress) and operators (ops) are different people with different files, but a token is read
the same way on both, and a refusal (401/403) lands in the same audit trail.
"""

from __future__ import annotations

import asyncio
import functools

import anyio.from_thread
from fastapi import Request

from services.tracker.audit import Refusals


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def request_token(request: Request) -> str | None:
    """The bearer token of the request, if any."""
    return bearer_token(request.headers.get("Authorization"))


def note_refusal(request: Request, surface: str, status: int, reason: str) -> None:
    """Record a failed authentication (401/403) in the audit trail, at most once per client, surface and
    reason per RELAIS_AUDIT_REFUSAL_EVERY_S; never delays or fails the refusal itself."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # a sync FastAPI dependency runs in a worker thread: note it on the event loop
        anyio.from_thread.run_sync(functools.partial(note_refusal, request, surface, status, reason))
        return
    refusals: Refusals | None = getattr(request.app.state, "auth_refusals", None)
    if refusals is None:
        return  # an app assembled without the audit trail (services.app sets it) has nowhere to write
    refusals.note(surface, status, reason, client=request.client.host if request.client else None,
                  path=request.url.path)
