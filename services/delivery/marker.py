"""The transfer marker: every resource Relais sends carries a `meta.tag` naming its transfer.

An ambiguous failure (sent, no answer) or a crash mid-POST leaves Relais not knowing whether the
target applied the transaction. Business identifiers cannot tell: another transfer of the same
person may carry the same Encounter identifier. The marker can: it is unique to the transfer, so a
search `GET [base]/{Type}?_tag=system|transfer-id` finds exactly the resources *this* transfer
created. Everything here is pure; the HTTP search lives in `client.py`, the decision in the stage.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.core.bundle import entry_resources


def mark_transfer(bundle: dict[str, Any], system: str, code: str) -> dict[str, Any]:
    """The Bundle with `{system, code}` added to every entry resource's `meta.tag`; the input is not modified.

    Other tags (and the rest of `meta`) are kept; a resource already carrying the marker (a replayed
    dead letter) is left as it is, so marking twice gives the same Bundle.
    """
    entries = bundle.get("entry")
    if not isinstance(entries, list):
        return bundle
    marked = []
    for entry in entries:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            marked.append(entry)
            continue
        meta: dict[str, Any] = resource["meta"] if isinstance(resource.get("meta"), dict) else {}
        tags = [t for t in meta["tag"] if isinstance(t, dict)] if isinstance(meta.get("tag"), list) else []
        if not any(t.get("system") == system and t.get("code") == code for t in tags):
            tags = [*tags, {"system": system, "code": code}]
        marked.append({**entry, "resource": {**resource, "meta": {**meta, "tag": tags}}})
    return {**bundle, "entry": marked}


def has_marker(resource: Mapping[str, Any], system: str, code: str) -> bool:
    """True when the resource carries the transfer's marker."""
    meta = resource.get("meta")
    tags = meta.get("tag") if isinstance(meta, dict) else None
    return isinstance(tags, list) and any(
        isinstance(t, dict) and t.get("system") == system and t.get("code") == code for t in tags)


@dataclass(frozen=True, slots=True)
class ProbePlan:
    """What to search for: every resource type the Bundle sends, and how many each must have created."""

    types: tuple[str, ...]
    required: Mapping[str, int]  # plain creates: the target must hold exactly these if it applied the Bundle


def probe_plan(bundle: dict[str, Any]) -> ProbePlan:
    """The search plan for a (marked) transaction Bundle.

    A plain create (`POST` without `ifNoneExist`) must leave a marked resource if the transaction was
    applied. A conditional create may have matched an existing resource and created nothing, and an
    update may carry other tags: those types are searched but not counted as required.
    """
    types: set[str] = set()
    required: Counter[str] = Counter()
    for entry, resource in entry_resources(bundle):
        if not isinstance(resource.get("resourceType"), str):
            continue
        rtype = resource["resourceType"]
        types.add(rtype)
        request = entry["request"] if isinstance(entry.get("request"), dict) else {}
        if str(request.get("method", "POST")).upper() == "POST" and not request.get("ifNoneExist"):
            required[rtype] += 1
    return ProbePlan(tuple(sorted(types)), dict(required))


class Verdict(enum.Enum):
    """What a probe concluded about one transfer at one target."""

    APPLIED = "applied"            # every created entry found: the transaction was applied
    ABSENT = "absent"              # nothing found: it was not applied, sending again is safe
    PARTIAL = "partial"            # some but not all: the target holds a broken half; an operator decides
    UNPROBEABLE = "unprobeable"    # the target refuses (or ignores) the search: the ambiguous policy decides
    FAILED = "failed"              # the search itself failed transiently: ask again later


def search_refused(status: int) -> bool:
    """True when a search answer means "this server cannot do that search" rather than "try later"."""
    return (400 <= status < 500 and status not in (408, 425, 429)) or status == 501


def verdict(plan: ProbePlan, found: Mapping[str, int]) -> Verdict:
    """Applied, absent or partial, from the marked resources found per type."""
    total = sum(found.values())
    if total == 0:
        return Verdict.ABSENT
    if plan.required and all(found.get(t, 0) >= n for t, n in plan.required.items()):
        return Verdict.APPLIED
    if not plan.required:
        return Verdict.APPLIED  # only conditional creates/updates: something of ours is there
    return Verdict.PARTIAL


def describe_found(plan: ProbePlan, found: Mapping[str, int]) -> str:
    """`Encounter 1/1, Observation 0/3` — what the probe found against what a full application creates."""
    return ", ".join(f"{t} {found.get(t, 0)}/{plan.required.get(t, 0)}" for t in plan.types)
