"""A poll's events projected onto the ledger rows they touch, in memory. Pure: no I/O.

The ledger loads the transfers and deliveries a poll's events concern once, lets `Projection.apply`
move them event by event (the rules of `logic.py`, in the order the poll delivered the events), then
writes what changed in a handful of statements instead of five to eight per event: the tracker's CPU
per Bundle was mostly statement overhead, not SQLite.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from services.tracker import logic

# Every column a new row starts with (the database's own defaults, made explicit for executemany).
TRANSFER_COLUMNS = ("producer", "stage_status", "status", "targets", "size", "outcome", "created_at", "updated_at",
                    "finess")
DELIVERY_COLUMNS = ("status", "attempts", "response", "assigned", "outcome", "last_http_status", "updated_at")


class Event(Protocol):
    """What the projection reads of an event (the ledger's LedgerEvent)."""

    @property
    def id(self) -> str: ...
    @property
    def transfer_id(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def stage(self) -> str: ...
    @property
    def time(self) -> datetime: ...
    @property
    def producer(self) -> str | None: ...
    @property
    def target(self) -> str | None: ...
    @property
    def attempt(self) -> int: ...
    @property
    def detail(self) -> Mapping[str, Any] | None: ...


@dataclass
class Projection:
    """The rows of a poll's transfers as its events leave them, and which of them changed how."""

    transfers: dict[str, dict[str, Any]]  # transfer id → row (as loaded, datetimes aware)
    deliveries: dict[str, dict[str, dict[str, Any]]]  # transfer id → target → row
    new_transfers: set[str] = field(default_factory=set)
    changed_transfers: dict[str, set[str]] = field(default_factory=dict)  # id → columns to write
    new_deliveries: set[tuple[str, str]] = field(default_factory=set)
    changed_deliveries: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    identifiers: dict[str, set[str]] = field(default_factory=dict)  # transfer id → search digests seen
    dead_letter_events: list[Event] = field(default_factory=list)  # for the stage dead letters, in order

    def apply(self, ev: Event) -> None:
        """Move the rows as one event does (the rules one event at a time would apply)."""
        detail = ev.detail or {}
        if (ev.kind == "failed" and ev.stage == "tracker") or detail.get("failed_stage") == "tracker":
            # The tracker could not project one event: a dead letter to list, not a fact about the transfer.
            self.dead_letter_events.append(ev)
            return
        row = self.transfers.get(ev.transfer_id)
        stage_status = logic.advance_stage(row["stage_status"] if row else None, ev.kind) or logic.ACCEPTED
        if ev.kind == "replayed" and detail.get("slot") and row is not None:
            # A stage's dead letter sent back to that stage: the transfer is where it was before it.
            stage_status = logic.REPLAY_REWINDS.get(str(detail.get("failed_stage")), row["stage_status"])
        values: dict[str, Any] = {"stage_status": stage_status, "updated_at": ev.time}
        if row is not None:
            # Events arrive out of order: the transfer began at its earliest event, changed at its latest.
            values["created_at"] = min(row["created_at"], ev.time)
            values["updated_at"] = max(row["updated_at"], ev.time)
        if ev.producer and not (row and row["producer"]):
            values["producer"] = ev.producer
        # Routing may add targets to those the producer named; a late `accepted` must not undo that.
        if "targets" in detail and (ev.kind == "routed" or (ev.kind == "accepted" and not (row and row["targets"]))):
            values["targets"] = list(detail["targets"])
        if ev.kind == "accepted" and "size" in detail:
            values["size"] = int(detail["size"])
        if detail.get("finess"):
            values["finess"] = merge_finess(row["finess"] if row else None, detail["finess"])
        if ev.kind in ("rejected", "failed"):
            values["outcome"] = detail.get("outcome") or failure_outcome(ev)
        elif ev.kind == "replayed" and detail.get("slot") and row is not None:
            values["outcome"] = None  # the stage's failure is being retried: no longer the transfer's answer
        if row is None:
            row = dict.fromkeys(TRANSFER_COLUMNS)
            row.update(id=ev.transfer_id, created_at=ev.time, **values)
            self.transfers[ev.transfer_id] = row
            self.new_transfers.add(ev.transfer_id)
        else:
            self._change_transfer(row, values)

        if isinstance(detail.get("identifiers"), list):
            wanted = {d for d in detail["identifiers"] if isinstance(d, str) and len(d) == 64}
            self.identifiers.setdefault(ev.transfer_id, set()).update(wanted)
        if ev.kind == "failed" or (ev.kind in ("replayed", "discarded") and detail.get("slot")):
            self.dead_letter_events.append(ev)
        if ev.kind == "routed":
            for target in detail.get("targets", []):
                self._advance_delivery(ev, target, {})
        elif ev.target and (ev.kind in logic.DELIVERY_EVENTS or ev.kind == "replayed"):
            self._advance_delivery(ev, ev.target or "", {
                "attempts": ev.attempt,
                "response": detail.get("response"),
                "assigned": detail.get("assigned") or None,
                "outcome": detail.get("outcome"),
                "last_http_status": detail.get("http_status"),
            })
        statuses = [d["status"] for d in self.deliveries.get(ev.transfer_id, {}).values()]
        self._change_transfer(row, {"status": logic.overall_status(stage_status, statuses)})

    def _change_transfer(self, row: dict[str, Any], values: dict[str, Any]) -> None:
        row.update(values)
        if row["id"] not in self.new_transfers:
            self.changed_transfers.setdefault(row["id"], set()).update(values)

    def _advance_delivery(self, ev: Event, target: str, values: dict[str, Any]) -> None:
        rows = self.deliveries.setdefault(ev.transfer_id, {})
        row = rows.get(target)
        status = logic.advance_delivery(row["status"] if row else None, ev.kind) or logic.PENDING
        changes = {k: v for k, v in values.items() if v is not None}
        if row is not None:
            moved = status != row["status"]
            newer = status not in logic.DELIVERY_TERMINAL and ev.attempt >= row["attempts"]
            if not (moved or newer):
                # A late or repeated event about a settled delivery must not rewrite what it recorded.
                return
            if ev.kind == "replayed":
                changes["attempts"] = 0  # a replay starts a fresh round of attempts
            elif row["attempts"] > changes.get("attempts", 0):
                changes.pop("attempts", None)
        key = (ev.transfer_id, target)
        if row is None:
            rows[target] = {**dict.fromkeys(DELIVERY_COLUMNS), "transfer_id": ev.transfer_id, "target": target,
                            "status": status, "updated_at": ev.time, "attempts": 0, **changes}
            self.new_deliveries.add(key)
        elif status != row["status"] or changes:
            changes.update(status=status, updated_at=ev.time)
            row.update(changes)
            if key not in self.new_deliveries:
                self.changed_deliveries.setdefault(key, set()).update(changes)


def failure_outcome(ev: Event) -> dict[str, Any]:
    """The OperationOutcome a producer sees when a stage dead-lettered its transfer."""
    reason = str((ev.detail or {}).get("reason", "unknown failure"))
    return {"resourceType": "OperationOutcome", "issue": [{
        "severity": "error", "code": "exception",
        "diagnostics": f"Relais's {ev.stage} stage could not process this transfer ({reason}); "
                       "an operator has been told and can replay it.",
    }]}


def merge_finess(current: str | None, new: Any) -> str:
    """The `finess` column after an event names some: the union, as ",a,b," (LIKE '%,a,%' finds a)."""
    numbers = {n for n in (current or "").split(",") if n}
    numbers |= {str(n) for n in ([new] if isinstance(new, str) else new or [])}
    return "," + ",".join(sorted(numbers)) + ","
