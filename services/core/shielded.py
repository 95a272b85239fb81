"""Database work that a cancellation waits for instead of cutting short.

A task cancelled while SQLAlchemy awaits the aiosqlite driver (a lane stopped when its stage loses a
partition, a stage stopped at SIGTERM) makes SQLAlchemy invalidate the connection in the middle of its
transaction. Seen here (issue 16): the SQLite write lock then outlives every connection of the process,
and every process writing the ledger waits out SQLite's 30 s timeout, again and again.

`@shielded` runs a coroutine function in its own task: a cancellation of the caller waits until that
task has finished (its transaction committed or rolled back, its connection back in the pool), then
goes on. The work itself is never cancelled, so a transaction scope always ends by commit or rollback.
Keep shielded work short and bounded (one transaction; SQLite's busy timeout bounds the wait).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


async def finish(work: Awaitable[T]) -> T:
    """Await `work` to its end even if the caller is cancelled meanwhile; then the cancellation goes on."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait([task])  # unlike awaiting the task, a cancelled wait leaves the task running
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if not task.cancelled():
            task.exception()  # retrieved: the caller was cancelled, what the work raised no longer matters
        raise asyncio.CancelledError
    return task.result()


def shielded(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Decorate a coroutine function whose I/O (a database transaction) must end by itself, never mid-way."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        return await finish(fn(*args, **kwargs))

    return wrapper
