"""Stopping a background task (a pruner, a heartbeat, a notifier): one way, so every stop() ends the same."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait until it has ended, its cleanup run: nothing it does outlives its owner's stop().

    Its cancellation is the expected end and is not raised; an error it raised (in its cleanup too) is.
    """
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def wait_until_set(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait for `event` at most `timeout_s`; True if it is set.

    Not `asyncio.wait_for(event.wait(), ...)`: on Python 3.11 it swallows a cancellation that arrives as the
    event is set (CPython gh-86296), so the task goes on and the stop() waiting for it hangs.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()
    return event.is_set()
