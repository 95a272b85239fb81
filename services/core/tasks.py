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
