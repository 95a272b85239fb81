"""LaneOrder: a person's later Bundles wait behind the one a target made wait (pure, no clock of its own)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.delivery.order import GAP, LaneOrder

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
LANE = ("essms-a", b"essms-a|person-1")


def test_nothing_waits_in_a_lane_with_no_retry() -> None:
    order = LaneOrder(stale_s=600)
    assert order.hold_until(LANE, "t1", T0) is None
    order.settled(LANE, "t1", None)
    assert order.hold_until(LANE, "t2", T0) is None and len(order) == 0


def test_later_records_wait_behind_a_retried_one_in_order_and_go_once_it_is_done() -> None:
    order = LaneOrder(stale_s=600)
    order.settled(LANE, "t1", T0 + timedelta(seconds=10))  # t1 failed: back in 10 s
    t2 = order.hold_until(LANE, "t2", T0)
    t3 = order.hold_until(LANE, "t3", T0)
    assert t2 == T0 + timedelta(seconds=10) + GAP
    assert t3 is not None and t2 is not None and t3 > t2
    assert order.hold_until(LANE, "t1", T0 + timedelta(seconds=10)) is None  # the head goes first
    order.settled(LANE, "t1", T0 + timedelta(seconds=70))  # failed again: 60 s more
    again = order.hold_until(LANE, "t2", T0 + timedelta(seconds=11))  # t2 comes back first: not its turn
    assert again is not None and again > T0 + timedelta(seconds=70)
    order.settled(LANE, "t1", None)  # delivered
    assert order.hold_until(LANE, "t2", T0 + timedelta(seconds=71)) is None
    order.settled(LANE, "t2", None)
    assert order.hold_until(LANE, "t3", T0 + timedelta(seconds=72)) is None
    order.settled(LANE, "t3", None)
    assert len(order) == 0


def test_other_lanes_never_wait() -> None:
    order = LaneOrder(stale_s=600)
    order.settled(LANE, "t1", T0 + timedelta(seconds=10))
    assert order.hold_until(("essms-a", b"essms-a|person-2"), "t9", T0) is None
    assert order.hold_until(("essms-b", b"essms-b|person-1"), "t8", T0) is None


def test_a_head_that_never_comes_back_is_forgotten() -> None:
    order = LaneOrder(stale_s=60)
    order.settled(LANE, "t1", T0 + timedelta(seconds=10))
    assert order.hold_until(LANE, "t2", T0 + timedelta(seconds=71)) is None


def test_records_learnt_from_a_partition_taken_over_hold_the_lane_in_their_lane_order() -> None:
    order = LaneOrder(stale_s=600)
    # Another process parked t1 (seq 4, failed) and then t2 behind it (seq 7); learnt in any order.
    order.learn(LANE, "t2", T0 + timedelta(seconds=11), seq=7)
    order.learn(LANE, "t1", T0 + timedelta(seconds=10), seq=4)
    assert order.hold_until(LANE, "t3", T0, seq=9) is not None  # read from `deliveries` here: waits
    assert order.hold_until(LANE, "t2", T0 + timedelta(seconds=11), seq=7) is not None  # not before t1
    assert order.hold_until(LANE, "t1", T0 + timedelta(seconds=10), seq=4) is None  # the head goes first


def test_a_record_earlier_than_every_waiting_one_goes_first() -> None:
    order = LaneOrder(stale_s=600)
    order.learn(LANE, "t5", T0 + timedelta(seconds=10), seq=5)
    assert order.hold_until(LANE, "t2", T0, seq=2) is None
    order.settled(LANE, "t2", T0 + timedelta(seconds=5), seq=2)  # it failed: now the head, t5 behind it
    assert order.hold_until(LANE, "t5", T0 + timedelta(seconds=10), seq=5) is not None


def test_lanes_of_partitions_given_up_are_forgotten() -> None:
    order = LaneOrder(stale_s=600)
    order.learn(("a", b"a|p1", 0), "t1", T0 + timedelta(seconds=10), seq=1)
    order.learn(("a", b"a|p2", 3), "t2", T0 + timedelta(seconds=10), seq=1)
    order.forget(lambda lane: isinstance(lane, tuple) and lane[2] == 3)
    assert len(order) == 1
    assert order.hold_until(("a", b"a|p2", 3), "t9", T0, seq=5) is None
