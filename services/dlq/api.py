"""Operator API for dead letters, mounted by ingress under `/ops/dlq`.

Protected by `RELAIS_OPS_TOKEN` (a bearer token); without it every call is refused with 401 unless
`RELAIS_AUTH_DISABLED=true` (development). Operator roles and audit come with the operator-auth work.
"""

from __future__ import annotations

import hmac
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from services.core.blobstore import BlobIntegrityError, make_blob_store
from services.core.envelope import FHIR_JSON, JSON
from services.core.errors import TransientError
from services.core.outcome import error, information, operation_outcome
from services.dlq.logic import DlqFilter
from services.dlq.store import DlqService, NotDeadLettered, parse_time

router = APIRouter(tags=["operations: dead letters"])


class ReplayFilter(BaseModel):
    """Which dead letters to replay at once (at least one condition)."""

    target: str | None = None
    producer: str | None = None
    reason: str | None = None
    since: str | None = None
    until: str | None = None
    note: str | None = None


class Discard(BaseModel):
    """Why a dead letter is given up."""

    reason: str


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=JSON)


def _outcome(status: int, code: str, text: str) -> Response:
    issue = information(text) if status < 400 else error(code, text)
    return Response(orjson.dumps(operation_outcome([issue])), status_code=status, media_type=FHIR_JSON,
                    headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)


def _operator(request: Request) -> str | None:
    """The operator's name for the history, or None when not allowed."""
    settings = request.app.state.ingress.settings
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if settings.ops_token:
        return "ops-token" if token and hmac.compare_digest(token, settings.ops_token) else None
    return "anonymous (auth disabled)" if settings.auth_disabled else None


def _service(request: Request) -> DlqService:
    state = request.app.state
    if getattr(state, "dlq", None) is None:
        ingress = state.ingress
        state.dlq = DlqService(ingress.ledger, ingress.bus, make_blob_store(ingress.settings))
    return state.dlq  # type: ignore[no-any-return]


_DENIED = "operator credentials required: send 'Authorization: Bearer <RELAIS_OPS_TOKEN>'"


@router.get("", summary="List dead letters (filter by target, producer, reason, time)")
async def list_dead_letters(request: Request, target: str | None = None, producer: str | None = None,
                            reason: str | None = None, since: str | None = None, until: str | None = None,
                            closed: bool = False) -> Response:
    if _operator(request) is None:
        return _outcome(401, "login", _DENIED)
    flt = DlqFilter(target, producer, reason, parse_time(since), parse_time(until))
    items = await _service(request).list(flt, include_closed=closed)
    return _json({"count": len(items), "items": [d.summary() for d in items]})


@router.post("/replay", summary="Replay every open dead letter matching a filter")
async def replay_matching(request: Request, body: ReplayFilter) -> Response:
    operator = _operator(request)
    if operator is None:
        return _outcome(401, "login", _DENIED)
    if not any((body.target, body.producer, body.reason, body.since, body.until)):
        return _outcome(400, "required", "give at least one filter (target, producer, reason, since, until)")
    flt = DlqFilter(body.target, body.producer, body.reason, parse_time(body.since), parse_time(body.until))
    try:
        replayed = await _service(request).replay_all(flt, operator, body.note)
    except TransientError as exc:
        return _outcome(503, "transient", str(exc))
    return _json({"replayed": replayed, "count": len(replayed)}, 202)


@router.get("/{transfer_id}/{target}", summary="One dead letter's metadata (payload only with ?payload=true)")
async def show(request: Request, transfer_id: str, target: str, payload: bool = False) -> Response:
    if _operator(request) is None:
        return _outcome(401, "login", _DENIED)
    service = _service(request)
    dl = await service.get(f"{transfer_id}/{target}")
    if dl is None:
        return _outcome(404, "not-found", f"no dead letter {transfer_id}/{target}")
    body = dl.summary()
    if payload:
        try:
            body["bundle"] = orjson.loads(await service.payload(dl))
        except (NotDeadLettered, BlobIntegrityError) as exc:
            return _outcome(409, "conflict", str(exc))
    return _json(body)


@router.post("/{transfer_id}/{target}/replay", summary="Replay one dead letter")
async def replay_one(request: Request, transfer_id: str, target: str) -> Response:
    operator = _operator(request)
    if operator is None:
        return _outcome(401, "login", _DENIED)
    service = _service(request)
    dl = await service.get(f"{transfer_id}/{target}")
    if dl is None:
        return _outcome(404, "not-found", f"no dead letter {transfer_id}/{target}")
    try:
        await service.replay(dl, operator)
    except (NotDeadLettered, BlobIntegrityError) as exc:
        return _outcome(409, "conflict", str(exc))
    return _outcome(202, "informational", f"{dl.id} replayed")


@router.post("/{transfer_id}/{target}/discard", summary="Discard one dead letter, with a reason")
async def discard(request: Request, transfer_id: str, target: str, body: Discard) -> Response:
    operator = _operator(request)
    if operator is None:
        return _outcome(401, "login", _DENIED)
    service = _service(request)
    dl = await service.get(f"{transfer_id}/{target}")
    if dl is None:
        return _outcome(404, "not-found", f"no dead letter {transfer_id}/{target}")
    try:
        await service.discard(dl, operator, body.reason)
    except (NotDeadLettered, ValueError) as exc:
        return _outcome(409, "conflict", str(exc))
    return _outcome(200, "informational", f"{dl.id} discarded")
