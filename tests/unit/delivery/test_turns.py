"""Turns: records for slow targets give way to other targets' records, for a bounded time, never to their own."""

from __future__ import annotations

import asyncio

import pytest

from services.delivery.turns import GIVE_WAY_MAX_S, SLOW_MIN_S, Turns, gives_way, is_slow, known_pace


@pytest.mark.parametrize(("pace_s", "others", "was_slow", "slow"), [
    (None, [0.02], False, False),  # no answer yet: not slow (its first answer tells its pace)
    (None, [0.02], True, False),
    (0.02, [], False, False),
    (5.0, [0.02], False, True),  # answers in 5 s beside a target answering in 20 ms
    (5.0, [0.02, 0.03, 6.0], False, True),  # judged against the quickest other target ...
    (5.0, [0.02, 5.0, 5.0, 5.0], False, True),  # ... not the others' median: most targets may be slow
    (0.9, [0.02], False, False),  # never slow below SLOW_MIN_S, however quick the others
    (5.0, [], False, True),  # no other target has answered: against SLOW_MIN_S alone
    (3.0, [1.0, 1.2], False, False),  # a burst slows every target alike: none is slow relative to the others
    (7.0, [1.0, 1.2], False, True),
    # Hysteresis: slow until clearly quick again, so a target near the bound does not flap.
    (0.8, [0.02], True, True),
    (0.4, [0.02], True, False),
    (3.0, [1.0], True, True),
    (2.4, [1.0], True, False),
    (1.1, [0.02], False, True),
])
def test_a_target_is_slow_against_the_other_targets_with_hysteresis(
        pace_s: float | None, others: list[float], was_slow: bool, slow: bool) -> None:
    assert is_slow(pace_s, others, was_slow) is slow


@pytest.mark.parametrize(("floor_s", "oldest_waiting_s", "pace_s"), [
    (None, None, None),  # never answered, nothing in flight: nothing known
    (None, 1.5, 1.5),  # never answered, but its first request has waited 1.5 s: its answer takes at least that
    (0.02, None, 0.02),
    (0.02, 1.5, 1.5),  # answered quickly before, but a request has been waiting 1.5 s now
    (5.0, 0.1, 5.0),  # a request sent just now says nothing new of a target answering in 5 s
])
def test_what_is_known_of_a_targets_pace_counts_its_oldest_request_still_waiting(
        floor_s: float | None, oldest_waiting_s: float | None, pace_s: float | None) -> None:
    assert known_pace(floor_s, oldest_waiting_s) == pace_s


@pytest.mark.parametrize(("floor_s", "oldest_waiting_s", "others", "was_slow", "slow"), [
    (None, 1.5, [0.02], False, True),  # cold start: slow before its first answer
    (None, 1.5, [], False, True),  # no target has answered yet: against SLOW_MIN_S alone
    (None, 0.8, [0.02], False, False),  # not past SLOW_MIN_S yet
    (None, 2.0, [0.5], False, False),  # nor past 5x the quickest other target
    (None, 3.0, [0.5], False, True),
    (0.02, None, [0.02], True, False),  # judged slow while waiting, then answered quickly: quick again
    (0.02, 0.6, [0.02], True, True),  # ... unless another request of it still waits (hysteresis, as answers)
    (0.02, 0.4, [0.02], True, False),
])
def test_a_target_whose_request_still_waits_is_judged_as_answers_are(
        floor_s: float | None, oldest_waiting_s: float | None, others: list[float], was_slow: bool,
        slow: bool) -> None:
    assert is_slow(known_pace(floor_s, oldest_waiting_s), others, was_slow) is slow


@pytest.mark.parametrize(("slow", "others", "waited_s", "waits"), [
    (False, 5, 0.0, False),  # targets that are not slow never wait, not even for each other
    (True, 0, 0.0, False),  # nothing else in progress: it goes at once
    (True, 1, 0.0, True),  # a slow target's record goes after the others' in progress ...
    (True, 60, GIVE_WAY_MAX_S * 0.99, True),
    (True, 60, GIVE_WAY_MAX_S, False),  # ... but never waits longer than the bound: no starvation
])
def test_who_goes_first(slow: bool, others: int, waited_s: float, waits: bool) -> None:
    assert gives_way(slow, others, waited_s) is waits


