"""The demo target ESSMS: a FHIR R4 transaction endpoint that records what it receives and fails on demand.

It stands in for a third-party system, so it deliberately shares no code with the rest of Relais.
Request bodies carry health data: nothing here logs them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import time
import urllib.parse
import uuid
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from fastapi import FastAPI, Request, Response
from uvicorn.protocols.http.h11_impl import H11Protocol

FHIR_JSON = "application/fhir+json"
_ACCEPTED_MEDIA_TYPES = frozenset({FHIR_JSON, "application/json"})
# How long a dropped request waits for uvicorn to register the abort before giving up.
_DROP_SETTLE_S = 5.0

Addr = tuple[str, int]
# Open TCP connections served by DropCapableH11Protocol, keyed by (server address, client address):
# the same pair uvicorn puts in the ASGI scope, so a request can find and abort its own connection.
_OPEN_CONNECTIONS: dict[tuple[Addr, Addr], asyncio.Transport] = {}


class ConnectionDropped(RuntimeError):
    """Raised for a "drop" fault when the app has no TCP connection to abort (in-process ASGI clients)."""


class DropCapableH11Protocol(H11Protocol):
    """uvicorn's h11 protocol that lets the app abort its TCP connection (for the "drop" fault)."""

    _drop_key: tuple[Addr, Addr] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Register the transport so a request on it can abort it."""
        super().connection_made(transport)
        self._drop_key = _transport_key(transport)
        if self._drop_key is not None:
            _OPEN_CONNECTIONS[self._drop_key] = transport

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the transport."""
        if self._drop_key is not None and _OPEN_CONNECTIONS.get(self._drop_key) is self.transport:
            del _OPEN_CONNECTIONS[self._drop_key]
        super().connection_lost(exc)


def _addr(info: object) -> Addr | None:
    # IPv6 socket names are 4-tuples; uvicorn's scope keeps only (host, port), so do the same.
    if isinstance(info, tuple | list) and len(info) >= 2 and isinstance(info[1], int):
        return (str(info[0]), info[1])
    return None


def _transport_key(transport: asyncio.BaseTransport) -> tuple[Addr, Addr] | None:
    server, client = _addr(transport.get_extra_info("sockname")), _addr(transport.get_extra_info("peername"))
    return (server, client) if server and client else None


def _scope_key(scope: Mapping[str, Any]) -> tuple[Addr, Addr] | None:
    server, client = _addr(scope.get("server")), _addr(scope.get("client"))
    return (server, client) if server and client else None


@dataclass(frozen=True, slots=True)
class Fault:
    """One queued failure for the next `count` transaction POSTs (`count == -1`: until cleared)."""

    status: int | Literal["drop"] | None = None  # None: answer normally, after `delay_s`
    count: int = 1
    retry_after: str | None = None
    delay_s: float = 0.0
    body: dict[str, Any] | None = None
    apply_then: int | Literal["drop"] | None = None  # store the transaction, then answer this

    @classmethod
    def from_json(cls, data: Any) -> Fault:
        """Build a fault from the `POST /_faults` JSON body; raises ValueError when it makes no sense."""
        if not isinstance(data, dict):
            raise ValueError("fault must be a JSON object")
        unknown = set(data) - {"status", "count", "retry_after", "delay_s", "body", "apply_then"}
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        status, apply_then = _fault_status(data.get("status")), _fault_status(data.get("apply_then"))
        if status is not None and apply_then is not None:
            raise ValueError("give either status or apply_then, not both")
        count = data.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or (count < 1 and count != -1):
            raise ValueError("count must be a positive integer, or -1 for until cleared")
        delay_s = data.get("delay_s", 0.0)
        if isinstance(delay_s, bool) or not isinstance(delay_s, int | float) or delay_s < 0:
            raise ValueError("delay_s must be a non-negative number")
        retry_after = data.get("retry_after")
        if isinstance(retry_after, bool) or not isinstance(retry_after, str | int | None):
            raise ValueError("retry_after must be a string (seconds or HTTP-date) or an integer")
        body = data.get("body")
        if body is not None and not isinstance(body, dict):
            raise ValueError("body must be a JSON object (an OperationOutcome)")
        return cls(
            status=status,
            count=count,
            retry_after=None if retry_after is None else str(retry_after),
            delay_s=float(delay_s),
            body=body,
            apply_then=apply_then,
        )

    def to_json(self) -> dict[str, Any]:
        """The fault as `POST /_faults` accepts it."""
        return {
            "status": self.status,
            "count": self.count,
            "retry_after": self.retry_after,
            "delay_s": self.delay_s,
            "body": self.body,
            "apply_then": self.apply_then,
        }


