"""Operator state kept in the ledger database: paused targets and the access log.

Not a projection of `transfers.events` (a rebuild leaves it alone). The ops API writes it; delivery
processes read `paused_targets()` every few seconds (see README, "Operators") so a pause takes effect
in every replica without a restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from services.core.clock import aware
from services.core.shielded import shielded
from services.tracker.ledger import Ledger, access_log, target_circuits, target_state


@dataclass(frozen=True, slots=True)
class TargetState:
    """Whether an operator paused a target, who, when and why."""

    target: str
    paused: bool
    reason: str | None
    changed_by: str | None
    changed_at: datetime

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"target": self.target, "paused": self.paused, "reason": self.reason,
                "changed_by": self.changed_by, "changed_at": self.changed_at.isoformat()}


@shielded
async def set_paused(ledger: Ledger, target: str, paused: bool, *, by: str, reason: str | None = None) -> TargetState:
    """Pause or resume a target (idempotent); returns the new state."""
    now = datetime.now(UTC)
    values = {"paused": paused, "reason": (reason or "")[:500] or None, "changed_by": by, "changed_at": now}
    async with ledger.engine.begin() as conn:
        updated = await conn.execute(target_state.update().where(target_state.c.target == target).values(**values))
        if updated.rowcount == 0:
            await conn.execute(target_state.insert().values(target=target, **values))
    return TargetState(target, paused, values["reason"], by, now)  # type: ignore[arg-type]


async def target_states(ledger: Ledger) -> dict[str, TargetState]:
    """Every target an operator ever paused or resumed, by id."""
    async with ledger.engine.connect() as conn:
        rows = (await conn.execute(sa.select(target_state))).mappings().all()
    return {r["target"]: TargetState(r["target"], bool(r["paused"]), r["reason"], r["changed_by"],
                                      aware(r["changed_at"])) for r in rows}


@shielded
async def paused_targets(ledger: Ledger) -> frozenset[str]:
    """The targets operators paused: what delivery processes poll (one small indexed query)."""
    async with ledger.engine.connect() as conn:
        rows = (await conn.execute(sa.select(target_state.c.target).where(target_state.c.paused.is_(True)))).all()
    return frozenset(r[0] for r in rows)


@shielded
async def record_access(ledger: Ledger, operator: str, action: str, *, transfer_id: str | None = None,
                        target: str | None = None, detail: dict[str, Any] | None = None) -> None:
    """Remember that `operator` did `action` (e.g. read a Bundle); written before the data is returned."""
    async with ledger.engine.begin() as conn:
        await conn.execute(access_log.insert().values(
            time=datetime.now(UTC), operator=operator, action=action, transfer_id=transfer_id, target=target,
            detail=detail or {}))


async def access_entries(ledger: Ledger, *, transfer_id: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
    """The access log, newest first (optionally for one transfer)."""
    query = sa.select(access_log).order_by(access_log.c.id.desc()).limit(limit)
    if transfer_id:
        query = query.where(access_log.c.transfer_id == transfer_id)
    async with ledger.engine.connect() as conn:
        rows = (await conn.execute(query)).mappings().all()
    return [{"time": aware(r["time"]).isoformat(), "operator": r["operator"], "action": r["action"],
             "transfer_id": r["transfer_id"], "target": r["target"], "detail": r["detail"]} for r in rows]


# When delivery processes disagree, operators see the worst; a report older than this is stale.
_CIRCUIT_RANK = {"closed": 0, "half-open": 1, "open": 2}
CIRCUIT_STALE_S = 3600.0


@shielded
async def record_circuit(ledger: Ledger, target: str, circuit: str, failures: int, *, process: str) -> None:
    """A delivery process says where a target's breaker stands now (called on every transition)."""
    values = {"circuit": circuit, "failures": failures, "changed_at": datetime.now(UTC)}
    where = (target_circuits.c.target == target) & (target_circuits.c.process == process)
    async with ledger.engine.begin() as conn:
        if (await conn.execute(target_circuits.update().where(where).values(**values))).rowcount == 0:
            await conn.execute(target_circuits.insert().values(target=target, process=process, **values))


def worst_circuit(reports: list[tuple[str, datetime]], now: datetime, stale_s: float = CIRCUIT_STALE_S) -> str | None:
    """The circuit operators should see: the worst fresh report, or None when no process reported lately."""
    fresh = [c for c, at in reports if (now - at).total_seconds() <= stale_s and c in _CIRCUIT_RANK]
    return max(fresh, key=_CIRCUIT_RANK.__getitem__) if fresh else None


async def circuits(ledger: Ledger) -> dict[str, str]:
    """Each target's circuit as the delivery processes last reported it (worst fresh report)."""
    async with ledger.engine.connect() as conn:
        rows = (await conn.execute(sa.select(target_circuits))).mappings().all()
    by_target: dict[str, list[tuple[str, datetime]]] = {}
    for r in rows:
        by_target.setdefault(r["target"], []).append((r["circuit"], aware(r["changed_at"])))
    now = datetime.now(UTC)
    return {t: c for t, reports in by_target.items() if (c := worst_circuit(reports, now)) is not None}
