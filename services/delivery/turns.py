"""Whose records get the event loop first: other targets' records, ahead of slow targets' ones.

One delivery process runs every target's records on one event loop, and an attempt costs CPU (payload
read, repair, journal claim, the POST's setup) whatever the target's pace. When a burst brings records
for targets that take seconds to answer beside a quick target's records, first come first served lets
the quick target's deliveries wait for work whose own answer will take seconds anyway (issue 15: the
fast target's burst p50 beside 5 targets answering in 5 s was 1.8x its p50 alone).

So before it enters its target's waiting area, and before each CPU-bound step of its attempt, a record for a
*slow* target gives way while records for other targets that are not slow are in progress (waiting for their
slot included; not while waiting for their target's answer, which needs no CPU), at most GIVE_WAY_MAX_S per
step. (Giving way only within the attempt left a slow target whose slots were all taken costing every poll
its records' first steps, up to their place in the waiting area, ahead of a quick record of the same poll.)

A target is slow (`is_slow`) when its pace is above SLOW_MIN_S and above
SLOW_FACTOR x the quickest other target's pace (not the others' median: where most targets are slow, the
median is slow too); it stops being slow only once below QUICK_MIN_S or QUICK_FACTOR x that pace
(hysteresis: it does not flap). Its pace is the quickest of its last few answers (`LatencyWindow.floor`),
not their median: every duration also holds the time the answer waited for this process's event loop,
which a burst inflates for every target alike but not at the same moments (judged by medians, healthy
targets that filled their windows at different moments of a burst looked slow beside each other); a
target that takes seconds to answer takes them every time.

What keeps healthy targets' throughput (an earlier attempt, judged against a fixed 1 s, counting a record
in by its target's standing at entry and making targets not yet heard from give way too, cost 25% of it
and made a lone target's later records wait for its earlier ones): a record never gives way to its own
target's records, so a lone target never waits for itself however slow its answers get; targets slowed
alike by a burst are not slow relative to each other; a target not heard from yet is not slow until it
has kept a request waiting past the threshold (it would give way before its first answer, the one that
tells its pace); and a record gives way only while another target's record is in progress here, never
for nothing.

A request still waiting counts as well as an answer (`known_pace`): its answer will take at least that
long. Without it a target that has never answered is never slow, so right after start (or after a
restart) a burst's first attempts for targets taking seconds competed with everyone's until their first
answers came, seconds later. Its wait is judged by the same rules and hysteresis as answers: when it
crosses the threshold (a timer), and before each step of the target's records. It is judged against the
other targets' answers only (a request just sent by a target never heard from says nothing of pace).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter, deque
from collections.abc import Iterable, Iterator

SLOW_MIN_S, SLOW_FACTOR = 1.0, 5.0  # slow: pace above both this and this many times the quickest other's
QUICK_MIN_S, QUICK_FACTOR = 0.5, 2.5  # a slow target stops being slow below either of these
GIVE_WAY_MAX_S = 1.0  # the longest a record gives way, per step
_PAST_S = 0.01  # a waiting request's judgement is timed this long after it crosses the threshold (`>` in is_slow)


def known_pace(floor_s: float | None, oldest_waiting_s: float | None) -> float | None:
    """What is known of a target's pace (seconds; None: nothing): the quickest of its recent answers, or how long
    its oldest request in flight has waited if longer (that answer takes at least so long)."""
    known = [s for s in (floor_s, oldest_waiting_s) if s is not None]
    return max(known) if known else None


def slow_after_s(others_pace_s: Iterable[float]) -> float:
    """How long a request of a target that is not slow may wait before the target is slow (`is_slow`'s bound)."""
    return max(SLOW_MIN_S, SLOW_FACTOR * min(others_pace_s, default=0.0))


def is_slow(pace_s: float | None, others_pace_s: Iterable[float], was_slow: bool) -> bool:
    """Whether a target is slow, from its pace (seconds; None: no answer yet) and the other targets' paces."""
    if pace_s is None:
        return False
    others = list(others_pace_s)
    if was_slow:
        return pace_s >= max(QUICK_MIN_S, QUICK_FACTOR * min(others, default=0.0))
    return pace_s > slow_after_s(others)


def gives_way(slow: bool, others_in_progress: int, waited_s: float, max_wait_s: float = GIVE_WAY_MAX_S) -> bool:
    """Whether a record waits before its next step: its target is slow, records for targets that are not slow
    are in progress, and it has not waited `max_wait_s` yet."""
    return slow and others_in_progress > 0 and waited_s < max_wait_s


class Turns:
    """Targets' paces and their records in progress in this process; slow targets' records give way (bounded).

    A record that gives way waits in a queue. When no record of a target that is not slow is left in
    progress, one waiting record goes on, and it lets the next one go when it has taken its step (the
    CPU-bound stretch up to its next await): so those steps run one per turn of the loop, and another
    target's record that comes meanwhile stops the chain at once instead of finding dozens of steps queued
    ahead of it.
    """

    def __init__(self, max_wait_s: float = GIVE_WAY_MAX_S) -> None:
        self.max_wait_s = max_wait_s
        self._pace: dict[str, float] = {}  # from answers (`observed`)
        self._sent: dict[str, dict[int, float]] = {}  # requests awaiting an answer: id -> sent at (loop time)
        self._ids = itertools.count()
        self._slow: set[str] = set()
        self._in_progress: Counter[str] = Counter()
        self.quick_in_progress = 0  # records in progress for targets that are not slow
        self._waiting: deque[tuple[str, asyncio.Future[None]]] = deque()

    def slow(self, target: str) -> bool:
        """Whether the target is slow now."""
        return target in self._slow

    def observed(self, target: str, pace_s: float) -> None:
        """The target answered: judge it again with its pace now."""
        self._pace[target] = pace_s
        self._judge(target)

    def _judge(self, target: str) -> None:
        """Judge the target from its answers and its oldest request still waiting, against the others' answers."""
        sent = self._sent.get(target)
        waiting_s = asyncio.get_running_loop().time() - next(iter(sent.values())) if sent else None
        was = target in self._slow
        now = is_slow(known_pace(self._pace.get(target), waiting_s), self._others_pace(target), was)
        if now is was:
            return
        if now:
            self._slow.add(target)
            self.quick_in_progress -= self._in_progress[target]
            if not self.quick_in_progress:
                self._wake_one()
        else:
            self._slow.discard(target)
            self.quick_in_progress += self._in_progress[target]
            self._wake(target)  # its records giving way go on at once

    @contextlib.contextmanager
    def in_progress(self, target: str) -> Iterator[None]:
        """Around a record's handling, waiting for its target's slot included."""
        self._enter(target)
        try:
            yield
        finally:
            self._leave(target)

    def _others_pace(self, target: str) -> Iterator[float]:
        """The paces (from answers) of every other target."""
        return (p for t, p in self._pace.items() if t != target)

    @contextlib.contextmanager
    def awaiting_answer(self, target: str) -> Iterator[None]:
        """Around a POST: a record waiting for its target's answer needs no CPU, so it is not waited for (the
        slow targets' steps use the loop meanwhile instead of piling up behind the next record to come).

        The request's wait counts toward its target's pace: judged again once it has waited past the bound."""
        self._leave(target)
        loop = asyncio.get_running_loop()
        request, sent = next(self._ids), self._sent.setdefault(target, {})
        sent[request] = loop.time()  # in the order sent: the first is the oldest
        if target not in self._slow:
            loop.call_later(slow_after_s(self._others_pace(target)) + _PAST_S, self._judge, target)
        try:
            yield
        finally:
            del sent[request]
            if not sent:
                del self._sent[target]
            self._enter(target)

    def _enter(self, target: str) -> None:
        self._in_progress[target] += 1
        if target not in self._slow:
            self.quick_in_progress += 1

    def _leave(self, target: str) -> None:
        self._in_progress[target] -= 1
        if not self._in_progress[target]:
            del self._in_progress[target]
        if target not in self._slow:
            self.quick_in_progress -= 1
            if not self.quick_in_progress:
                self._wake_one()

    async def give_way(self, target: str) -> None:
        """Before each CPU-bound step of a record's attempt: wait while `gives_way` says so."""
        self._judge(target)  # a request of it may have been waiting long
        if target not in self._slow:
            return
        # Records handed to their lanes by the same poll start on the next turn of the loop: let those for
        # other targets count themselves in before looking.
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        began = loop.time()
        woken = False
        while gives_way(target in self._slow, self.quick_in_progress, waited := loop.time() - began,
                        self.max_wait_s):
            turn: asyncio.Future[None] = loop.create_future()
            if woken:
                self._waiting.appendleft((target, turn))  # woken, but another record came first: keep its place
            else:
                self._waiting.append((target, turn))
            woken = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(turn, self.max_wait_s - waited)
        # The next waiting record looks once this one's step is done: another target's record that this step
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
