"""cancel_and_wait(): a background task is over (its cleanup run) when its owner's stop() returns; wait_until_set()
never swallows a cancellation."""

from __future__ import annotations

import asyncio

import pytest

from services.core.tasks import cancel_and_wait, wait_until_set


async def test_a_running_task_is_cancelled_and_its_cleanup_has_run() -> None:
    cleaned = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0)  # cleanup that itself awaits: cancel() alone would return before it
            cleaned.set()

    task = asyncio.create_task(forever())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(task), 5)
    assert task.cancelled() and cleaned.is_set()


async def test_a_finished_task_is_left_as_it_ended() -> None:
    task = asyncio.create_task(asyncio.sleep(0, result=7))
    await task
    await cancel_and_wait(task)
    assert task.result() == 7


async def test_an_error_while_stopping_is_not_swallowed() -> None:
    async def fails_on_cancel() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RuntimeError("could not clean up") from None

    task = asyncio.create_task(fails_on_cancel())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="could not clean up"):
        await cancel_and_wait(task)


async def test_wait_until_set_says_whether_the_event_was_set() -> None:
    event = asyncio.Event()
    assert await wait_until_set(event, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_until_set(event, 5) is True


async def test_a_cancellation_that_arrives_as_the_event_is_set_is_not_swallowed() -> None:
    # asyncio.wait_for(event.wait(), ...) returns normally here on Python 3.11 (CPython gh-86296): the task
    # carries on, and whoever cancelled it to stop waits for ever.
    event = asyncio.Event()
    waiting = asyncio.create_task(wait_until_set(event, 10))
    await asyncio.sleep(0)  # it waits for the event
    event.set()
    waiting.cancel()  # in the same turn of the loop
    with pytest.raises(asyncio.CancelledError):
        await waiting
