"""The cheap checks ingress makes before accepting a Bundle: pure functions, one refusal each.

Each check returns None (pass) or a `Refusal`: the HTTP status and the OperationOutcome issue that
says what is wrong and where. Deep validation against the TDDUI profiles happens later, in the
validator, so that ingress answers in milliseconds.
"""

from __future__ import annotations

import json
import re
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
    duplicate = duplicate_key(body, data)
    if duplicate is not None:
        # Two values for one key: which one a target keeps is anyone's guess, so neither is forwarded.
        return refuse(400, "structure", f"the JSON repeats the key {duplicate.rsplit('.', 1)[-1]!r} in one object; "
                      "each key may appear once", duplicate, rule="relais-ingress-duplicate-key")
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


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as its (key, value) pairs, duplicates kept."""


# A quote, whitespace, a colon: a key written with space before its colon (or quote-space-colon inside a string).
_SPACED_COLON = re.compile(rb'"[ \t\r\n]+:')
# A quote or a colon written as a \\u escape (a backslash before it may make it no escape: counted anyway).
_ESCAPED_QUOTE_OR_COLON = re.compile(rb"\\u00(?:22|3[aA])")


def duplicate_key(body: bytes, tree: Any) -> str | None:
    """The FHIRPath of the first key repeated within one JSON object, or None. `tree` is `body` as orjson read it.

    orjson keeps one of two equal keys silently, so a repeat shows only as a key missing from the tree. The
    text's `":` are its keys' closing quotes (when no key has space before its colon) plus the quote-colons
    inside its strings; orjson writes the tree back with the same ones, minus the keys it dropped and their
    values' — as long as the body writes no quote or colon as a `\\u` escape (orjson writes them plainly). So
    equal counts mean nothing repeats (a count, not a walk of the tree); otherwise the exact walk decides and
    names the path.
    """
    if (_SPACED_COLON.search(body) is None and _ESCAPED_QUOTE_OR_COLON.search(body) is None
            and body.count(b'":') == orjson.dumps(tree).count(b'":')):
        return None
    return first_duplicate_key(body)


def first_duplicate_key(body: bytes) -> str | None:
    """The exact walk: the standard parser's pairs hook sees every key, in document order.

    Called on bodies orjson accepted; a nesting too deep for the standard parser is left to the depth check.
    """
    seen_any = False

    def pairs(items: list[tuple[str, Any]]) -> Any:
        nonlocal seen_any
        if seen_any:
            return _Pairs(items)
        obj = dict(items)  # what the parser would build anyway: fewer keys than pairs means a key was repeated
        if len(obj) != len(items):
            seen_any = True
            return _Pairs(items)
        return obj

    try:
        tree = json.loads(body, object_pairs_hook=pairs)
    except (RecursionError, ValueError):
        return None
    if not seen_any:
        return None
    stack: list[tuple[Any, str]] = [(tree, "Bundle")]
    while stack:  # the first duplicate in document order, with its path
        node, path = stack.pop()
        if isinstance(node, _Pairs):
            keys: set[str] = set()
            for key, _ in node:
                if key in keys:
                    return f"{path}.{key}"
                keys.add(key)
            stack.extend((value, f"{path}.{key}") for key, value in reversed(node))
        elif isinstance(node, list):
            stack.extend((value, f"{path}[{i}]") for i, value in reversed(list(enumerate(node))))
    return None


def check_entries(bundle: Mapping[str, Any]) -> Refusal | None:
    """400 unless `Bundle.entry` (when present) is an array of objects: what every later step relies on."""
    entries = bundle.get("entry")
    if entries is None:
        return None
    if not isinstance(entries, list):
        return refuse(400, "structure", f"Bundle.entry is a JSON {_json_kind(entries)}; it must be an array of "
                      "entries", "Bundle.entry", rule="relais-ingress-entry-shape")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            return refuse(400, "structure", f"Bundle.entry[{i}] is a JSON {_json_kind(entry)}; each entry must be "
                          "an object", f"Bundle.entry[{i}]", rule="relais-ingress-entry-shape")
    return None


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object" if isinstance(value, dict) else "null"


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


def unauthenticated(reason: str) -> Refusal:
    """The 401 refusal, with the challenge header HTTP requires."""
    return refuse(401, "login", reason, rule="relais-ingress-auth",
                  headers={"WWW-Authenticate": 'Bearer realm="relais"'})


def all_issues(refusals: Sequence[Refusal]) -> list[Issue]:
    """Every issue of several refusals, in order."""
    return [i for r in refusals for i in r.issues]
