"""Envelope repair: make a TDDUI transaction mean the same thing to every conformant FHIR server.

The IG's published examples (which DUI vendors copy) put profile names in `entry.request.url` and
link entries with absolute `fullUrl`s and relative `Type/id` references. Servers refuse the first
and differ on the second. Before delivery, Relais:

* sets `request.url` to the entry's resource type (the only correct value for a create);
* gives every entry a `urn:uuid:` fullUrl and points every reference that resolves to another entry
  at it — every server resolves `urn:uuid:` references the same way.

Nothing else changes. The function is pure and deterministic (the same Bundle repairs to the same
bytes on every attempt), and reports each change so the transfer's history can say what was done.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any

# Version-specific and absolute forms both reduce to "Type/id" for matching.
_RELATIVE = re.compile(r"^(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$")
_ABSOLUTE = re.compile(r"^(?P<base>https?://.+)/(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})$")
# Deterministic urn:uuid for entries that had another fullUrl: stable across delivery attempts.
_NAMESPACE = uuid.UUID("6f1c5e0e-5d0c-4f0e-9a57-72656c616973")


@dataclass(frozen=True, slots=True)
class Change:
    """One repair: where (FHIRPath), what it was, what it became."""

    kind: str  # "request-url" | "full-url" | "reference"
    expression: str
    before: str | None
    after: str


@dataclass(frozen=True, slots=True)
class Repaired:
    """The repaired Bundle, what was changed, and each entry's original fullUrl → its new fullUrl."""

    bundle: dict[str, Any]
    changes: tuple[Change, ...] = ()
    full_urls: dict[str, str] = field(default_factory=dict)


def repair_transaction(bundle: dict[str, Any], *, request_url: bool = True, references: bool = True) -> Repaired:
    """The Bundle with its transaction envelope repaired; the input is never modified.

    Copy on write: the output shares every part of the input it does not change (a resource without a
    reference to rewrite is the input's own object), so a 30-entry Bundle costs a few small copies, not
    a deep copy of everything (issue 16's profile: 9% of the broker's CPU went to that deep copy).
    A caller that changes the output in place changes those shared parts of the input too.
    """
    entries = bundle.get("entry")
    if (not request_url and not references) or not isinstance(entries, list):
        return Repaired(bundle)
    out_entries: list[Any] = list(entries)
    changes: list[Change] = []
    if request_url:
        changes += _repair_request_urls(out_entries)
    full_urls: dict[str, str] = {}
    if references:
        index, full_urls, url_changes = _assign_urns(out_entries)
        changes += url_changes
        for i, entry in enumerate(out_entries):
            if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
                resource = _rewrite(entry["resource"], f"Bundle.entry[{i}].resource", index, changes)
                if resource is not entry["resource"]:
                    out_entries[i] = {**entry, "resource": resource}
    if not changes:
        return Repaired(bundle)
    return Repaired({**bundle, "entry": out_entries}, tuple(changes), full_urls)


def _repair_request_urls(entries: list[Any]) -> list[Change]:
    """Set each POST's request.url to its resource type (replacing the changed entries in `entries`)."""
    changes = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            continue
        resource, request = entry.get("resource"), entry.get("request")
        if not isinstance(resource, dict) or not isinstance(request, dict):
            continue
        rtype = resource.get("resourceType")
        if isinstance(rtype, str) and request.get("method") == "POST" and request.get("url") != rtype:
            changes.append(Change("request-url", f"Bundle.entry[{i}].request.url", request.get("url"), rtype))
            entries[i] = {**entry, "request": {**request, "url": rtype}}
    return changes


