"""The cheap checks ingress makes before accepting a Bundle: pure functions, one refusal each.

Each check returns None (pass) or a `Refusal`: the HTTP status and the OperationOutcome issue that
says what is wrong and where. Deep validation against the TDDUI profiles happens later, in the
validator, so that ingress answers in milliseconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from services.core.envelope import split_csv
from services.core.outcome import Issue, error
from services.core.targets import TargetDirectory
from services.ingress.producers import Producer

ACCEPTED_MEDIA_TYPES = frozenset({"application/fhir+json", "application/json"})
TARGET_HEADER = "X-Relais-Target"


class Refusal(Exception):
    """A request refused at the door: status, issues, and any extra response headers."""

    def __init__(self, status: int, issues: tuple[Issue, ...], headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{status}: {'; '.join(i.diagnostics for i in issues)}")
        self.status = status
        self.issues = issues
        self.headers = dict(headers or {})


def refuse(status: int, code: str, diagnostics: str, *expression: str, rule: str,
           headers: Mapping[str, str] | None = None) -> Refusal:
    """A refusal with one error issue."""
    return Refusal(status, (error(code, diagnostics, *expression, rule=rule),), headers or {})


def check_content_type(content_type: str | None) -> Refusal | None:
    """415 unless the body is declared as FHIR JSON (or plain JSON)."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type in ACCEPTED_MEDIA_TYPES:
        return None
    return refuse(415, "not-supported",
                  f"Content-Type '{content_type or '(none)'}' is not supported; send the Bundle as "
                  "application/fhir+json", rule="relais-ingress-content-type")


def check_declared_length(content_length: str | None, limit: int) -> Refusal | None:
    """413 when Content-Length already announces a body over the limit."""
    if content_length and content_length.isascii() and content_length.isdigit() and int(content_length) > limit:
        return too_large(limit)
    return None


def too_large(limit: int) -> Refusal:
    """The 413 refusal for a body over `limit` bytes."""
    return refuse(413, "too-costly",
                  f"the Bundle is larger than this Relais accepts ({limit} bytes); split the export into "
                  "several transactions or ask the operator to raise RELAIS_MAX_BODY_BYTES",
                  "Bundle", rule="relais-ingress-size")


def parse_bundle(body: bytes) -> dict[str, Any] | Refusal:
    """The body as a transaction Bundle (JSON object), or the refusal saying why it is not one."""
    if not body:
        return refuse(400, "structure", "the request has no body; send a FHIR Bundle of type transaction",
                      rule="relais-ingress-json")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return refuse(400, "structure", f"the body is not valid JSON ({exc}); send a FHIR Bundle as JSON",
                      rule="relais-ingress-json")
    if not isinstance(data, dict):
        return refuse(400, "structure", "the body is JSON but not an object; send a FHIR Bundle",
                      rule="relais-ingress-bundle")
    if data.get("resourceType") != "Bundle":
        found = data.get("resourceType")
        return refuse(400, "structure",
                      f"resourceType is {found!r}, not 'Bundle'; POST [base] takes a transaction Bundle",
                      "Bundle.resourceType" if found is not None else "Bundle", rule="relais-ingress-bundle")
    if data.get("type") != "transaction":
        return refuse(422, "value",
                      f"Bundle.type is {data.get('type')!r}; TDDUI exports are Bundles of type 'transaction'",
                      "Bundle.type", rule="relais-ingress-transaction")
    return data


def check_targets(header: str | None, producer: Producer, directory: TargetDirectory) -> list[str] | Refusal:
    """The targets named in X-Relais-Target, or a refusal: none (422), unknown (422), not allowed (403)."""
    named = split_csv(header)
    if not named:
        return refuse(422, "required",
                      f"no target: name at least one target id in the {TARGET_HEADER} header "
                      "(comma-separated)", rule="relais-ingress-target-missing")
    unknown = [t for t in named if directory.get(t) is None]
    if unknown:
        return refuse(422, "not-found",
                      f"unknown target(s) {', '.join(unknown)} in {TARGET_HEADER}; known targets are listed "
                      "by the platform operator", rule="relais-ingress-target-unknown")
    forbidden = [t for t in named if not producer.may_send_to(t)]
    if forbidden:
        return refuse(403, "forbidden",
                      f"producer '{producer.id}' is not allowed to send to {', '.join(forbidden)}",
                      rule="relais-ingress-target-forbidden")
    return named


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def unauthenticated(reason: str) -> Refusal:
    """The 401 refusal, with the challenge header HTTP requires."""
    return refuse(401, "login", reason, rule="relais-ingress-auth",
                  headers={"WWW-Authenticate": 'Bearer realm="relais"'})


def all_issues(refusals: Sequence[Refusal]) -> list[Issue]:
    """Every issue of several refusals, in order."""
    return [i for r in refusals for i in r.issues]