def _fault_status(value: Any) -> int | Literal["drop"] | None:
    if value is None:
        return None
    if value == "drop":
        return "drop"
    if isinstance(value, bool) or not isinstance(value, int) or not 200 <= value <= 599:
        raise ValueError(f'fault status must be an HTTP status 200-599 or "drop", not {value!r}')
    return value


@dataclass(slots=True)
class ReceivedRequest:
    """One transaction POST as the target saw it; `status` is None until answered, "drop" if never."""

    time: datetime
    headers: dict[str, str]
    body: bytes
    status: int | Literal["drop"] | None = None
    applied: bool = False

    @property
    def request_id(self) -> str | None:
        """The caller's `X-Request-Id` header, if any."""
        return self.headers.get("x-request-id")

    def parsed_body(self) -> Any:
        """The body as JSON, or None when it is not JSON."""
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return None

    def to_json(self) -> dict[str, Any]:
        """The record as `GET /_received` lists it."""
        return {
            "request_id": self.request_id,
            "status": self.status,
            "applied": self.applied,
            "time": self.time.isoformat(),
            "headers": self.headers,
            "body": self.parsed_body(),
        }


@dataclass
class TargetState:
    """Everything the target remembers: received requests, queued faults and created resources."""

    received: list[ReceivedRequest] = field(default_factory=list)
    faults: deque[Fault] = field(default_factory=deque)
    store: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def take_fault(self) -> Fault | None:
        """The fault for the next transaction POST, consuming one use of it."""
        if not self.faults:
            return None
        fault = self.faults[0]
        if fault.count > 0:
            if fault.count > 1:
                self.faults[0] = dataclasses.replace(fault, count=fault.count - 1)
            else:
                self.faults.popleft()
        return fault

    def create(self, resource: dict[str, Any], now: datetime) -> tuple[str, str]:
        """Store a copy of the resource under a new id, version 1; returns (type, id)."""
        rtype, rid = resource["resourceType"], uuid.uuid4().hex
        meta = {**resource.get("meta", {}), "versionId": "1", "lastUpdated": now.isoformat()}
        self.store.setdefault(rtype, {})[rid] = {**resource, "id": rid, "meta": meta}
        return rtype, rid

    def search(self, rtype: str, identifier: str | None = None, tag: str | None = None) -> list[dict[str, Any]]:
        """Resources of a type, optionally with an identifier and/or a `meta.tag` (`system|code`, `|code`, `code`)."""
        resources = list(self.store.get(rtype, {}).values())
        if identifier is not None:
            resources = [r for r in resources if _has_identifier(r, identifier)]
        if tag is not None:
            resources = [r for r in resources if _has_tag(r, tag)]
        return resources

    def clear_received(self) -> None:
        """Forget every received request and the resources they created."""
        self.received.clear()
        self.store.clear()


def _has_identifier(resource: dict[str, Any], token: str) -> bool:
    # FHIR token search: "system|value" matches both, "|value" means no system, "value" any system.
    system, sep, value = token.rpartition("|")
    idents = resource.get("identifier", [])
    for ident in idents if isinstance(idents, list) else [idents]:
        if not isinstance(ident, dict) or ident.get("value") != value:
            continue
        if not sep or ident.get("system", "") == system:
            return True
    return False


def _has_tag(resource: dict[str, Any], token: str) -> bool:
    # FHIR token search on meta.tag, as for identifiers: "system|code", "|code" (no system), "code".
    system, sep, code = token.rpartition("|")
    meta = resource.get("meta")
    tags = meta.get("tag") if isinstance(meta, dict) else None
    for tag in tags if isinstance(tags, list) else []:
        if isinstance(tag, dict) and tag.get("code") == code and (not sep or tag.get("system", "") == system):
            return True
    return False


def _now() -> datetime:
    return datetime.now(UTC)


def _json(content: Any, status: int = 200, media_type: str = "application/json") -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type=media_type)


def _outcome(status: int, code: str, diagnostics: str, headers: dict[str, str] | None = None) -> Response:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }
    response = _json(body, status, FHIR_JSON)
    response.headers.update(headers or {})
    return response


def _fault_response(fault: Fault, status: int) -> Response:
    headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
    if fault.body is not None:
        response = _json(fault.body, status, FHIR_JSON)
        response.headers.update(headers)
        return response
    code = "transient" if status == 429 or status >= 500 else "processing"
    return _outcome(status, code, f"injected fault: HTTP {status}", headers)


