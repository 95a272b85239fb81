"""One person's exports reach a target in order, even when one of them has to be retried.

A delivery that fails and waits in a retry tier would be overtaken by the person's later Bundles,
which are in the same lane (target + person) but not behind it any more. `LaneOrder` remembers, per
lane, the records waiting in retry tiers, oldest first: a later record of that lane is parked behind
the last of them, and the head goes first when it comes back. Pure bookkeeping (no I/O), in memory
per delivery process: after a restart, or when a lane's retries are consumed by another replica, the
order is that of the retry topics (the head is forgotten once it is overdue by `stale_s`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from datetime import datetime, timedelta

# How far behind the record it waits for a later record is parked (it must come back after it).
GAP = timedelta(milliseconds=100)


@dataclass(slots=True)
class _Waiting:
    transfer_id: str
    due: datetime


class LaneOrder:
    """Per lane, the transfers waiting in retry tiers, oldest first."""

    def __init__(self, stale_s: float) -> None:
        self.stale = timedelta(seconds=stale_s)
        self._lanes: dict[Hashable, deque[_Waiting]] = {}

    def hold_until(self, lane: Hashable, transfer_id: str, now: datetime) -> datetime | None:
        """When `transfer_id` may be attempted, if an earlier record of its lane waits: None means now."""
        queue = self._lanes.get(lane)
        if queue and queue[0].due + self.stale < now:
            del self._lanes[lane]  # the head never came back here (restart, rebalance): do not hold forever
            return None
        if not queue or queue[0].transfer_id == transfer_id:
            return None
        mine = next((w for w in queue if w.transfer_id == transfer_id), None)
        if mine is None:
            mine = _Waiting(transfer_id, now)
            queue.append(mine)
        ahead = [w.due for w in queue if w is not mine][: list(queue).index(mine)]
        mine.due = max([now, *ahead]) + GAP
        return mine.due

    def settled(self, lane: Hashable, transfer_id: str, waiting_until: datetime | None) -> None:
        """After an attempt: the record waits in a retry tier until `waiting_until`, or is done (None)."""
        queue = self._lanes.get(lane)
        if waiting_until is not None:
            if queue is None:
                self._lanes[lane] = deque([_Waiting(transfer_id, waiting_until)])
                return
            for waiting in queue:
                if waiting.transfer_id == transfer_id:
                    waiting.due = waiting_until
                    return
            queue.append(_Waiting(transfer_id, waiting_until))
            return
        if queue is not None:
            self._lanes[lane] = deque(w for w in queue if w.transfer_id != transfer_id)
            if not self._lanes[lane]:
                del self._lanes[lane]

    def __len__(self) -> int:
        return sum(len(q) for q in self._lanes.values())
