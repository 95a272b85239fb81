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
