"""Doorbells: a process that commits records to the embedded log wakes the members that read them at once.

Without them, an idle member in another process notices new records only when it next looks at the log
(every 50 ms): each hop of a transfer (ingress, validator, router, delivery) waited up to that long, and
that wait, random, was most of a fast target's latency beside a burst for slow ones (issue 15).

Each subscription binds a UNIX datagram socket in Linux's abstract namespace, named from the log's path and
its member id (`bell_name`): no file to leave behind after a `kill -9` (the name goes with the socket), no
108-byte path limit, and a writer can compute the name of any lease holder it reads from the log. Once its
transaction is committed, a writer sends one empty datagram to each member holding a partition of a topic it
wrote (`Ringer`); the lease holders are re-read every HOLDERS_TTL_S.

A ring is only a hint and may be lost (a holder that took its partitions a moment ago, a full socket buffer, a
system without abstract sockets): members still look at the log now and then (`services.core.embedded`'s
BELL_POLL_S, or IDLE_POLL_S without a bell), so a lost ring costs latency, never a record. A ring carries
nothing: a stranger's datagram (abstract names are open to the machine's processes) only makes a member look
at the log, and a name taken first leaves that member polling as without a bell.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path

from services.core.errors import BusUnavailable
from services.core.logging import get_logger

log = get_logger(__name__)

HOLDERS_TTL_S = 1.0  # a ringer re-reads who holds which topic this often (a lease moves in seconds)

__all__ = ["Bell", "Ringer", "bell_name"]


@functools.lru_cache(maxsize=4096)  # a writer rings the same few members after every commit; realpath costs syscalls
def bell_name(log_path: Path, member: str) -> bytes:
    """The abstract socket name of `member`'s bell for the log at `log_path` (fixed length, any path)."""
    digest = hashlib.sha256(f"{os.path.realpath(log_path)}\0{member}".encode()).hexdigest()[:40]
    return b"\0relais-bell-" + digest.encode()


class Bell:
    """The socket a member is rung on: each ring sets `wake` (which the member clears before it looks)."""

    def __init__(self, sock: socket.socket, wake: asyncio.Event) -> None:
        self._sock = sock
        self._wake = wake
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_readable)

    @classmethod
    def open(cls, log_path: Path, member: str, wake: asyncio.Event) -> Bell | None:
        """Bind `member`'s bell, or None where it cannot be (no abstract sockets here): the member then polls."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(bell_name(log_path, member))
        except OSError as exc:
            sock.close()
            log.info("embedded log doorbell unavailable; idle members poll the log instead", error=str(exc))
            return None
        return cls(sock, wake)

    def _on_readable(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while True:  # every ring waiting says the same thing: drain them all, wake once
                self._sock.recv(64)
        self._wake.set()

    def close(self) -> None:
        with contextlib.suppress(ValueError, RuntimeError):  # the loop may be closing already
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()


class Ringer:
    """Rings the members holding partitions of the topics a commit wrote to.

    `read_holders` reads the log's leases: physical topic -> the members holding any of its partitions. The
    bus re-reads them every HOLDERS_TTL_S (`refresh_forever`); a ring itself never waits nor raises: it comes
    after a commit, which must not look failed because a hint could not be given.
    """

    def __init__(self, log_path: Path, read_holders: Callable[[], Awaitable[Mapping[str, set[str]]]]) -> None:
        self._log_path = log_path
        self._read_holders = read_holders
        self._holders: Mapping[str, set[str]] = {}
        self._sock: socket.socket | None = None

    def ring(self, topics: Iterable[str], skip: Iterable[str] = ()) -> int:
        """Ring every known holder of `topics` but those in `skip` (this process's own); how many were rung."""
        members = set().union(*(self._holders.get(t, set()) for t in topics)) - set(skip)
        if not members:
            return 0
        rung = 0
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
        except OSError as exc:  # out of descriptors, say: the members poll
            log.debug("embedded log doorbell: no socket to ring with", error=str(exc))
            return 0
        for member in members:
            try:
                self._sock.sendto(b"", bell_name(self._log_path, member))
                rung += 1
            except BlockingIOError:
                rung += 1  # its buffer is full of rings it has not read yet: it is awake already
            except OSError:
                pass  # gone (a dead member's lease not yet taken over), or no bell there: it polls
        return rung

    async def refresh(self) -> None:
        """Read who holds what now (a failed read keeps what was known: a hint only)."""
        try:
            self._holders = await self._read_holders()
        except BusUnavailable as exc:
            log.debug("embedded log doorbell: lease holders not read", error=str(exc))

    async def refresh_forever(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(HOLDERS_TTL_S)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
