"""Consumer-group leases on the embedded log, on an in-memory SQLite: shares, death, takeover, fencing."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from services.core import embedded_groups as groups
from services.core.embedded_log import SCHEMA

PARTITIONS = {"t": 6}
ALL = {("t", p) for p in range(6)}


@pytest.fixture
def conn() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.executescript(SCHEMA)
    return conn


TP = tuple[str, int]


def beat(conn: sqlite3.Connection, member: str, release: tuple[TP, ...] = ()) -> tuple[set[TP], int]:
    held, surplus = groups.heartbeat(conn, PARTITIONS, "g", member, ["t"], release)
    return set(held), surplus


def test_a_lone_member_takes_every_partition(conn: sqlite3.Connection) -> None:
    assert beat(conn, "a") == (ALL, 0)


def test_a_second_member_gets_its_share_once_the_first_gives_back_its_surplus(conn: sqlite3.Connection) -> None:
    held_a, _ = beat(conn, "a")
    assert beat(conn, "b") == (set(), 0)  # nothing free yet: a holds everything
    _, surplus = beat(conn, "a")
    assert surplus == 3
    spare = tuple(sorted(held_a))[:surplus]
    held_a, _ = beat(conn, "a", spare)
    held_b, _ = beat(conn, "b")
    assert len(held_a) == len(held_b) == 3 and held_a | held_b == ALL


def test_a_dead_process_frees_its_partitions_at_once(conn: sqlite3.Connection) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    conn.execute("INSERT INTO members VALUES ('g', 'dead', ?, ?, 1e12)", (groups.HOST, gone.pid))
    conn.executemany("INSERT INTO leases VALUES ('g', 't', ?, 'dead', 1)", [(p,) for p in range(6)])
    assert beat(conn, "a") == (ALL, 0)


def test_taking_a_partition_fences_its_previous_holder(conn: sqlite3.Connection) -> None:
    beat(conn, "a")
    conn.execute("UPDATE members SET expires=0 WHERE member='a'")  # frozen past its lease
    held, _ = groups.heartbeat(conn, PARTITIONS, "g", "b", ["t"])
    assert set(held) == ALL
    epoch_b = held[("t", 0)][0]
    with pytest.raises(groups.Fenced):
        groups.check_fence(conn, "g", "t", 0, "a", epoch_b - 1)
    groups.check_fence(conn, "g", "t", 0, "b", epoch_b)  # the new holder commits


def test_leaving_hands_everything_back(conn: sqlite3.Connection) -> None:
    beat(conn, "a")
    groups.heartbeat(conn, PARTITIONS, "g", "a", ["t"], leaving=True)
    assert beat(conn, "b") == (ALL, 0)
