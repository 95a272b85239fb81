"""One vocabulary for what becomes of a record, shared by the runner, delivery and the operators' tools.

Every stage's handling of a record ends in one of these. `DEAD_LETTER` is the only fate that needs a
person: the record is kept (payload readable), listed by `relais dlq` / `/ops/dead-letters`, and can be
replayed to where it failed or discarded with a reason — whichever stage it failed in.
"""

from __future__ import annotations

import enum


class Fate(enum.Enum):
    """What becomes of a record after a stage handled it (the value is the metrics label)."""

    FORWARD = "forward"  # handled: the stage's outputs go on to the next topic
    DELIVERED = "delivered"  # delivery only: the target applied it
    RETRY = "retry"  # waiting may help (transient): tried again later, in order
    DEAD_LETTER = "dead-letter"  # waiting will not help: an operator replays or discards it


# Where a stage's dead letters go back to when replayed: the topic that stage reads.
# (The delivery stage also reads its retry tiers; a replay starts it afresh from `deliveries`.)
STAGE_INPUT = {"validator": "transfers.received", "router": "transfers.validated", "delivery": "deliveries"}