def _check_transaction(body: bytes, content_type: str | None) -> tuple[int, str] | list[dict[str, Any]]:
    """The transaction's resources, or (HTTP status, diagnostics) saying why it is refused."""
    if content_type:
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type not in _ACCEPTED_MEDIA_TYPES:
            return 415, f"unsupported Content-Type {media_type!r}: send application/fhir+json"
    try:
        bundle = orjson.loads(body)
    except orjson.JSONDecodeError:
        return 400, "request body is not JSON"
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        return 400, "request body is not a FHIR Bundle"
    if bundle.get("type") != "transaction":
        return 400, f"Bundle.type is {bundle.get('type')!r}, expected 'transaction'"
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        return 400, "Bundle.entry is not a list"
    resources: list[dict[str, Any]] = []
    for i, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            return 400, f"Bundle.entry[{i}].resource has no resourceType"
        resources.append(resource)
    return resources


def _apply(state: TargetState, resources: list[dict[str, Any]]) -> dict[str, Any]:
    """Create every resource (all were checked first, so this is all-or-nothing) and describe the result."""
    now = _now()
    entries = []
    for resource in resources:
        rtype, rid = state.create(resource, now)
        entries.append(
            {
                "response": {
                    "status": "201 Created",
                    "location": f"{rtype}/{rid}/_history/1",
                    "etag": 'W/"1"',
                    "lastModified": now.isoformat(),
                }
            }
        )
    return {
        "resourceType": "Bundle",
        "id": uuid.uuid4().hex,
        "type": "transaction-response",
        "timestamp": now.isoformat(),
        "entry": entries,
    }


async def _drop(request: Request) -> None:
    """Close the client's TCP connection without answering."""
    key = _scope_key(request.scope)
    transport = _OPEN_CONNECTIONS.get(key) if key else None
    if transport is None:
        raise ConnectionDropped("drop fault: no TCP connection to abort (not served by the drop protocol)")
    transport.abort()
    # Wait until uvicorn sees the disconnect; returning earlier would make it answer a 500 on our behalf.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_DROP_SETTLE_S):
            while (await request.receive())["type"] != "http.disconnect":
                pass


def _capability_statement() -> dict[str, Any]:
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": _now().date().isoformat(),
        "kind": "instance",
        "implementation": {"description": "Relais demo FHIR target (plays the target ESSMS)"},
        "fhirVersion": "4.0.1",
        "format": [FHIR_JSON, "json"],
        "rest": [{"mode": "server", "interaction": [{"code": "transaction"}]}],
    }


@dataclass
class OAuthServer:
    """Optional OAuth2 client-credentials server: when given, the FHIR endpoints require its tokens."""

    client_id: str
    client_secret: str
    ttl_s: int = 3600
    tokens: dict[str, float] = field(default_factory=dict)
    issued: int = 0


