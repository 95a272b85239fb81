"""A header slow-loris, as its own process: `python -m tests.support.slowloris PORT CONNECTIONS SECONDS`.

Each connection sends a request line and then one header line a second, never finishing its head,
and reconnects a second after the server closes it. Prints how many connections it opened in all.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import sys


async def trickle(port: int, stop: asyncio.Event, opened: list[int]) -> None:
    while not stop.is_set():
        writer = None
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            opened[0] += 1
            writer.write(b"POST /fhir HTTP/1.1\r\nHost: relais\r\n")
            while not stop.is_set():
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(reader.read(1), 1.0)  # b"" (or data): the server closed or answered
                    break
                writer.write(b"X-Slow: a\r\n")
        except OSError:
            pass
        finally:
            if writer is not None:
                writer.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def main(port: int, connections: int, seconds: float) -> int:
    stop, opened = asyncio.Event(), [0]
    tasks = [asyncio.create_task(trickle(port, stop, opened)) for _ in range(connections)]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return opened[0]


if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    print(asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))), flush=True)
