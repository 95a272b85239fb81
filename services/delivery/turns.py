"""Whose records get the event loop first: records for quick targets, ahead of slow targets' ones.

One delivery process runs every target's records on one event loop, and an attempt costs CPU (payload
read, repair, journal claim, the POST's setup) whatever the target's pace. When a burst brings records
for targets that take seconds to answer beside a quick target's records, first come first served lets
the quick target's deliveries wait for work whose own answer will take seconds anyway (issue 15: the
fast target's burst p50 beside 5 targets answering in 5 s was 1.8x its p50 alone).

So before each CPU-bound step of its attempt a record whose target is not known to be quick gives way
while records for *other*, quick targets are in progress (waiting for their slot included), at most
GIVE_WAY_MAX_S per step. A target's standing is judged from its recent median latency against the
other targets' (`standing`), with hysteresis:

* **slow**: its p50 is above SLOW_MIN_S and above SLOW_FACTOR x the median of the other targets' p50;
  it is quick again only once below QUICK_MIN_S or QUICK_FACTOR x that median (so it does not flap);
* **unknown**: it has not answered yet in this process (its first records are in flight, or it
  cannot be reached);
* **quick**: the rest.

Three rules keep healthy targets' throughput (an earlier attempt, judged against a fixed 1 s and
counting a record in by its target's standing at entry, cost 25% of it and made a lone target's
later records wait for its earlier ones): a record never gives way to its own target's records, so
a lone target never waits for itself however slow its answers get; targets slowed alike by a burst
stay quick relative to each other; and a record gives way only while a quick target's record is in
progress here, never for nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import statistics
from collections import Counter, deque
from collections.abc import Iterable, Iterator

SLOW_MIN_S, SLOW_FACTOR = 1.0, 5.0  # slow: p50 above both this and this many times the others' median
QUICK_MIN_S, QUICK_FACTOR = 0.5, 2.5  # a slow target is quick again below either of these
GIVE_WAY_MAX_S = 1.0  # the longest a record gives way, per step


class Standing(enum.Enum):
    """How a target's recent answers compare with the other targets' in this process."""

    QUICK = "quick"
    SLOW = "slow"
    UNKNOWN = "unknown"


def standing(p50_s: float | None, others_p50_s: Iterable[float], was: Standing) -> Standing:
    """A target's standing from its recent median latency (None: no answer yet) and the other targets'."""
    if p50_s is None:
        return Standing.UNKNOWN
    others = list(others_p50_s)
    reference = statistics.median(others) if others else 0.0
    if was is Standing.SLOW:
        return Standing.SLOW if p50_s >= max(QUICK_MIN_S, QUICK_FACTOR * reference) else Standing.QUICK
    return Standing.SLOW if p50_s > max(SLOW_MIN_S, SLOW_FACTOR * reference) else Standing.QUICK


def gives_way(mine: Standing, quick_others_in_progress: int, waited_s: float,
              max_wait_s: float = GIVE_WAY_MAX_S) -> bool:
    """Whether a record waits before its next step: its target is not known to be quick, other quick targets'
    records are in progress, and it has not waited `max_wait_s` yet."""
    return mine is not Standing.QUICK and quick_others_in_progress > 0 and waited_s < max_wait_s


class Turns:
    """Targets' standings and their records in progress in this process; the not-quick ones give way (bounded).

    A record that gives way waits in a queue. When no quick target's record is left in progress, one
    waiting record goes on, and it lets the next one go when it has taken its step (the CPU-bound stretch
    up to its next await): so those steps run one per turn of the loop, and a quick target's record that
    comes meanwhile stops the chain at once instead of finding dozens of steps queued ahead of it.
    """

    def __init__(self, max_wait_s: float = GIVE_WAY_MAX_S) -> None:
        self.max_wait_s = max_wait_s
        self._p50: dict[str, float] = {}
        self._standing: dict[str, Standing] = {}
        self._in_progress: Counter[str] = Counter()
        self.quick_in_progress = 0  # records in progress for quick targets
        self._waiting: deque[tuple[str, asyncio.Future[None]]] = deque()

    def standing_of(self, target: str) -> Standing:
        """The target's standing now (unknown before its first answer)."""
        return self._standing.get(target, Standing.UNKNOWN)

    def observed(self, target: str, p50_s: float) -> None:
        """The target answered: judge it again with its median latency now."""
        self._p50[target] = p50_s
        was = self.standing_of(target)
        now = standing(p50_s, (p for t, p in self._p50.items() if t != target), was)
        if now is was:
            return
        self._standing[target] = now
        if now is Standing.QUICK:
            self.quick_in_progress += self._in_progress[target]
            self._wake(target)  # its records giving way go on at once
        elif was is Standing.QUICK:
            self.quick_in_progress -= self._in_progress[target]
            if not self.quick_in_progress:
                self._wake_one()

    @contextlib.contextmanager
    def in_progress(self, target: str) -> Iterator[None]:
        """Around a record's handling, waiting for its target's slot included."""
        self._in_progress[target] += 1
        if self.standing_of(target) is Standing.QUICK:
            self.quick_in_progress += 1
        try:
            yield
        finally:
            self._in_progress[target] -= 1
            if not self._in_progress[target]:
                del self._in_progress[target]
            if self.standing_of(target) is Standing.QUICK:
                self.quick_in_progress -= 1
                if not self.quick_in_progress:
                    self._wake_one()

    async def give_way(self, target: str) -> None:
        """Before each CPU-bound step of a record's attempt: wait while `gives_way` says so."""
        if self.standing_of(target) is Standing.QUICK:
            return
        # Records handed to their lanes by the same poll start on the next turn of the loop: let those for
        # quick targets count themselves in before looking.
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        began = loop.time()
        woken = False
        while gives_way(self.standing_of(target), self.quick_in_progress, waited := loop.time() - began,
                        self.max_wait_s):
            turn: asyncio.Future[None] = loop.create_future()
            if woken:
                self._waiting.appendleft((target, turn))  # woken, but a quick record came first: keep its place
            else:
                self._waiting.append((target, turn))
            woken = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(turn, self.max_wait_s - waited)
        # The next waiting record looks once this one's step is done: a quick target's record that this step
        # (or the poll) starts meanwhile counts itself in first.
        loop.call_soon(self._wake_one)

    def _wake_one(self) -> None:
        while self._waiting:
            _, turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return

    def _wake(self, target: str) -> None:
        for waiter, turn in [w for w in self._waiting if w[0] == target]:
            self._waiting.remove((waiter, turn))
            if not turn.done():
                turn.set_result(None)