def _turns(max_wait_s: float = 5) -> Turns:
    turns = Turns(max_wait_s=max_wait_s)
    turns.observed("fast", 0.02)
    turns.observed("slow", 5.0)
    assert turns.slow("slow") and not turns.slow("fast")
    return turns


async def test_a_slow_targets_record_starts_once_the_other_targets_records_are_done() -> None:
    turns = _turns()
    order: list[str] = []

    async def record(target: str, name: str, work_s: float) -> None:
        with turns.in_progress(target):
            await turns.give_way(target)
            await asyncio.sleep(work_s)
            order.append(name)

    # The slow target's record comes first, the quick ones in the same turn of the loop (one poll's records).
    await asyncio.wait_for(asyncio.gather(record("slow", "slow", 0), record("fast", "q1", 0.02),
                                          record("fast", "q2", 0.05)), 2)
    assert order == ["q1", "q2", "slow"]
    assert turns.quick_in_progress == 0


async def test_a_target_never_gives_way_to_its_own_records_however_slow_it_gets() -> None:
    """The reverted attempt counted a record in as quick at entry and judged it again later: a lone target whose
    answers slowed under a burst made its later records wait for its earlier ones (p50 1 s -> 7 s)."""
    turns = Turns(max_wait_s=5)
    turns.observed("lone", 0.02)
    release = asyncio.Event()

    async def earlier() -> None:
        with turns.in_progress("lone"):  # counted in while the target was quick
            await release.wait()

    busy = [asyncio.create_task(earlier()) for _ in range(8)]
    await asyncio.sleep(0)
    turns.observed("lone", 3.0)  # its answers slow down past SLOW_MIN_S: slow, with no other target to compare
    assert turns.slow("lone")
    loop = asyncio.get_running_loop()
    began = loop.time()
    with turns.in_progress("lone"):
        await turns.give_way("lone")
    assert loop.time() - began < 0.05, "its own earlier records in progress held it"
    release.set()
    await asyncio.gather(*busy)
    assert turns.quick_in_progress == 0


def _busy(turns: Turns, target: str, release: asyncio.Event) -> asyncio.Task[None]:
    """A record of `target` in progress until `release` is set."""
    async def record() -> None:
        with turns.in_progress(target):
            await release.wait()
    return asyncio.create_task(record())


async def test_a_record_gives_way_for_a_bounded_time_only() -> None:
    turns = _turns(max_wait_s=0.1)
    release = asyncio.Event()
    busy = _busy(turns, "fast", release)
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.wait_for(turns.give_way("slow"), 2)  # never starved by a quick target that stays busy
    assert 0.09 <= loop.time() - began < 1.0
    release.set()
    await busy
    assert turns.quick_in_progress == 0
    began = loop.time()
    await turns.give_way("slow")  # nothing else in progress: no wait
    assert loop.time() - began < 0.05


async def test_a_record_giving_way_goes_on_as_soon_as_its_target_answers_quickly_again() -> None:
    turns = _turns()
    release = asyncio.Event()
    busy = _busy(turns, "fast", release)
    await asyncio.sleep(0)
    waiting = asyncio.create_task(turns.give_way("slow"))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    turns.observed("slow", 0.03)  # an earlier record of it has just been answered, quickly
    await asyncio.wait_for(waiting, 0.5)
    release.set()
    await busy


