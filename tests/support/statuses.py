"""Wait for many transfers' final statuses without loading the broker under test.

Polling every pending status URL at once, twice a second, is hundreds of requests per second on the
same two cores the pipeline needs: the fault tests spent half their time slowing themselves down.
Transfers finish roughly in the order they were accepted, so each round asks oldest first, a chunk
at a time, and stops at the first chunk where nothing has finished yet.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

CHUNK = 25


async def final_statuses(client: httpx.AsyncClient, url: str, headers: dict[str, str], ids: list[str],
                         timeout_s: float = 240) -> dict[str, dict[str, Any]]:
    """transfer id -> its status body once final (`GET /transfers/{id}` answers 200), for every id.

    Fails, naming how many are missing, if some are still not final after `timeout_s`.
    """
    done: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while len(done) < len(ids) and time.monotonic() < deadline:
        pending = [t for t in ids if t not in done]
        for start in range(0, len(pending), CHUNK):
            chunk = pending[start:start + CHUNK]
            results = await asyncio.gather(*(client.get(f"{url}/transfers/{t}", headers=headers) for t in chunk),
                                           return_exceptions=True)
            # A connection the server closed as the client reused it (keep-alive, a loaded machine) says nothing
            # about the transfer: that one is asked again next round. Any other exception is the test's to see.
            for r in results:
                if isinstance(r, BaseException) and not isinstance(r, httpx.TransportError):
                    raise r
            answers = {t: r for t, r in zip(chunk, results, strict=True) if isinstance(r, httpx.Response)}
            broken = [(t, a.status_code) for t, a in answers.items() if a.status_code not in (200, 202)]
            assert not broken, f"an accepted transfer's status URL must answer 202 or 200: {broken[:5]}"
            finished = {t: a.json() for t, a in answers.items() if a.status_code == 200}
            done |= finished
            if not finished:
                break  # the older ones are still moving; the younger ones will not be done either
        if len(done) < len(ids):
            await asyncio.sleep(0.5)
    assert len(done) == len(ids), f"{len(ids) - len(done)} transfer(s) never reached a final status"
    return done
