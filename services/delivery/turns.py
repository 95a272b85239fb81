"""Whose records get the event loop first: targets known to answer quickly, ahead of the others.

One delivery process runs every target's records on one event loop, and a first attempt costs CPU
(payload read, repair, journal claim, the POST's setup) whatever the target's pace. When a burst
brings records for targets that take seconds to answer beside a quick target's records, those
turns interleave first come, first served, and the quick target's deliveries wait for work whose
own answer will take seconds anyway (issue 15: burst beside 5 slow targets, p50 x1.7).

So a record for a target not known to be quick — no answer observed yet, or a median latency above
QUICK_S — gives way, before each CPU-bound step of its attempt, while records for quick targets are in
progress in this process: it takes the step once they are all done, or after GIVE_WAY_MAX_S at most (it
never starves: a quick target busy without pause delays each of the others' steps by that much, not
more). Quick targets never wait for each other, so healthy targets of similar pace share the loop as
before. `gives_way` is the decision (pure); `Turns` keeps the count of quick records in progress and
lets the others wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterator

QUICK_S = 1.0  # a target whose median answer comes within this is quick
GIVE_WAY_MAX_S = 1.0  # the longest a record gives way to quick targets' records


def is_quick(p50_s: float) -> bool:
    """A target with an observed median latency within QUICK_S (inf: no answer observed yet)."""
    return p50_s <= QUICK_S


def gives_way(quick: bool, quick_in_progress: int, waited_s: float, max_wait_s: float = GIVE_WAY_MAX_S) -> bool:
    """Whether a record waits before its attempt: it is not for a quick target, records for quick targets are in
    progress, and it has not waited `max_wait_s` yet."""
    return not quick and quick_in_progress > 0 and waited_s < max_wait_s


class Turns:
    """The records for quick targets in progress in this process; the others give way to them (bounded).

    A record that gives way waits in a queue. When no quick record is left in progress, one waiting record
    goes on, and it lets the next one go when it has taken its step (the CPU-bound stretch up to its next
    await): so the others' steps run one per turn of the loop, and a quick target's record that comes
    meanwhile stops the chain at once instead of finding dozens of steps queued ahead of it.
    """

    def __init__(self, max_wait_s: float = GIVE_WAY_MAX_S) -> None:
        self.max_wait_s = max_wait_s
        self.quick_in_progress = 0
        self._waiting: deque[asyncio.Future[None]] = deque()

    @contextlib.contextmanager
    def in_progress(self, quick: bool) -> Iterator[None]:
        """Around a record's handling, waiting for its target's slot included: counted when its target is quick."""
        if not quick:
            yield
            return
        self.quick_in_progress += 1
        try:
            yield
        finally:
            self.quick_in_progress -= 1
            if not self.quick_in_progress:
                self._wake_one()

    async def give_way(self, quick: bool) -> None:
        """Before each CPU-bound step of a record's attempt: wait while `gives_way` says so."""
        if quick:
            return
        # Records handed to their lanes by the same poll start on the next turn of the loop: let those for
        # quick targets count themselves in before looking.
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        began = loop.time()
        woken = False
        while gives_way(quick, self.quick_in_progress, waited := loop.time() - began, self.max_wait_s):
            turn: asyncio.Future[None] = loop.create_future()
            if woken:
                self._waiting.appendleft(turn)  # woken, but a quick record came first: it keeps its place
            else:
                self._waiting.append(turn)
            woken = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(turn, self.max_wait_s - waited)
        # The next waiting record looks once this one's step is done: a quick target's record that this step
        # (or the poll) starts meanwhile counts itself in first.
        loop.call_soon(self._wake_one)

    def _wake_one(self) -> None:
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
