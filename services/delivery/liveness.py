"""Which run of which process made a delivery attempt, and whether that run is certainly over.

The journal's `process` column names a delivery process for people (`RELAIS_INSTANCE_ID`, which a
supervised worker keeps across restarts, or `host-pid`); it cannot say whether the process that wrote a
row is still running. An *incarnation* can: the host name, the host's boot id, the PID namespace, the PID
and the process's start time (clock ticks since boot, field 22 of `/proc/<pid>/stat`). A PID is reused,
a (boot, PID namespace, PID, start time) is not.

An incarnation is *certainly dead* only when all of this holds, read from `/proc`:

* it ran on this host (same host name), in this boot (same `/proc/sys/kernel/random/boot_id`: a
  different boot id may be this host rebooted, or another machine that has the same host name — two
  containers named alike — so it proves nothing), and in this PID namespace (same `/proc/self/ns/pid`:
  a process in another container on this machine is invisible from here, which must not read as dead);
* and no process with that PID and that start time is running now (none with that PID; one with another
  start time, i.e. the PID was reused; or a zombie, which runs no code and whose sockets are closed).

Anything else — another host, another boot, another container, a row written before incarnations were
recorded, a `/proc` that cannot be read — is *not known to be dead*, and the journal treats it as alive.
Without `/proc` (not Linux) no incarnation is recorded at all.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

SEP = "|"


@dataclass(frozen=True, slots=True)
class Incarnation:
    """One run of one process; `str()` is how the journal stores it (column `incarnation`)."""

    host: str
    boot: str
    pidns: str
    pid: int
    start: int  # clock ticks after boot at which the process started

    def __str__(self) -> str:
        return SEP.join((self.host, self.boot, self.pidns, str(self.pid), str(self.start)))

    @classmethod
    def parse(cls, text: str | None) -> Incarnation | None:
        """The incarnation `str()` wrote, or None (no value, or one this version cannot read: not known dead)."""
        parts = (text or "").split(SEP)
        if len(parts) != 5 or not all(parts):
            return None
        try:
            return cls(parts[0], parts[1], parts[2], int(parts[3]), int(parts[4]))
        except ValueError:
            return None

    def same_pid_space(self, other: Incarnation) -> bool:
        """True when a PID of `other` means the same process as a PID of this one (one host, boot, namespace)."""
        return (self.host, self.boot, self.pidns) == (other.host, other.boot, other.pidns)


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of process `pid` on this host, None when there is none; OSError if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    # "pid (comm) state ppid ... starttime ...": comm may hold spaces and parentheses, so split after the last ')'.
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[19])  # fields 3 and 22 of proc(5)


def incarnation_of(pid: int) -> Incarnation | None:
    """The incarnation of running process `pid` of this host, or None (no such process, or no readable /proc)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        pidns = os.readlink(f"/proc/{pid}/ns/pid").removeprefix("pid:").strip("[]")
        stat = _stat(pid)
    except (OSError, ValueError, IndexError):
        return None
    if stat is None or not boot or not pidns:
        return None
    return Incarnation(socket.gethostname(), boot, pidns, pid, stat[1])


_mine: dict[int, Incarnation | None] = {}


def this_incarnation() -> Incarnation | None:
    """This process's incarnation (read once per PID: a forked child is another incarnation than its parent)."""
    pid = os.getpid()
    if pid not in _mine:
        _mine[pid] = incarnation_of(pid)
    return _mine[pid]


def certainly_dead(text: str | None, here: Incarnation | None) -> bool:
    """True only when incarnation `text` ran in `here`'s PID space and no longer runs (see the module docstring)."""
    them = Incarnation.parse(text)
    if them is None or here is None or not them.same_pid_space(here):
        return False
    try:
        stat = _stat(them.pid)
    except (OSError, ValueError, IndexError):
        return False  # unreadable says nothing: not known dead
    if stat is None:
        return True
    state, start = stat
    return start != them.start or state in ("Z", "X")
