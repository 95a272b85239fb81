"""Connections that cannot starve ingress: a deadline for request headers, a cap on open connections.

uvicorn bounds neither the time a client may take to send its request headers nor how many
connections may sit waiting for them: 1,500 clients trickling one header byte at a time hold 1,500
file descriptors for ever, and past the process's limit `accept()` fails for everyone (and logs it
each time). This protocol (uvicorn's h11 protocol plus two rules) keeps a good client served:

* **Header deadline.** A connection must deliver a complete request head within
  `RELAIS_HTTP_HEADER_TIMEOUT_S` of connecting (or of its previous response); otherwise it is closed.
* **Connection cap.** At most `RELAIS_HTTP_MAX_CONNECTIONS` (and never more than the file-descriptor
  limit allows, with room for one accept burst: see `accept_backlog`) are open. A new connection over
  the cap evicts the oldest one still waiting for its headers; only when every connection is busy
  with a request is the newcomer closed.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from services.core.settings import Settings

FD_RESERVE = 64  # descriptors kept, beyond those open at start, for the ledger, the bus and outgoing connections


UVICORN_BACKLOG = 2048


def _usable_fds() -> int | None:
    """Descriptors left for connections: the limit, minus those already open, minus a reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = 0  # no /proc: the reserve alone
    return max(soft - open_now - FD_RESERVE, 16)


LISTEN_QUEUE = 4096  # the kernel's queue of connections not yet accepted (Linux caps it at somaxconn)


def widen_listen_queue(servers: Sequence[asyncio.base_events.Server]) -> None:
    """Give the listening sockets a long kernel queue, after asyncio sized its accept bursts on `backlog`.

    asyncio uses one number for both; a short queue overflows while attackers reconnect faster than a
    busy loop accepts, and a good client's SYN is then dropped and retried a second later.
    """
    for server in servers:
        for wrapped in server.sockets:  # asyncio's TransportSocket hides listen(): borrow the descriptor
            sock = socket.socket(fileno=wrapped.fileno())
            try:
                sock.listen(LISTEN_QUEUE)
            finally:
                sock.detach()  # the descriptor stays asyncio's


def max_connections(wanted: int) -> int:
    """`wanted`, lowered so that the open connections plus one accept burst fit the descriptor limit."""
    usable = _usable_fds()
    return wanted if usable is None else max(1, min(wanted, usable - ACCEPT_BURSTS * accept_backlog()))


ACCEPT_BURSTS = 3  # accept bursts that may overlap before the evictions they cause have closed sockets


def accept_backlog() -> int:
    """The most connections asyncio accepts in one go (its `backlog`), before any of them reaches
    `connection_made` and the cap: an eighth of the usable descriptors, so that a few overlapping bursts
    of reconnecting attackers cannot push the process past its limit (then `accept()` fails for everyone
    and asyncio stops accepting for a second). The kernel's queue is widened apart: `widen_listen_queue`."""
    usable = _usable_fds()
    return UVICORN_BACKLOG if usable is None else max(8, min(UVICORN_BACKLOG, usable // 8))


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and a connection cap (see the module docstring)."""

    header_timeout_s: float = 10.0
    max_connections: int = 1000

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections and not self._evict_oldest_waiting():
            transport.close()  # every connection is busy with a real request: this one waits its turn elsewhere
            return
        self._arm()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the request head is complete
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()  # the next request on a kept-alive connection has the same deadline
        super().on_response_complete()  # handles pipelined requests, which disarm again

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # --- the two rules -------------------------------------------------------------------
    def _waiting(self) -> OrderedDict[HeaderDeadline, None]:
        """Connections of this server still waiting for a request head, oldest first."""
        state: Any = self.server_state
        waiting: OrderedDict[HeaderDeadline, None] | None = getattr(state, "relais_waiting", None)
        if waiting is None:
            waiting = OrderedDict()
            state.relais_waiting = waiting
        return waiting

    def _arm(self) -> None:
        if self.transport.is_closing():
            return
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout_s, self._too_slow)
        self._waiting()[self] = None

    def _disarm(self) -> None:
        deadline = getattr(self, "_deadline", None)
        if deadline is not None:
            deadline.cancel()
            self._deadline = None
        self._waiting().pop(self, None)

    def _too_slow(self) -> None:
        self._deadline = None
        self._waiting().pop(self, None)
        if not self.transport.is_closing():
            self.transport.close()

    def _evict_oldest_waiting(self) -> bool:
        waiting = self._waiting()
        while waiting:
            oldest, _ = waiting.popitem(last=False)
            if oldest is not self and not oldest.transport.is_closing():
                oldest._disarm()
                oldest.transport.close()
                return True
        return False


def guarded(settings: Settings, base: type[H11Protocol] = H11Protocol) -> type[H11Protocol]:
    """The protocol class uvicorn should use for ingress: `base` with the header deadline and the cap."""
    return type("GuardedH11Protocol", (HeaderDeadline, base), {
        "header_timeout_s": settings.http_header_timeout_s,
        "max_connections": max_connections(settings.http_max_connections),
    })
