"""Routing decisions, as pure functions of the transfer and the target directory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from services.core.bundle import entry_resources
from services.core.outcome import Issue, error
from services.core.targets import Route, TargetDirectory

FINESS_SYSTEM = "https://finess.esante.gouv.fr"
ID_NAT_ST = "urn:oid:1.2.250.1.71.4.2.2"


@dataclass(frozen=True, slots=True)
class TransferInfo:
    """What routing may look at: the targets the producer named, who sent it, and what it holds."""

    named: tuple[str, ...] = ()
    producer: str | None = None
    finess: frozenset[str] = field(default_factory=frozenset)
    profiles: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class Routing:
    """Where a transfer goes (with the route that added each extra target), or why it can go nowhere."""

    targets: tuple[str, ...]
    issues: tuple[Issue, ...] = ()
    added_by: tuple[tuple[str, str], ...] = ()  # (target, route id)


def route(transfer: TransferInfo | Sequence[str], directory: TargetDirectory) -> Routing:
    """The targets of a transfer: those the producer named, plus those added by matching routes.

    A named target that is unknown or disabled rejects the transfer (the producer must fix its
    request); a disabled target added by a route is skipped. No target at all is a rejection too.
    """
    info = transfer if isinstance(transfer, TransferInfo) else TransferInfo(named=tuple(transfer))
    named = list(dict.fromkeys(info.named))
    unknown = [t for t in named if directory.get(t) is None]
    disabled = [t for t in named if (d := directory.get(t)) is not None and not d.enabled]
    issues = [
        error("not-found", f"target '{t}' is not configured on this Relais; ask the platform operator to "
              "add it, or remove it from X-Relais-Target", rule="relais-route-unknown-target")
        for t in unknown
    ]
    issues += [
        error("processing", f"target '{t}' is disabled on this Relais", rule="relais-route-disabled-target")
        for t in disabled
    ]
    if issues:
        return Routing((), tuple(issues))
    targets = list(named)
    added: list[tuple[str, str]] = []
    for rule in directory.routes:
        if not matches(rule, info):
            continue
        for t in rule.add:
            target = directory.get(t)
            if t not in targets and target is not None and target.enabled:
                targets.append(t)
                added.append((t, rule.id))
    if not targets:
        return Routing((), (error("required", "no target for this transfer: name at least one in X-Relais-Target "
                                  "(no routing rule applies to it either)", rule="relais-route-no-target"),))
    return Routing(tuple(targets), (), tuple(added))


def matches(rule: Route, info: TransferInfo) -> bool:
    """True when the transfer satisfies every condition the route gives."""
    when = rule.when
    if when.producers is not None and info.producer not in when.producers:
        return False
    if when.finess is not None and not info.finess.intersection(when.finess):
        return False
    return when.profiles is None or any(_profile_match(p, info.profiles) for p in when.profiles)


def _profile_match(wanted: str, present: frozenset[str]) -> bool:
    # A rule may give the canonical URL or just its id (the last path segment).
    return any(p == wanted or p.rsplit("/", 1)[-1].split("|", 1)[0] == wanted for p in present)


def transfer_info(bundle: Any, named: Sequence[str], producer: str | None) -> TransferInfo:
    """Extract what routing looks at from a parsed Bundle (anything unexpected is simply ignored)."""
    finess: set[str] = set()
    profiles: set[str] = set()
    for _, resource in entry_resources(bundle):
        meta = resource.get("meta")
        profile = meta.get("profile") if isinstance(meta, dict) else None
        # Hostile or broken input (a number, a boolean, a string where a list belongs) routes as "no profile".
        profiles.update(p for p in _as_list(profile) if isinstance(p, str))
        if resource.get("resourceType") == "Organization":
            finess |= _organization_finess(resource)
    return TransferInfo(tuple(named), producer, frozenset(finess), frozenset(profiles))


def _organization_finess(org: dict[str, Any]) -> set[str]:
    found: set[str] = set()
    for ident in _as_list(org.get("identifier")):
        if not isinstance(ident, dict) or not isinstance(ident.get("value"), str):
            continue
        value = ident["value"]
        if ident.get("system") == FINESS_SYSTEM:
            found.add(value)
        elif ident.get("system") == ID_NAT_ST and value.startswith("1"):  # idNatSt prefix 1 = FINESS
            found.add(value[1:])
    return found


def _as_list(value: Any) -> list[Any]:
    """A JSON array as a list; anything else (absent, number, boolean, string, object) as nothing."""
    return value if isinstance(value, list) else []


def delivery_key(target: str, subject: str | None, transfer_id: str) -> bytes:
    """The Kafka key of a delivery: one person's exports to one target stay in one partition, in order.

    `subject` is the person key the transfer was keyed by since ingress (services.core.person).
    """
    return f"{target}|{subject or transfer_id}".encode()
