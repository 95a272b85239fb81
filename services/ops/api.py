"""Operator API under `/ops`: transfers, timelines, lag, targets (pause/resume), dead letters.

Every route needs an operator token (services.ops.auth): role `viewer` reads, role `operator` also
acts. Nothing here returns a Bundle or a target's full answer unless asked explicitly
(`/bundle`, `?full=true`), and such an access is written to the access log first.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response
from pydantic import BaseModel

from services.core.blobstore import BlobIntegrityError
from services.core.errors import TransientError
from services.core.identifiers import digest
from services.dlq.logic import DlqFilter
from services.dlq.store import NotDeadLettered, parse_time
from services.http.responses import json_response
from services.ops import auth
from services.ops.auth import Operator
from services.ops.context import OpsContext
from services.tracker import audit, opstate, queries

router = APIRouter(tags=["operations"])
Viewer = Annotated[Operator, Depends(auth.viewer)]
Actor = Annotated[Operator, Depends(auth.operator)]


class PauseBody(BaseModel):
    """Why a target is paused (shown on the dashboard)."""

    reason: str | None = None


class ReplayFilter(BaseModel):
    """Which dead letters to replay at once (at least one condition)."""

    target: str | None = None
    stage: str | None = None
    producer: str | None = None
    reason: str | None = None
    since: str | None = None
    until: str | None = None
    note: str | None = None


class DiscardBody(BaseModel):
    """Why a dead letter is given up."""

    reason: str


def ctx(request: Request) -> OpsContext:
    """The process's ops context."""
    return request.app.state.ops  # type: ignore[no-any-return]


def _time(text: str | None, name: str) -> datetime | None:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise HTTPException(400, f"{name}: not an ISO 8601 time ({text!r})") from exc


def transfer_filter(context: OpsContext, status: str | None, producer: str | None, target: str | None,
                    finess: str | None, since: str | None, until: str | None) -> queries.TransferFilter:
    """The filter from query parameters (shared with the dashboard)."""
    return queries.TransferFilter(status or None, producer or None, target or None, finess or None,
                                  _time(since, "since"), _time(until, "until"),
                                  context.finess_targets(finess) if finess else ())


@router.get("/whoami", summary="The operator this token belongs to, and their role")
async def whoami(who: Viewer) -> Response:
    return json_response({"id": who.id, "role": who.role})


@router.get("/overview", summary="Throughput, transfers per status, lag per stage, DLQ size, targets by health")
async def overview(request: Request, _: Viewer) -> Response:
    context = ctx(request)
    over = await queries.overview(context.ledger)
    lags = await context.lag.read()
    targets = await context.targets_view()
    return json_response({**over.as_dict(), "lag": [s.as_dict() for s in lags],
                  "targets": [{k: t[k] for k in ("target", "health", "paused", "waiting", "dead_letters",
                                                 "success_rate")} for t in targets]})


@router.get("/transfers", summary="Transfers, newest first; filters and cursor pagination")
async def list_transfers(request: Request, _: Viewer, status: str | None = None, producer: str | None = None,
                         target: str | None = None, finess: str | None = None, since: str | None = None,
                         until: str | None = None, cursor: str | None = None, limit: int = 50) -> Response:
    context = ctx(request)
    flt = transfer_filter(context, status, producer, target, finess, since, until)
    try:
        page = await queries.list_transfers(context.ledger, flt, cursor=cursor, limit=max(1, min(limit, 500)))
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc
    return json_response({"count": len(page.items), "items": [t.as_dict() for t in page.items],
                  "next_cursor": page.next_cursor})


@router.get("/search", summary="Transfers whose Bundle carried a business identifier value (recorded in the access "
                               "log)")
async def search(request: Request, who: Viewer, identifier: str) -> Response:
    context = ctx(request)
    items = await search_identifier(context, who, identifier)
    return json_response({"count": len(items), "items": [t.as_dict() for t in items]})


