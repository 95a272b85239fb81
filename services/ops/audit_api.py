"""The audit trail on the operator API: `GET /ops/audit` (filters, cursor), `GET /ops/audit/$export`
(a FHIR Bundle of AuditEvent resources), `GET /ops/audit/verify` (the MAC chain holds, from its genesis row
to the head anchored outside the database).

Reading and verifying the trail are themselves recorded (who looked at who looked).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import Response

from services.core.envelope import FHIR_JSON, JSON, new_id
from services.dlq.store import parse_time
from services.ops import auth
from services.ops.auth import Operator
from services.tracker import audit, auditchain
from services.tracker.audit import AuditEntry, AuditFilter

router = APIRouter(tags=["audit"])
Actor = Annotated[Operator, Depends(auth.operator)]

KIND_SYSTEM = "https://relais.esante.example/fhir/CodeSystem/audit-kind"
FINESS_SYSTEM = "https://finess.esante.gouv.fr"
_ACTIONS = {"accepted": "C", "discarded": "D", "operator.pause": "U", "operator.resume": "U"}
_READS = {"operator.bundle.read", "operator.timeline.full", "operator.audit.read", "operator.audit.export",
          "operator.audit.verify"}


def _filter(kind: str | None, actor: str | None, transfer_id: str | None, target: str | None,
            finess: str | None, since: str | None, until: str | None) -> AuditFilter:
    try:
        return AuditFilter(kind or None, actor or None, transfer_id or None, target or None, finess or None,
                           parse_time(since), parse_time(until))
    except ValueError as exc:
        raise HTTPException(400, f"since/until: not an ISO 8601 time ({exc})") from exc


async def _page(request: Request, flt: AuditFilter, cursor: str | None, limit: int,
                ascending: bool = False) -> tuple[list[AuditEntry], str | None]:
    try:
        return await audit.entries(request.app.state.ops.ledger, flt, cursor=cursor,
                                   limit=max(1, min(limit, 1000)), ascending=ascending)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc


@router.get("/audit", summary="The audit trail, newest first (filters: kind, actor, transfer_id, target, finess, "
            "since, until; cursor pagination)")
async def audit_trail(request: Request, who: Actor, kind: str | None = None, actor: str | None = None,
                      transfer_id: str | None = None, target: str | None = None, finess: str | None = None,
                      since: str | None = None, until: str | None = None, cursor: str | None = None,
                      limit: int = 100) -> Response:
    flt = _filter(kind, actor, transfer_id, target, finess, since, until)
    items, next_cursor = await _page(request, flt, cursor, limit)
    await audit.record_operator(request.app.state.ops.ledger, who.id, "audit.read",
                                detail={"filter": _shown(flt), "count": len(items)})
    return Response(orjson.dumps({"count": len(items), "items": [i.as_dict() for i in items],
                                  "next_cursor": next_cursor}), media_type=JSON)


@router.get("/audit/$export", summary="The audit trail as a FHIR Bundle of AuditEvent resources (oldest first)")
async def audit_export(request: Request, who: Actor, kind: str | None = None, actor: str | None = None,
                       transfer_id: str | None = None, target: str | None = None, finess: str | None = None,
                       since: str | None = None, until: str | None = None, cursor: str | None = None,
                       limit: int = 1000) -> Response:
    flt = _filter(kind, actor, transfer_id, target, finess, since, until)
    items, next_cursor = await _page(request, flt, cursor, limit, ascending=True)
    await audit.record_operator(request.app.state.ops.ledger, who.id, "audit.export",
                                detail={"filter": _shown(flt), "count": len(items)})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "id": new_id(), "type": "collection",
                              "total": len(items), "entry": [{"fullUrl": f"urn:uuid:{new_id()}",
                                                              "resource": audit_event(i)} for i in items]}
    if next_cursor:
        bundle["link"] = [{"relation": "next", "url": str(request.url.include_query_params(cursor=next_cursor))}]
    return Response(orjson.dumps(bundle), media_type=FHIR_JSON)


# An audit sequence is a 64-bit row number: a larger one is a typo, answered 422 rather than carried into SQL and JSON.
AnchorSeq = Annotated[int | None, Query(ge=1, le=2**63 - 1)]


@router.get("/audit/verify", summary="Check the audit trail's MAC chain, from its genesis row to the head anchored "
            "outside the database (audit.head topic; or ?seq=&mac= copied from an 'audit chain head' log line)")
async def audit_verify(request: Request, who: Actor, seq: AnchorSeq = None, mac: str | None = None) -> Response:
    ops = request.app.state.ops
    anchors = [a for a in [await auditchain.latest_anchor(ops.bus, audit.key_of(ops.ledger))] if a is not None]
    if seq is not None and mac:
        anchors.append(auditchain.Anchor(seq, mac.lower()))
    verdict = await auditchain.verify_chain(ops.ledger, anchors)
    await audit.record_operator(ops.ledger, who.id, "audit.verify", detail=verdict.as_dict())  # verify is audited
    return Response(orjson.dumps(verdict.as_dict()), media_type=JSON)


def _shown(flt: AuditFilter) -> dict[str, str]:
    return {k: str(v) for k, v in dataclasses.asdict(flt).items() if v is not None}


def audit_event(entry: AuditEntry) -> dict[str, Any]:
    """One audit row as a FHIR R4 AuditEvent."""
    system = f"urn:relais:{entry.actor_type}"
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": f"relais-audit-{entry.seq}",
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest",
                 "display": "RESTful Operation"},
        "subtype": [{"system": KIND_SYSTEM, "code": entry.kind}],
        "action": "R" if entry.kind in _READS else _ACTIONS.get(entry.kind, "E"),
        "recorded": entry.time.isoformat(),
        "outcome": "0" if entry.outcome == "success" else "4",
        "agent": [{"who": {"identifier": {"system": system, "value": entry.actor or "unknown"}},
                   "requestor": entry.actor_type != "system"}],
        "source": {"observer": {"display": "Relais"},
                   "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4",
                             "display": "Application Server"}]},
        "entity": [],
    }
    if entry.transfer_id:
        detail = [{"type": k, "valueString": v if isinstance(v, str) else orjson.dumps(v).decode()}
                  for k, v in sorted(entry.detail.items())]
        event["entity"].append({"what": {"identifier": {"system": "urn:relais:transfer", "value": entry.transfer_id}},
                                "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                                         "code": "2", "display": "System Object"},
                                **({"detail": detail} if detail else {})})
    elif entry.detail:
        event["entity"].append({"what": {"display": "operator request"},
                                "detail": [{"type": k, "valueString": v if isinstance(v, str)
                                            else orjson.dumps(v).decode()} for k, v in sorted(entry.detail.items())]})
    if entry.target:
        event["entity"].append({"what": {"identifier": {"system": "urn:relais:target", "value": entry.target}},
                                "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "3",
                                         "display": "Report"}})
    event["entity"] += [{"what": {"identifier": {"system": FINESS_SYSTEM, "value": f}},
                         "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "4",
                                  "display": "Domain Resource"}} for f in entry.finess]
    if not event["entity"]:
        del event["entity"]
    event["extension"] = [{"url": "https://relais.esante.example/fhir/StructureDefinition/audit-chain",
                           "extension": [{"url": "seq", "valueInteger": entry.seq},
                                         {"url": "prevHash", "valueString": entry.prev_hash},
                                         {"url": "hash", "valueString": entry.hash}]}]
    return event
