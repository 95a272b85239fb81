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


# --- co-partitioning: partition p of every topic of the group goes to one member (issue 15) ------------------
TOPICS = {"deliveries": 6, "retry.1": 6, "retry.2": 6}


def numbers_of(held: set[TP]) -> dict[int, set[str]]:
    by_number: dict[int, set[str]] = {}
    for topic, p in held:
        by_number.setdefault(p, set()).add(topic)
    return by_number


def beat_all(conn: sqlite3.Connection, member: str, release: tuple[TP, ...] = ()) -> tuple[set[TP], int]:
    held, surplus = groups.heartbeat(conn, TOPICS, "g", member, list(TOPICS), release)
    return set(held), surplus


def test_members_share_partition_numbers_each_whole_across_the_groups_topics(conn: sqlite3.Connection) -> None:
    held_a, _ = beat_all(conn, "a")
    assert len(held_a) == 18
    beat_all(conn, "b")
    _, surplus = beat_all(conn, "a")
    assert surplus == 3  # in partition numbers, not in topic partitions
    spare = tuple(tp for tp in held_a if tp[1] < surplus)
    held_a, _ = beat_all(conn, "a", spare)
    held_b, _ = beat_all(conn, "b")
    beat_all(conn, "c")  # a third member: each gives back one number, whole
    for member, held in (("a", held_a), ("b", held_b)):
        _, surplus = beat_all(conn, member)
        assert surplus == 1
        gone = min(numbers_of(held))
        beat_all(conn, member, tuple(tp for tp in held if tp[1] == gone))
    held = {m: beat_all(conn, m)[0] for m in ("a", "b", "c")}
    for member, tps in held.items():
        by_number = numbers_of(tps)
        assert len(by_number) == 2, (member, by_number)
        assert all(topics == set(TOPICS) for topics in by_number.values()), (member, by_number)
    assert set().union(*held.values()) == {(t, p) for t in TOPICS for p in range(6)}


def test_a_free_topic_partition_goes_to_the_holder_of_its_number_not_to_a_member_with_room(
        conn: sqlite3.Connection) -> None:
    groups.heartbeat(conn, {"deliveries": 6}, "g", "a", ["deliveries"])  # before the retry topics existed
    groups.heartbeat(conn, {"deliveries": 6}, "g", "b", ["deliveries"])
    held_b, _ = beat_all(conn, "b")  # b has room for 3 numbers, but every number is a's
    assert held_b == set()
    held_a, _ = beat_all(conn, "a")
    assert held_a == {(t, p) for t in TOPICS for p in range(6)}