async def search_identifier(context: OpsContext, who: Operator, identifier: str) -> list[queries.TransferRow]:
    """Find transfers by identifier, recording the search first (shared with the dashboard)."""
    if not identifier.strip():
        raise HTTPException(400, "give the identifier value to search for")
    # The access log never holds the value, nor a plain hash of it (an INS's is reversed by trying them all).
    key = {"identifier_key": context.ledger.search_digest(digest(identifier))}
    await opstate.record_access(context.ledger, who.id, "search.identifier", detail=key)
    await audit.record_operator(context.ledger, who.id, "search.identifier", detail=key)
    return await queries.find_by_identifier(context.ledger, identifier)


@router.get("/transfers/{transfer_id}", summary="One transfer's timeline (full answers only with ?full=true)")
async def transfer_timeline(request: Request, transfer_id: str, who: Viewer, full: bool = False) -> Response:
    context = ctx(request)
    if full:
        await opstate.record_access(context.ledger, who.id, "timeline.full", transfer_id=transfer_id)
        await audit.record_operator(context.ledger, who.id, "timeline.full", transfer_id=transfer_id)
    found = await queries.timeline(context.ledger, transfer_id, full=full)
    if found is None:
        raise HTTPException(404, f"no transfer {transfer_id}")
    return json_response(found.as_dict())


@router.get("/transfers/{transfer_id}/bundle", summary="The Bundle of a dead letter (recorded in the access log)")
async def transfer_bundle(request: Request, transfer_id: str, target: str, who: Actor) -> Response:
    context = ctx(request)
    dl = await context.dlq.get(f"{transfer_id}/{target}")
    if dl is None:
        raise HTTPException(404, f"no dead letter {transfer_id}/{target}: Relais keeps a Bundle only while "
                                 "its delivery is dead-lettered")
    await opstate.record_access(context.ledger, who.id, "bundle.read", transfer_id=transfer_id, target=target)
    await audit.record_operator(context.ledger, who.id, "bundle.read", transfer_id=transfer_id, target=target)
    try:
        payload = await context.dlq.payload(dl)
    except (NotDeadLettered, BlobIntegrityError) as exc:
        raise HTTPException(409, str(exc)) from exc
    return Response(payload, media_type="application/fhir+json")


@router.get("/access-log", summary="Who read Bundles or full answers, newest first")
async def access_log(request: Request, _: Actor, transfer_id: str | None = None) -> Response:
    return json_response({"items": await opstate.access_entries(ctx(request).ledger, transfer_id=transfer_id)})


@router.get("/lag", summary="Consumer lag and queue depth per stage, read from Kafka")
async def lag(request: Request, _: Viewer) -> Response:
    lags = await ctx(request).lag.read()
    return json_response({"stages": [s.as_dict() for s in lags]})


@router.get("/targets", summary="Every target: health, success rate, p50/p99 latency, waiting, paused")
async def targets(request: Request, _: Viewer) -> Response:
    return json_response({"items": await ctx(request).targets_view()})


@router.get("/targets/{target}", summary="One target: health, and its policy (no secret)")
async def target(request: Request, target: str, _: Viewer) -> Response:
    context = ctx(request)
    found = [t for t in await context.targets_view() if t["target"] == target]
    if not found:
        raise HTTPException(404, f"no target {target}")
    return json_response({**found[0], "policy": context.target_policy(target)})


async def set_paused(context: OpsContext, target: str, paused: bool, who: Operator,
                     reason: str | None) -> opstate.TargetState:
    """Pause or resume a configured target (shared with the dashboard)."""
    if context.targets.get(target) is None:
        raise HTTPException(404, f"no target {target} in RELAIS_TARGETS_FILE")
    state = await opstate.set_paused(context.ledger, target, paused, by=who.id, reason=reason)
    await audit.record_operator(context.ledger, who.id, "pause" if paused else "resume", target=target,
                                detail={"reason": reason} if reason else None)
    return state


