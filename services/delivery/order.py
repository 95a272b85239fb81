"""One person's exports reach a target in order, even when one of them has to be retried.

A delivery that fails and waits in a retry tier would be overtaken by the person's later Bundles,
which are in the same lane (target + person) but not behind it any more. `LaneOrder` remembers, per
lane, the records waiting in retry tiers, oldest first: a later record of that lane is parked behind
the last of them, and the head goes first when it comes back. Pure bookkeeping (no I/O), in memory per delivery process.

It holds because one process handles all of a lane's records at a time: the buses hand a partition
number over whole, `deliveries` and every retry tier together (co-partitioned, issue 15), and a process
that takes a number over (at start, after a crash, when another member joins or leaves) first learns
the records waiting in that number's retry tiers (`learn`), so it does not let a later Bundle overtake
them. Waiting records are ordered by their lane sequence (`seq`: where the record was in `deliveries`),
not by when they were learnt. A head that never comes back here is forgotten once overdue by `stale_s`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import datetime, timedelta

# How far behind the record it waits for a later record is parked (it must come back after it).
GAP = timedelta(milliseconds=100)


@dataclass(slots=True)
class _Waiting:
    transfer_id: str
    due: datetime
    seq: float  # the lane's order: its position in `deliveries` (inf when unknown: after the known ones)


class LaneOrder:
    """Per lane, the transfers waiting in retry tiers, oldest first."""

    def __init__(self, stale_s: float) -> None:
        self.stale = timedelta(seconds=stale_s)
        self._lanes: dict[Hashable, deque[_Waiting]] = {}

    def hold_until(self, lane: Hashable, transfer_id: str, now: datetime, seq: float = math.inf) -> datetime | None:
        """When `transfer_id` may be attempted, if an earlier record of its lane waits: None means now."""
        queue = self._lanes.get(lane)
        if queue and queue[0].due + self.stale < now:
            del self._lanes[lane]  # the head never came back here: do not hold for ever
            return None
        if not queue or queue[0].transfer_id == transfer_id:
            return None
        mine = next((w for w in queue if w.transfer_id == transfer_id), None)
        if mine is None:
            if seq < queue[0].seq:
                return None  # earlier than every waiting record of its lane: it goes first
            mine = self._insert(queue, _Waiting(transfer_id, now, seq))
        ahead = [w.due for w in queue if w is not mine][: list(queue).index(mine)]
        mine.due = max([now, *ahead]) + GAP
        return mine.due

    def settled(self, lane: Hashable, transfer_id: str, waiting_until: datetime | None,
                seq: float = math.inf) -> None:
        """After an attempt: the record waits in a retry tier until `waiting_until`, or is done (None)."""
        queue = self._lanes.get(lane)
        if waiting_until is not None:
            if queue is None:
                self._lanes[lane] = deque([_Waiting(transfer_id, waiting_until, seq)])
                return
            for waiting in queue:
                if waiting.transfer_id == transfer_id:
                    waiting.due = waiting_until
                    return
            self._insert(queue, _Waiting(transfer_id, waiting_until, seq))
            return
        if queue is not None:
            self._lanes[lane] = deque(w for w in queue if w.transfer_id != transfer_id)
            if not self._lanes[lane]:
                del self._lanes[lane]

    def learn(self, lane: Hashable, transfer_id: str, due: datetime, seq: float) -> None:
        """A record of `lane` found waiting in a retry tier (a partition just taken over): later ones wait for it."""
        self.settled(lane, transfer_id, due, seq)

    def forget(self, which: Callable[[Hashable], bool]) -> None:
        """Drop the lanes `which` selects (their partitions went to another process, which learns them)."""
        for lane in [lane for lane in self._lanes if which(lane)]:
            del self._lanes[lane]

    @staticmethod
    def _insert(queue: deque[_Waiting], waiting: _Waiting) -> _Waiting:
        """In lane order: before the first record with a later sequence (equal ones keep their arrival order)."""
        at = next((i for i, w in enumerate(queue) if w.seq > waiting.seq), len(queue))
        queue.insert(at, waiting)
        return waiting

    def __len__(self) -> int:
        return sum(len(q) for q in self._lanes.values())