def create_app(state: TargetState | None = None, oauth: OAuthServer | None = None, *,
               search: bool = True) -> FastAPI:
    """The demo target as an ASGI app; pass a TargetState to inspect it from the same process.

    `search=False` plays a server without search: every search is refused (400), as a strict server
    refuses a parameter it does not support.
    """
    state = state if state is not None else TargetState()
    app = FastAPI(title="Relais demo FHIR target")
    app.state.target = state

    async def transaction(request: Request) -> Response:
        """Process a FHIR transaction Bundle, unless a queued fault says otherwise."""
        record = ReceivedRequest(time=_now(), headers=dict(request.headers), body=await request.body())
        state.received.append(record)
        if not _authorized(request):
            return _outcome(401, "login", "missing, unknown or expired bearer token", {"WWW-Authenticate": "Bearer"})
        fault = state.take_fault()
        if fault is not None and fault.delay_s and fault.apply_then is None:
            await asyncio.sleep(fault.delay_s)
        answer = _answer(request, record, fault)
        if fault is not None and fault.delay_s and fault.apply_then is not None:
            # Applied first, then slow to answer: the client's read timeout fires after the target applied it.
            await asyncio.sleep(fault.delay_s)
        if isinstance(answer, Response):
            record.status = answer.status_code
            return answer
        record.status = "drop"
        await _drop(request)
        return Response(status_code=204)  # never reaches the client: its connection is gone

    def _answer(request: Request, record: ReceivedRequest, fault: Fault | None) -> Response | Literal["drop"]:
        if fault is not None and fault.status is not None:
            return "drop" if fault.status == "drop" else _fault_response(fault, fault.status)
        checked = _check_transaction(record.body, request.headers.get("content-type"))
        if isinstance(checked, tuple):
            return _outcome(checked[0], "invalid", checked[1])
        result = _apply(state, checked)
        record.applied = True
        if fault is not None and fault.apply_then is not None:
            return "drop" if fault.apply_then == "drop" else _fault_response(fault, fault.apply_then)
        return _json(result, 200, FHIR_JSON)

    # Both spellings: a redirect from one to the other would make clients re-POST the bundle.
    app.add_api_route("/fhir", transaction, methods=["POST"])
    app.add_api_route("/fhir/", transaction, methods=["POST"], include_in_schema=False)

    @app.get("/fhir/metadata")
    async def metadata() -> Response:
        """Minimal CapabilityStatement: a server that accepts transactions."""
        return _json(_capability_statement(), 200, FHIR_JSON)

    @app.get("/fhir/{rtype}/{rid}")
    async def read(rtype: str, rid: str) -> Response:
        """Read back a created resource."""
        resource = state.store.get(rtype, {}).get(rid)
        if resource is None:
            return _outcome(404, "not-found", f"{rtype}/{rid} is not known")
        return _json(resource, 200, FHIR_JSON)

    def _authorized(request: Request) -> bool:
        if oauth is None:
            return True
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        expires = oauth.tokens.get(token)
        return expires is not None and expires > time.monotonic()

    if oauth is not None:
        @app.post("/oauth/token")
        async def token(request: Request) -> Response:
            """OAuth2 client credentials (client_secret_basic or client_secret_post)."""
            form = dict(urllib.parse.parse_qsl((await request.body()).decode()))
            client = (form.get("client_id"), form.get("client_secret"))
            header = request.headers.get("authorization", "")
            if header.lower().startswith("basic "):
                user, _, password = base64.b64decode(header[6:]).decode().partition(":")
                client = (urllib.parse.unquote_plus(user), urllib.parse.unquote_plus(password))
            if form.get("grant_type") != "client_credentials" or client != (oauth.client_id, oauth.client_secret):
                return _json({"error": "invalid_client"}, 401)
            issued = uuid.uuid4().hex
            oauth.tokens[issued] = time.monotonic() + oauth.ttl_s
            oauth.issued += 1
            return _json({"access_token": issued, "token_type": "Bearer", "expires_in": oauth.ttl_s})

        @app.get("/_tokens")
        async def tokens() -> Response:
            """How many tokens were issued."""
            return _json({"issued": oauth.issued, "valid": len(oauth.tokens)})

        @app.delete("/_tokens", status_code=204)
        async def revoke_tokens() -> None:
            """Revoke every token (the next request with one gets 401)."""
            oauth.tokens.clear()

    @app.get("/fhir/{rtype}")
    async def search_type(rtype: str, request: Request, identifier: str | None = None,
                          _tag: str | None = None) -> Response:
        """Search a type by `identifier` and/or `_tag` (token `system|code`); answers a searchset Bundle."""
        if not _authorized(request):
            return _outcome(401, "login", "missing, unknown or expired bearer token")
        if not search:
            return _outcome(400, "not-supported", "this server does not support search")
        matches = state.search(rtype, identifier, _tag)
        bundle = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(matches),
            "entry": [
                {"fullUrl": f"{rtype}/{r['id']}", "resource": r, "search": {"mode": "match"}} for r in matches
            ],
        }
        return _json(bundle, 200, FHIR_JSON)

    @app.get("/healthz")
    async def healthz() -> Response:
        """Liveness probe."""
        return _json({"status": "ok"})

    @app.get("/_received")
    async def received(summary: bool = False) -> Response:
        """What the target received, oldest first; `?summary=1` gives counts per X-Request-Id instead."""
        if summary:
            # Requests without an X-Request-Id are counted under "".
            by_id = dict(Counter(r.request_id or "" for r in state.received))
            applied = sum(r.applied for r in state.received)
            return _json({"total": len(state.received), "applied": applied, "by_request_id": by_id})
        return _json([r.to_json() for r in state.received])

    @app.delete("/_received", status_code=204)
    async def clear_received() -> None:
        """Forget received requests and created resources."""
        state.clear_received()

    @app.get("/_faults")
    async def list_faults() -> Response:
        """The queued faults, next first."""
        return _json([f.to_json() for f in state.faults])

    @app.post("/_faults")
    async def add_fault(request: Request) -> Response:
        """Queue a fault for the next transaction POSTs."""
        try:
            fault = Fault.from_json(orjson.loads(await request.body()))
        except (orjson.JSONDecodeError, ValueError) as exc:
            return _outcome(400, "invalid", f"bad fault: {exc}")
        state.faults.append(fault)
        return _json({"queued": len(state.faults), "fault": fault.to_json()}, 201)

    @app.delete("/_faults", status_code=204)
    async def clear_faults() -> None:
        """Drop every queued fault."""
        state.faults.clear()

    return app