@router.post("/targets/{target}/pause", summary="Pause a target: its records wait, no attempts")
async def pause(request: Request, target: str, who: Actor, body: PauseBody | None = None) -> Response:
    state = await set_paused(ctx(request), target, True, who, body.reason if body else None)
    return json_response(state.as_dict())


@router.post("/targets/{target}/resume", summary="Resume a paused target")
async def resume(request: Request, target: str, who: Actor) -> Response:
    state = await set_paused(ctx(request), target, False, who, None)
    return json_response(state.as_dict())


@router.get("/dead-letters/{transfer_id}/{slot}", summary="One dead letter: reason, stage, attempts, original "
                                                         "topic/partition/offset (no payload)")
async def dead_letter(request: Request, transfer_id: str, slot: str, _: Viewer) -> Response:
    dl = await ctx(request).dlq.get(f"{transfer_id}/{slot}")
    if dl is None:
        raise HTTPException(404, f"no dead letter {transfer_id}/{slot}")
    return json_response(dl.summary())


@router.get("/dead-letters", summary="Open dead letters of every stage (filters: target, stage, producer, reason, "
                                     "since, until)")
async def dead_letters(request: Request, _: Viewer, target: str | None = None, producer: str | None = None,
                       reason: str | None = None, since: str | None = None, until: str | None = None,
                       stage: str | None = None, closed: bool = False) -> Response:
    flt = DlqFilter(target or None, producer or None, reason or None, _time(since, "since"), _time(until, "until"),
                    stage or None)
    items = await ctx(request).dlq.list(flt, include_closed=closed)
    return json_response({"count": len(items), "items": [d.summary() for d in items]})


@router.post("/dead-letters/replay", summary="Replay every open dead letter matching a filter")
async def replay_matching(request: Request, body: ReplayFilter, who: Actor) -> Response:
    if not any((body.target, body.stage, body.producer, body.reason, body.since, body.until)):
        raise HTTPException(400, "give at least one filter (target, stage, producer, reason, since, until)")
    flt = DlqFilter(body.target, body.producer, body.reason, _time(body.since, "since"), _time(body.until, "until"),
                    body.stage)
    try:
        replayed, skipped = await ctx(request).dlq.replay_all(flt, who.id, body.note)
    except TransientError as exc:
        raise HTTPException(503, str(exc)) from exc
    return json_response({"replayed": replayed, "count": len(replayed),
                  "skipped": [{"id": k, "reason": v} for k, v in skipped.items()]}, 202)


@router.post("/dead-letters/{transfer_id}/{slot}/replay", summary="Replay one dead letter to where it failed; "
             "409 when it is not open (e.g. a concurrent replay won)")
async def replay_one(request: Request, transfer_id: str, slot: str, who: Actor) -> Response:
    service = ctx(request).dlq
    dl = await service.get(f"{transfer_id}/{slot}")
    if dl is None:
        raise HTTPException(404, f"no dead letter {transfer_id}/{slot}")
    try:
        await service.replay(dl, who.id)
    except (NotDeadLettered, BlobIntegrityError) as exc:
        raise HTTPException(409, str(exc)) from exc
    except TransientError as exc:
        raise HTTPException(503, str(exc)) from exc
    return json_response({"replayed": [dl.id]}, 202)


@router.post("/dead-letters/{transfer_id}/{slot}/discard", summary="Discard one dead letter, with a reason")
async def discard(request: Request, transfer_id: str, slot: str, body: DiscardBody, who: Actor) -> Response:
    service = ctx(request).dlq
    dl = await service.get(f"{transfer_id}/{slot}")
    if dl is None:
        raise HTTPException(404, f"no dead letter {transfer_id}/{slot}")
    try:
        await service.discard(dl, who.id, body.reason)
    except NotDeadLettered as exc:
        raise HTTPException(409, str(exc)) from exc
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc
    except TransientError as exc:
        raise HTTPException(503, str(exc)) from exc
    return json_response({"discarded": [dl.id]})
