"""Doorbells: a process that commits records to the embedded log wakes the members that read them at once.

Without them, an idle member in another process notices new records only when it next looks at the log
(every 50 ms): each hop of a transfer (ingress, validator, router, delivery) waited up to that long, and
that wait, random, was most of a fast target's latency beside a burst for slow ones (issue 15).

Each subscription binds a UNIX datagram socket in Linux's abstract namespace, named from the log's path and
its member id (`bell_name`): no file to leave behind after a `kill -9` (the name goes with the socket), no
108-byte path limit, and a writer can compute the name of any lease holder it reads from the log. Once its
transaction is committed, a writer sends one empty datagram to each member holding a partition of a topic it
wrote (`Ringer`); the lease holders are re-read at most every HOLDERS_TTL_S.

A ring is only a hint and may be lost (a holder that took its partitions a moment ago, a full socket buffer, a
system without abstract sockets): members still look at the log now and then (`services.core.embedded`'s
BELL_POLL_S, or IDLE_POLL_S without a bell), so a lost ring costs latency, never a record.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path

from services.core.errors import BusUnavailable
from services.core.logging import get_logger
from services.core.tasks import cancel_and_wait

log = get_logger(__name__)

HOLDERS_TTL_S = 1.0  # a ringer re-reads who holds which topic at most this often (a lease moves in seconds)

__all__ = ["Bell", "Ringer", "bell_name"]


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

    `read_holders` reads the log's leases: physical topic -> the members holding any of its partitions.
    """

    def __init__(self, log_path: Path, read_holders: Callable[[], Awaitable[Mapping[str, set[str]]]]) -> None:
        self._log_path = log_path
        self._read_holders = read_holders
        self._holders: Mapping[str, set[str]] = {}
        self._read_at = -HOLDERS_TTL_S
        self._names: dict[str, bytes] = {}
        self._sock: socket.socket | None = None
        self._refresh: asyncio.Task[None] | None = None

    async def ring(self, topics: Iterable[str], skip: Iterable[str] = ()) -> int:
        """Ring every holder of `topics` but those in `skip` (this process's own members); how many were rung.

        The first ring reads the holders first; later ones ring with what is known and refresh it in the
        background once it is HOLDERS_TTL_S old, so a commit never waits on that read."""
        if time.monotonic() - self._read_at >= HOLDERS_TTL_S:
            if not self._holders:
                await self._reread()
            elif self._refresh is None or self._refresh.done():
                self._refresh = asyncio.create_task(self._reread(), name="embedded-log-doorbell-holders")
        members = set().union(*(self._holders.get(t, set()) for t in topics)) - set(skip)
        if not members:
            return 0
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
        rung = 0
        for member in members:
            name = self._names.get(member)
            if name is None:
                name = self._names[member] = bell_name(self._log_path, member)
            try:
                self._sock.sendto(b"", name)
                rung += 1
            except BlockingIOError:
                rung += 1  # its buffer is full of rings it has not read yet: it is awake already
            except OSError:
                pass  # gone (a dead member's lease not yet taken over), or no bell there: it polls
        return rung

    async def _reread(self) -> None:
        self._read_at = time.monotonic()
        try:
            self._holders = await self._read_holders()
        except BusUnavailable as exc:  # a hint only: a failed read leaves the members to their polling
            log.debug("embedded log doorbell: lease holders not read", error=str(exc))
        self._names = {m: n for m, n in self._names.items() if any(m in h for h in self._holders.values())}

    async def close(self) -> None:
        if self._refresh is not None:
            await cancel_and_wait(self._refresh)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
