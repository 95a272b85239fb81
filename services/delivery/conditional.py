"""Conditional create: a transaction a target may receive twice and apply once — FHIR's own mechanism.

Each POST entry whose resource carries a business identifier (`system` + `value`) gets
`request.ifNoneExist = "identifier=<system>|<value>"`: a target that already holds a resource with
that identifier does not create another, and references to the entry's `fullUrl` resolve to the
resource it holds. A resend after an ambiguous failure, a replay from the dead-letter queue or a
second delivery of the same export then creates nothing twice. Entries without a business
identifier cannot be made conditional and are left as they are.

Per target (`conditional_create` in the targets file): `on`, `off`, or `auto` (the default) —
on for the resource types whose `conditionalCreate` the target's CapabilityStatement declares.
Pure functions; the CapabilityStatement is fetched by `services/delivery/capability.py`.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from typing import Any

from services.core.bundle import entry_resources

ALL_TYPES = None  # `types` argument meaning "every resource type" (conditional_create: on)


def conditional_types(capability: Mapping[str, Any] | None) -> frozenset[str]:
    """The resource types for which a CapabilityStatement declares `conditionalCreate: true`."""
    found: set[str] = set()
    rests = capability.get("rest") if isinstance(capability, Mapping) else None
    for rest in rests if isinstance(rests, list) else []:
        if not isinstance(rest, dict) or rest.get("mode", "server") != "server":
            continue
        resources = rest.get("resource")
        for resource in resources if isinstance(resources, list) else []:
            if isinstance(resource, dict) and resource.get("conditionalCreate") is True \
                    and isinstance(resource.get("type"), str):
                found.add(resource["type"])
    return frozenset(found)


def if_none_exist(resource: Mapping[str, Any]) -> str | None:
    """`identifier=system|value` (as a query string) for the resource's first complete identifier, or None."""
    idents = resource.get("identifier")
    idents = idents if isinstance(idents, list) else [idents] if isinstance(idents, dict) else []
    for ident in idents:
        if isinstance(ident, dict) and isinstance(ident.get("system"), str) and isinstance(ident.get("value"), str) \
                and ident["system"] and ident["value"]:
            return "identifier=" + urllib.parse.quote(f"{ident['system']}|{ident['value']}", safe=":/|")
    return None


def make_conditional(bundle: dict[str, Any], types: frozenset[str] | None) -> int:
    """Add `request.ifNoneExist` to the Bundle's identified POST entries (of `types`; None: every type),
    in place; returns how many entries were made conditional. A producer's own ifNoneExist is kept."""
    changed = 0
    for entry, resource in entry_resources(bundle):
        request = entry.get("request")
        if not isinstance(request, dict) or request.get("method") != "POST" or request.get("ifNoneExist"):
            continue
        rtype = resource.get("resourceType")
        if types is not None and rtype not in types:
            continue
        condition = if_none_exist(resource)
        if condition is not None:
            request["ifNoneExist"] = condition
            changed += 1
    return changed
