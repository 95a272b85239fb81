"""Consumer groups across the processes of one machine on the embedded log: members and partition leases.

Each member of a group is a row in `members` (host, pid, expiry); each (group, topic, partition) is
a row in `leases` naming its holder and an epoch. Members share the partitions evenly; a member
whose process is gone (same host, pid not running) or that was not renewed for LEASE_S is dead
and its partitions are free at once; taking a partition bumps its epoch, and a commit checks its
epoch in its own transaction (`check_fence`), so a stale holder can never commit.
"""

from __future__ import annotations

import math
import os
import socket
import sqlite3
import time
from collections.abc import Mapping, Sequence

from services.core.errors import TransientError

LEASE_S = 30.0  # a member whose process is frozen loses its partitions after this (a dead one: at once)
RENEW_S = 1.0  # the process's own thread renews its members this often, whatever its event loop is busy with
HOST = socket.gethostname()

TopicPartition = tuple[str, int]


class Fenced(TransientError):
    """When a member commits a partition it no longer holds (another process took it over): rejoin."""


def pid_alive(pid: int) -> bool:
    """Whether a process of this host still runs (a zombie counts as alive until reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_fence(conn: sqlite3.Connection, group: str, topic: str, p: int, member: str | None, epoch: int) -> None:
    """Raise Fenced unless `member` still holds the partition under `epoch` (inside the commit's transaction)."""
    row = conn.execute("SELECT holder, epoch FROM leases WHERE grp=? AND topic=? AND partition=?",
                       (group, topic, p)).fetchone()
    if row is None or tuple(row) != (member, epoch):
        raise Fenced(f"{group} no longer owns {topic}[{p}] in this process (another member took it over); "
                     "its records will be handled there")


def renew(conn: sqlite3.Connection, members: Sequence[tuple[str, str]]) -> None:
    """Push back the expiry of this process's members (called from its renewal thread, via the writer)."""
    conn.executemany("UPDATE members SET expires=? WHERE grp=? AND member=?",
                     [(time.time() + LEASE_S, g, m) for g, m in members])


def heartbeat(conn: sqlite3.Connection, partitions: Mapping[str, int], group: str, member: str,
              topics: Sequence[str], release: Sequence[TopicPartition] = (), leaving: bool = False,
              ) -> tuple[dict[TopicPartition, tuple[int, int]], int]:
    """Renew `member`, hand back `release`, take free partitions; returns (held: tp -> (epoch, committed), surplus).

    Live members share the partitions evenly (ceil(partitions / members) each). A member whose
    heartbeat is older than LEASE_S, or whose process on this host is gone, is dead: its
    partitions are free at once. Taking a partition bumps its epoch, which fences the previous
    holder's commits. A member above its share is told its `surplus`: it gives those partitions
    back itself (`release`, on its next heartbeat) between two batches, never under one in flight.
    """
    now = time.time()
    for tp in release:
        conn.execute("UPDATE leases SET holder=NULL WHERE grp=? AND topic=? AND partition=? AND holder=?",
                     (group, *tp, member))
    if leaving:
        conn.execute("DELETE FROM members WHERE grp=? AND member=?", (group, member))
        conn.execute("UPDATE leases SET holder=NULL WHERE grp=? AND holder=?", (group, member))
        return {}, 0
    conn.execute("INSERT INTO members VALUES (?, ?, ?, ?, ?) ON CONFLICT(grp, member) DO UPDATE SET "
                 "expires=excluded.expires", (group, member, HOST, os.getpid(), now + LEASE_S))
    live: set[str] = set()
    for name, host, pid, expires in conn.execute("SELECT member, host, pid, expires FROM members WHERE grp=?",
                                                 (group,)).fetchall():
        if expires > now and (host != HOST or pid_alive(pid)):
            live.add(name)
        else:
            conn.execute("DELETE FROM members WHERE grp=? AND member=?", (group, name))
    wanted = [(t, p) for t in topics for p in range(partitions.get(t, 0))]
    conn.executemany("INSERT OR IGNORE INTO leases VALUES (?, ?, ?, NULL, 0)", [(group, t, p) for t, p in wanted])
    wanted_set = set(wanted)
    leases = {(t, p): (holder, epoch) for t, p, holder, epoch in conn.execute(
        "SELECT topic, partition, holder, epoch FROM leases WHERE grp=?", (group,)) if (t, p) in wanted_set}
    share = math.ceil(len(wanted) / max(1, len(live)))
    mine = sorted(tp for tp, (holder, _) in leases.items() if holder == member)
    free = sorted(tp for tp, (holder, _) in leases.items() if holder is None or holder not in live)
    for tp in free[:max(0, share - len(mine))]:
        conn.execute("UPDATE leases SET holder=?, epoch=epoch+1 WHERE grp=? AND topic=? AND partition=?",
                     (member, group, *tp))
        mine.append(tp)
    held: dict[TopicPartition, tuple[int, int]] = {}
    for tp in mine:
        epoch = conn.execute("SELECT epoch FROM leases WHERE grp=? AND topic=? AND partition=?",
                             (group, *tp)).fetchone()[0]
        committed = conn.execute("SELECT next_offset FROM group_offsets WHERE grp=? AND topic=? AND partition=?",
                                 (group, *tp)).fetchone()
        held[tp] = (epoch, committed[0] if committed else 0)
    return held, max(0, len(mine) - share)
