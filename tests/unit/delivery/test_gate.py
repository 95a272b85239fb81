"""TargetGate: a target's slots, and its waiting area bounded by count and age."""

from __future__ import annotations

import asyncio

import pytest

from services.delivery.gate import GateClosed, MovedOut, TargetGate


async def test_slots_then_a_bounded_fifo_waiting_area() -> None:
    gate = TargetGate(slots=1, records=2, wait_s=5)
    assert await gate.enter()
    first, second = asyncio.create_task(gate.enter()), asyncio.create_task(gate.enter())
    await asyncio.sleep(0)
    assert gate.waiting == 2
    assert not await gate.enter()  # full: refused at once, it never waits
    gate.leave()
    assert await first and not second.done()  # the longest-waiting record gets the slot
    gate.leave()
    assert await second
    gate.leave()
    assert gate.free == 1 and gate.waiting == 0


async def test_a_record_waiting_longer_than_its_bound_is_turned_away() -> None:
    gate = TargetGate(slots=1, records=10, wait_s=0.05)
    assert await gate.enter()
    assert not await gate.enter()  # waited 50 ms for the slot: move it out
    assert gate.waiting == 0
    gate.leave()
    assert gate.free == 1


async def test_a_cancelled_waiter_gives_up_its_place_and_never_leaks_a_slot() -> None:
    gate = TargetGate(slots=1, records=10, wait_s=5)
    assert await gate.enter()
    waiter = asyncio.create_task(gate.enter())
    await asyncio.sleep(0)
    gate.leave()  # the slot is handed to the waiter ...
    waiter.cancel()  # ... which is cancelled before it runs: the slot must come back
    await asyncio.gather(waiter, return_exceptions=True)
    assert gate.free == 1 and gate.waiting == 0


async def test_closing_lets_waiting_records_go_and_refuses_new_ones() -> None:
    gate = TargetGate(slots=1, records=10, wait_s=60)
    assert await gate.enter()
    waiter = asyncio.create_task(gate.enter())
    await asyncio.sleep(0)
    gate.close()
    with pytest.raises(GateClosed):
        await waiter
    with pytest.raises(GateClosed):
        await gate.enter()
    gate.leave()  # the record holding a slot finishes normally


async def test_releasing_a_partitions_waiters_lets_them_go_and_keeps_the_others_in_order() -> None:
    gate = TargetGate(slots=1, records=10, wait_s=30)
    assert await gate.enter("p0")
    waiting = [asyncio.create_task(gate.enter(tag)) for tag in ("p1", "p0", "p2", "p1")]
    await asyncio.sleep(0)
    assert gate.release({"p1"}) == 2  # handed over: those leave now, unattempted
    results = await asyncio.gather(waiting[0], waiting[3], return_exceptions=True)
    assert all(isinstance(r, GateClosed) for r in results)
    assert gate.waiting == 2 and not gate.closed  # the others keep their places
    gate.leave()
    assert await waiting[1] and not waiting[2].done()  # p0's record goes next, then p2's
    gate.leave()
    assert await waiting[2]
    assert gate.release({"p1"}) == 0


async def test_a_waiting_record_let_out_leaves_for_a_durable_wait_and_the_others_keep_their_places() -> None:
    gate = TargetGate(slots=1, records=10, wait_s=30)
    assert await gate.enter()
    waiting = [asyncio.create_task(gate.enter()) for _ in range(3)]
    await asyncio.sleep(0)
    since = gate.waiters_since()
    assert len(since) == 3 and [t for t, _ in since] == sorted(t for t, _ in since)  # oldest first
    gate.let_out(since[0][1])  # the longest-waiting one
    with pytest.raises(MovedOut):
        await waiting[0]
    assert gate.waiting == 2 and gate.free == 0  # it took no slot
    gate.let_out(since[0][1])  # twice: nothing more happens
    gate.leave()
    assert await waiting[1] and not waiting[2].done()
    gate.leave()
    assert await waiting[2]
