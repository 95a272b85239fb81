"""Routing decisions, as pure functions of the transfer and the target directory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.core.outcome import Issue, error
from services.core.targets import TargetDirectory


@dataclass(frozen=True, slots=True)
class Routing:
    """Where a transfer goes, or why it can go nowhere."""

    targets: tuple[str, ...]
    issues: tuple[Issue, ...] = ()


def route(named: Sequence[str], directory: TargetDirectory) -> Routing:
    """The targets of a transfer: those the producer named that the directory knows and has enabled."""
    known = [t for t in named if directory.get(t) is not None]
    unknown = [t for t in named if directory.get(t) is None]
    disabled = [t for t in known if not directory.get(t).enabled]  # type: ignore[union-attr]
    issues = [
        error("not-found", f"target '{t}' is not configured on this Relais; ask the platform operator to "
              "add it, or remove it from X-Relais-Target", rule="relais-route-unknown-target")
        for t in unknown
    ]
    issues += [
        error("processing", f"target '{t}' is disabled on this Relais", rule="relais-route-disabled-target")
        for t in disabled
    ]
    targets = tuple(t for t in known if t not in disabled)
    if not targets and not issues:
        issues.append(error("required", "no target for this transfer: name at least one in X-Relais-Target",
                            rule="relais-route-no-target"))
    return Routing(targets if not issues else (), tuple(issues))


def delivery_key(target: str, subject: str | None, transfer_id: str) -> bytes:
    """The Kafka key of a delivery: one person's exports to one target stay in one partition, in order."""
    return f"{target}|{subject or transfer_id}".encode()
