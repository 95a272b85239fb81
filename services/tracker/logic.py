"""Pure projection rules: what a transfer's and a delivery's status become after an event.

Events of one transfer share a partition, but they are produced by different stages, so a late
event (ingress's `accepted` landing after the validator's `validated`) must not move a status
backwards. Statuses therefore carry a rank and only move forward; `replayed` is the one explicit
way back, used when an operator sends a dead letter round again.
"""

from __future__ import annotations

from collections.abc import Iterable

# Transfer statuses
ACCEPTED = "accepted"
VALIDATED = "validated"
ROUTED = "routed"
DELIVERING = "delivering"
DELIVERED = "delivered"
REJECTED = "rejected"
DEAD_LETTERED = "dead-lettered"
TERMINAL = frozenset({DELIVERED, REJECTED, DEAD_LETTERED})

# Delivery statuses (one per transfer and target)
PENDING = "pending"
RETRYING = "retrying"
DELIVERED_UNCONFIRMED = "delivered-unconfirmed"  # an ambiguous attempt was found applied by a probe
DISCARDED = "discarded"  # an operator gave up on a dead letter
REPLAYING = "replaying"  # an operator's replay claimed this dead letter; the `replayed` event follows
REPLAYED = "replayed"  # a stage's dead letter sent back to its stage (closed)
DELIVERY_TERMINAL = frozenset({DELIVERED, DELIVERED_UNCONFIRMED, DEAD_LETTERED, DISCARDED})

_STAGE_RANK = {ACCEPTED: 0, VALIDATED: 1, ROUTED: 2, REJECTED: 9, DEAD_LETTERED: 9}
_DELIVERY_RANK = {PENDING: 0, RETRYING: 1, DELIVERED: 2, DELIVERED_UNCONFIRMED: 2, DEAD_LETTERED: 2, DISCARDED: 3}

# A stage's dead letter replayed to that stage: the transfer's stage status before it.
REPLAY_REWINDS = {"validator": ACCEPTED, "router": VALIDATED, "delivery": ROUTED}

# Event kind -> the stage status it proves.
STAGE_EVENTS = {"accepted": ACCEPTED, "validated": VALIDATED, "routed": ROUTED, "rejected": REJECTED,
                "failed": DEAD_LETTERED}
# Event kind -> the delivery status it proves.
DELIVERY_EVENTS = {"routed": PENDING, "retry_scheduled": RETRYING, "delivered": DELIVERED,
                   "delivered_unconfirmed": DELIVERED_UNCONFIRMED, "dead_lettered": DEAD_LETTERED,
                   "discarded": DISCARDED}


def _forward(current: str | None, proposed: str | None, rank: dict[str, int]) -> str | None:
    """`proposed` when it is further along than `current` by `rank`; else `current` (statuses only move forward)."""
    if proposed is None:
        return current
    if current is None or rank[proposed] > rank.get(current, -1):
        return proposed
    return current


def advance_stage(current: str | None, kind: str) -> str | None:
    """The transfer's stage status after an event of `kind` (unchanged when the event is older news)."""
    return _forward(current, STAGE_EVENTS.get(kind), _STAGE_RANK)


def advance_delivery(current: str | None, kind: str) -> str | None:
    """A delivery's status after an event of `kind`; `replayed` resets a dead letter to pending."""
    if kind == "replayed":
        return PENDING
    return _forward(current, DELIVERY_EVENTS.get(kind), _DELIVERY_RANK)


def overall_status(stage_status: str, deliveries: Iterable[str]) -> str:
    """The status a producer sees: the stage status until routed, then what the deliveries add up to."""
    if stage_status in (REJECTED, DEAD_LETTERED):
        return stage_status
    statuses = list(deliveries)
    if stage_status != ROUTED or not statuses:
        return stage_status
    if all(s in (DELIVERED, DELIVERED_UNCONFIRMED) for s in statuses):
        return DELIVERED
    if all(s in DELIVERY_TERMINAL for s in statuses):
        return DEAD_LETTERED
    return DELIVERING


def progress(stage_status: str, deliveries: Iterable[str]) -> str:
    """A short `X-Progress` text for a transfer still in flight."""
    statuses = list(deliveries)
    if stage_status == ROUTED and statuses:
        done = sum(s in DELIVERY_TERMINAL for s in statuses)
        retrying = sum(s == RETRYING for s in statuses)
        text = f"delivering: {done}/{len(statuses)} target(s) done"
        return text + (f", {retrying} retrying" if retrying else "")
    return stage_status
