"""Turns: records for targets not known to be quick give way to quick targets' records, for a bounded time."""

from __future__ import annotations

import asyncio
import math

import pytest

from services.delivery.turns import GIVE_WAY_MAX_S, QUICK_S, Turns, gives_way, is_quick


@pytest.mark.parametrize(("p50_s", "quick"), [
    (0.007, True),
    (QUICK_S, True),
    (QUICK_S * 1.01, False),
    (5.0, False),
    (math.inf, False),  # no answer observed yet: not known to be quick
])
def test_a_target_is_quick_when_its_observed_median_is_within_the_bound(p50_s: float, quick: bool) -> None:
    assert is_quick(p50_s) is quick


@pytest.mark.parametrize(("quick", "in_progress", "waited_s", "waits"), [
    (True, 5, 0.0, False),  # quick targets never wait, not even for each other
    (False, 0, 0.0, False),  # nothing quick in progress: it goes at once
    (False, 1, 0.0, True),  # a slow or unproven target's record goes after the quick ones in progress ...
    (False, 60, GIVE_WAY_MAX_S * 0.99, True),
    (False, 60, GIVE_WAY_MAX_S, False),  # ... but never waits longer than the bound: no starvation
    (False, 60, GIVE_WAY_MAX_S * 10, False),
])
def test_who_goes_first(quick: bool, in_progress: int, waited_s: float, waits: bool) -> None:
    assert gives_way(quick, in_progress, waited_s) is waits


async def test_a_slow_targets_record_starts_once_the_quick_ones_in_progress_are_done() -> None:
    turns = Turns(max_wait_s=5)
    order: list[str] = []

    async def quick(name: str, work_s: float) -> None:
        with turns.in_progress(True):
            await turns.give_way(True)
            await asyncio.sleep(work_s)
            order.append(name)

    async def slow() -> None:
        with turns.in_progress(False):
            await turns.give_way(False)
            order.append("slow")

    # The slow target's record comes first, the quick ones in the same turn of the loop (one poll's records).
    await asyncio.wait_for(asyncio.gather(slow(), quick("q1", 0.02), quick("q2", 0.05)), 2)
    assert order == ["q1", "q2", "slow"]
    assert turns.quick_in_progress == 0


async def test_a_record_gives_way_for_a_bounded_time_only() -> None:
    turns = Turns(max_wait_s=0.1)
    release = asyncio.Event()

    async def busy_quick_target() -> None:
        with turns.in_progress(True):
            await release.wait()

    busy = asyncio.create_task(busy_quick_target())
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.wait_for(turns.give_way(False), 2)  # never starved by a quick target that stays busy
    assert 0.09 <= loop.time() - began < 1.0
    release.set()
    await busy
    assert turns.quick_in_progress == 0
    began = loop.time()
    await turns.give_way(False)  # nothing quick in progress: no wait
    assert loop.time() - began < 0.05


async def test_records_that_gave_way_go_one_step_at_a_time_and_a_quick_record_coming_meanwhile_goes_first() -> None:
    turns = Turns(max_wait_s=5)
    steps: list[str] = []
    first, second = asyncio.Event(), asyncio.Event()
    later: list[asyncio.Task[None]] = []

    async def quick(name: str, release: asyncio.Event) -> None:
        with turns.in_progress(True):
            await release.wait()
            steps.append(name)

    async def slow(n: int) -> None:
        await turns.give_way(False)
        steps.append(f"s{n}")
        if n == 1:  # a quick target's record comes while the slow ones take their steps
            later.append(asyncio.create_task(quick("q2", second)))
        await asyncio.sleep(0)

    q1 = asyncio.create_task(quick("q1", first))
    waiting = [asyncio.create_task(slow(n)) for n in range(4)]
    await asyncio.sleep(0.01)
    assert steps == []  # all four give way to q1
    first.set()
    await asyncio.sleep(0.01)
    assert steps == ["q1", "s0", "s1"]  # one by one, and q2 stops the chain at once
    second.set()
    await asyncio.wait_for(asyncio.gather(q1, *later, *waiting), 2)
    assert steps == ["q1", "s0", "s1", "q2", "s2", "s3"]
