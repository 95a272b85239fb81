"""A target's own waiting area: its concurrency slots, and the records waiting for one, bounded.

Records for a busy target wait here, inside the delivery stage, not in the runner's shared budget of
records to start: so a slow target's backlog never stops the poll for the others. The area is
bounded per target, by count (`records`) and by age (`wait_s`): a record that finds it full, or
waits too long, is refused entry and the stage moves it out durably (a retry tier, or the dead-letter
topic: the target's `backlog.overflow`). The age bound matters as much as the count: a waiting record
holds its partition's commit, so it must not wait in memory for ever. Nor may all targets' waiting records
together fill the records a stage holds in hand: past half of them the stage lets its longest-waiting records
out (`MovedOut`, `let_out`) to wait durably too, whatever their own target's bound.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Collection, Hashable


class GateClosed(Exception):
    """A record waiting for a slot leaves without output, read again later: the process is stopping, or the
    record's partition is being handed over to another process."""


class MovedOut(Exception):
    """A record waiting for a slot leaves to wait durably (a retry tier): the stage's records in hand are crowded."""


class TargetGate:
    """`slots` requests at a time to one target; at most `records` waiting, each at most `wait_s` (FIFO)."""

    def __init__(self, slots: int, records: int, wait_s: float) -> None:
        self.free = slots
        self.slots = slots
        self.records = records
        self.wait_s = wait_s
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self._tags: dict[asyncio.Future[bool], Hashable] = {}  # what each waiter belongs to (its partition)
        self._since: dict[asyncio.Future[bool], float] = {}  # when each waiter came (loop time)
        self.closed = False

    @property
    def waiting(self) -> int:
        """Records waiting for a slot now."""
        return sum(1 for f in self._waiters if not f.done())

    @property
    def busy(self) -> int:
        """Slots in use now."""
        return self.slots - self.free

    async def enter(self, tag: Hashable = None) -> bool:
        """Take a slot (True), or False when the area is full or the wait exceeded `wait_s`: move the record out.

        Raises GateClosed once the gate is closed (the process is stopping), or when `release` lets the
        waiters tagged `tag` go (their partition is handed over).
        """
        if self.closed:
            raise GateClosed
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return True
        if self.waiting >= self.records:
            return False
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(future)
        self._tags[future] = tag
        self._since[future] = loop.time()
        timer = loop.call_later(self.wait_s, self._expire, future)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.result():
                self.leave()  # a slot was handed over just as the record was cancelled: pass it on
            elif future in self._waiters:
                self._waiters.remove(future)
            raise
        finally:
            timer.cancel()
            self._tags.pop(future, None)
            self._since.pop(future, None)

    def leave(self) -> None:
        """Give the slot back: to the longest-waiting record, else to the pool."""
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(True)
                return
        self.free += 1

    def release(self, tags: Collection[Hashable]) -> int:
        """The records waiting with one of `tags` leave now (GateClosed), in no slot yet: how many did."""
        leaving = [f for f in self._waiters if not f.done() and self._tags.get(f) in tags]
        for future in leaving:
            self._waiters.remove(future)
            future.set_exception(GateClosed())
        return len(leaving)

    def waiters_since(self) -> list[tuple[float, asyncio.Future[bool]]]:
        """The records waiting now: when each came (loop time), and the future it waits on (for `let_out`)."""
        return [(self._since[f], f) for f in self._waiters if not f.done()]

    def let_out(self, future: asyncio.Future[bool]) -> None:
        """The record waiting on `future` leaves now (MovedOut), in no slot: it is to wait durably instead."""
        if not future.done():
            self._waiters.remove(future)
            future.set_exception(MovedOut())

    def close(self) -> None:
        """Stopping: every waiting record leaves now (GateClosed); records holding a slot finish."""
        self.closed = True
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_exception(GateClosed())

    def _expire(self, future: asyncio.Future[bool]) -> None:
        if not future.done():
            self._waiters.remove(future)
            future.set_result(False)
