"""`@shielded`: a cancelled caller waits for the work to end, then is cancelled; the work is never cut short."""

from __future__ import annotations

import asyncio

import pytest

from services.core.shielded import shielded


async def test_a_cancelled_caller_waits_for_the_work_then_is_cancelled() -> None:
    steps: list[str] = []
    release = asyncio.Event()

    @shielded
    async def transaction() -> str:
        steps.append("begin")
        await release.wait()
        steps.append("commit")
        return "done"

    caller = asyncio.create_task(transaction())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    caller.cancel()
    await asyncio.sleep(0.01)
    assert not caller.done() and steps == ["begin"]  # still waiting for the transaction
    caller.cancel()  # a second cancellation changes nothing
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert steps == ["begin", "commit"]


async def test_without_cancellation_it_returns_or_raises_what_the_work_does() -> None:
    @shielded
    async def ok(n: int) -> int:
        await asyncio.sleep(0)
        return n * 2

    @shielded
    async def fails() -> None:
        raise ValueError("no")

    assert await ok(21) == 42
    with pytest.raises(ValueError, match="no"):
        await fails()