async def test_records_that_gave_way_go_one_step_at_a_time_and_a_quick_record_coming_meanwhile_goes_first() -> None:
    turns = _turns()
    order: list[str] = []
    first = asyncio.Event()

    async def fast(name: str, until: asyncio.Event | None = None) -> None:
        with turns.in_progress("fast"):
            await turns.give_way("fast")
            if until is not None:
                await until.wait()
            order.append(name)

    async def slow(name: str) -> None:
        with turns.in_progress("slow"):
            await turns.give_way("slow")
            order.append(name)
            if name == "s1":  # its step starts a quick record (as a poll would): the others wait for it
                asyncio.get_running_loop().call_soon(lambda: tasks.append(asyncio.create_task(fast("q2"))))
            await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(fast("q1", first))]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(slow(f"s{n}")) for n in range(1, 4)]
    await asyncio.sleep(0.05)
    assert order == []
    first.set()
    for _ in range(100):
        await asyncio.sleep(0.01)
        if len(order) == 5:
            break
    await asyncio.gather(*tasks)
    assert order[:3] == ["q1", "s1", "q2"], order
    assert sorted(order[3:]) == ["s2", "s3"]


async def test_a_slow_targets_record_does_not_wait_while_the_others_only_wait_for_their_answers() -> None:
    turns = _turns()
    answered = asyncio.Event()
    posting = asyncio.Event()

    async def quick_record() -> None:
        with turns.in_progress("fast"):
            with turns.awaiting_answer("fast"):  # nothing to do until the target answers: the loop is free
                posting.set()
                await answered.wait()

    quick = asyncio.create_task(quick_record())
    await posting.wait()
    assert turns.quick_in_progress == 0
    await asyncio.wait_for(turns.give_way("slow"), 0.1)
    answered.set()
    await quick
    assert turns.quick_in_progress == 0


async def test_right_after_start_a_target_whose_first_request_waits_past_the_threshold_is_slow_before_answering(
        ) -> None:
    """Cold start: no target has answered. The one whose first request has waited past SLOW_MIN_S is slow at
    once (its records waiting for their slot stop counting as a quick target's), and its records give way to
    a quick target's in progress; its first answer, if quick, makes it quick again."""
    turns = Turns(max_wait_s=5)
    release, answered = asyncio.Event(), asyncio.Event()
    sent = asyncio.Event()

    async def cold_record() -> None:
        with turns.in_progress("cold"), turns.awaiting_answer("cold"):
            sent.set()
            await answered.wait()
        turns.observed("cold", 0.03)

    posting = asyncio.create_task(cold_record())
    queued = _busy(turns, "cold", release)  # another record of it, waiting for a slot
    await sent.wait()
    await asyncio.sleep(0)
    assert not turns.slow("cold") and turns.quick_in_progress == 1
    await asyncio.sleep(SLOW_MIN_S + 0.1)  # nothing else happens meanwhile: judged when the wait crosses it
    assert turns.slow("cold")
    assert turns.quick_in_progress == 0  # its queued record no longer counts as a quick target's
    quick = _busy(turns, "quick", release)
    await asyncio.sleep(0)
    waiting = asyncio.create_task(turns.give_way("cold"))
    await asyncio.sleep(0.05)
    assert not waiting.done(), "a slow target's record went before a quick target's record in progress"
    answered.set()  # its answer comes, quickly after all: it is quick again, its record goes on
    await asyncio.wait_for(waiting, 0.5)
    await posting
    assert not turns.slow("cold")
    release.set()
    await asyncio.gather(queued, quick)
    assert turns.quick_in_progress == 0


async def test_a_request_waiting_less_than_five_times_the_quickest_other_targets_pace_is_not_slow() -> None:
    turns = Turns(max_wait_s=5)
    turns.observed("steady", 0.3)  # the quickest other target answers in 0.3 s: slow means above 1.5 s
    release = asyncio.Event()

    async def record() -> None:
        with turns.in_progress("new"), turns.awaiting_answer("new"):
            await release.wait()

    task = asyncio.create_task(record())
    await asyncio.sleep(SLOW_MIN_S + 0.2)
    await asyncio.wait_for(turns.give_way("new"), 0.1)  # judged at its next step too: not slow
    assert not turns.slow("new")
    release.set()
    await task