def _assign_urns(entries: list[Any]) -> tuple[dict[str, str], dict[str, str], list[Change]]:
    """Give each entry a urn:uuid fullUrl; return the lookup of every way to name an entry → its urn."""
    index: dict[str, str] = {}
    full_urls: dict[str, str] = {}
    changes: list[Change] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            continue
        resource: dict[str, Any] = entry["resource"] if isinstance(entry.get("resource"), dict) else {}
        original = entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else None
        if original and original.startswith("urn:uuid:"):
            urn = original
        else:
            seed = original or f"entry-{i}-{resource.get('id', '')}"
            urn = f"urn:uuid:{uuid.uuid5(_NAMESPACE, seed)}"
            entries[i] = {**entry, "fullUrl": urn}
            changes.append(Change("full-url", f"Bundle.entry[{i}].fullUrl", original, urn))
        if original:
            full_urls[original] = urn
            index.setdefault(original, urn)
            match = _ABSOLUTE.match(original)
            if match:
                index.setdefault(f"{match['type']}/{match['id']}", urn)
        rtype, rid = resource.get("resourceType"), resource.get("id")
        if isinstance(rtype, str) and isinstance(rid, str):
            index.setdefault(f"{rtype}/{rid}", urn)
    return index, full_urls, changes


def _resolve(reference: str, index: dict[str, str]) -> str | None:
    """The urn of the entry a reference names, or None when it names something outside the Bundle."""
    unversioned = reference.split("/_history/")[0]
    if unversioned in index:  # a fullUrl (urn or absolute), or an exact Type/id
        return index[unversioned]
    match = _RELATIVE.match(reference)
    return index.get(f"{match['type']}/{match['id']}") if match else None


# Where a node sits, as a chain of (where its parent sits, key or index) from a root expression: rendered only
# when a reference there changes (building every node's FHIRPath while walking was most of repair's CPU).
Where = tuple[Any, str | int] | str


def _expression(where: Where) -> str:
    parts: list[str] = []
    while isinstance(where, tuple):
        where, step = where
        parts.append(f"[{step}]" if isinstance(step, int) else f".{step}")
    return where + "".join(reversed(parts))


def _rewrite(node: Any, where: Where, index: dict[str, str], changes: list[Change]) -> Any:
    """`node` with every reference to another entry pointed at its urn: the same object when nothing changed,
    else a copy of the objects on the way to each change (the rest shared). Appends to `changes` in order."""
    if isinstance(node, dict):
        copied: dict[str, Any] | None = None
        before = node.get("reference")
        if isinstance(before, str) and not before.startswith("#"):  # "#...": a contained resource, stays inside
            after = _resolve(before, index)
            if after is not None and after != before:
                copied = {**node, "reference": after}
                changes.append(Change("reference", f"{_expression(where)}.reference", before, after))
        for key, value in node.items():
            if key == "contained" or not isinstance(value, _CONTAINERS):
                continue  # contained resources reference within their container: leave them be
            rewritten = _rewrite(value, (where, key), index, changes)
            if rewritten is not value:
                copied = copied if copied is not None else dict(node)
                copied[key] = rewritten
        return node if copied is None else copied
    if isinstance(node, list):
        items: list[Any] | None = None
        for i, item in enumerate(node):
            if not isinstance(item, _CONTAINERS):
                continue  # a string, number or boolean holds no reference
            rewritten = _rewrite(item, (where, i), index, changes)
            if rewritten is not item:
                items = items if items is not None else list(node)
                items[i] = rewritten
        return node if items is None else items
    return node


_CONTAINERS = (dict, list)


def original_full_urls(bundle: dict[str, Any]) -> list[str | None]:
    """Each entry's fullUrl as the producer sent it, in entry order."""
    return [e.get("fullUrl") if isinstance(e, dict) and isinstance(e.get("fullUrl"), str) else None
            for e in bundle.get("entry") or []]


def assigned_ids(full_urls: list[str | None], response: dict[str, Any] | None) -> dict[str, str]:
    """The producer's fullUrl → the location the target assigned (response entries follow request order)."""
    if not response:
        return {}
    answers = response.get("entry") or []
    mapping = {}
    for original, answer in zip(full_urls, answers, strict=False):
        location = (answer.get("response") or {}).get("location") if isinstance(answer, dict) else None
        if original and isinstance(location, str):
            mapping[original] = location
    return mapping
