"""Consumer groups across the processes of one machine on the embedded log: members and partition leases.

Each member of a group is a row in `members` (host, pid, expiry); each (group, topic, partition) is
a row in `leases` naming its holder and an epoch. Members share the partition numbers evenly, each
number whole (partition p of every topic of the group: co-partitioned, so a key's records in all of
them are in one process); a member whose process is gone (same host, pid not running) or that was
not renewed for LEASE_S is dead and its partitions are free at once; taking a partition bumps its
epoch, and a commit checks its epoch in its own transaction (`check_fence`), so a stale holder can never commit.
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

    Leases are co-partitioned: the unit shared is a partition *number*, and a member holds partition p of
    every topic of the group or of none. Records keep their key from topic to topic (a delivery and its
    retries: target + person) and equal partition counts put one key on one number everywhere, so all the
    records of a lane are handled by one process at a time, with the order it remembers (issue 15).
    Live members share the numbers evenly (ceil(numbers / members) each). A member whose heartbeat is
    older than LEASE_S, or whose process on this host is gone, is dead: its partitions are free at once.
    Taking a partition bumps its epoch, which fences the previous holder's commits. A member above its
    share is told its `surplus`, in numbers: it gives each back whole itself (`release`, on a later
    heartbeat) once none of its records is in hand, never under one in flight.
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
    holders = {(t, p): holder for t, p, holder in conn.execute(
        "SELECT topic, partition, holder FROM leases WHERE grp=?", (group,)) if (t, p) in wanted_set}
    units = unit_holders(holders, live)
    share = math.ceil(len(units) / max(1, len(live)))
    mine = sorted(n for n, holder in units.items() if holder == member)
    free = sorted(n for n, holder in units.items() if holder is None)
    mine += free[:max(0, share - len(mine))]
    numbers = set(mine)
    held: dict[TopicPartition, tuple[int, int]] = {}
    for tp in sorted(wanted):
        holder = holders[tp]
        if tp[1] not in numbers:
            if holder == member:  # part of a number split between two members (leases of an older Relais)
                conn.execute("UPDATE leases SET holder=NULL WHERE grp=? AND topic=? AND partition=?", (group, *tp))
            continue
        if holder in live and holder != member:
            continue  # its holder gives it back when it next looks; taken then
        if holder != member:
            conn.execute("UPDATE leases SET holder=?, epoch=epoch+1 WHERE grp=? AND topic=? AND partition=?",
                         (member, group, *tp))
        epoch = conn.execute("SELECT epoch FROM leases WHERE grp=? AND topic=? AND partition=?",
                             (group, *tp)).fetchone()[0]
        committed = conn.execute("SELECT next_offset FROM group_offsets WHERE grp=? AND topic=? AND partition=?",
                                 (group, *tp)).fetchone()
        held[tp] = (epoch, committed[0] if committed else 0)
    return held, max(0, len(mine) - share)


def unit_holders(holders: Mapping[TopicPartition, str | None], live: set[str]) -> dict[int, str | None]:
    """Who holds each partition number: its one live holder, None when every topic's partition p is free.

    A number whose partitions are held by a live member is that member's (even if a topic's partition p is
    free: a topic declared later, or a lease left by a dead member); a number split between two live
    members (leases written before co-partitioning) counts as the first one's (by topic name): the other
    lets its part go on its next heartbeat, and the first takes it on a later one.
    """
    units: dict[int, str | None] = {}
    for (_, p), holder in sorted(holders.items(), key=lambda item: (item[0][1], item[0][0])):
        alive = holder if holder in live else None
        if units.get(p) is None:
            units[p] = alive
    return units
