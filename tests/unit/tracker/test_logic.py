"""Projection rules: statuses only move forward, terminal states stay, deliveries add up."""

from __future__ import annotations

import pytest

from services.tracker.logic import (
    ACCEPTED,
    DEAD_LETTERED,
    DELIVERED,
    DELIVERING,
    PENDING,
    REJECTED,
    RETRYING,
    ROUTED,
    TERMINAL,
    VALIDATED,
    advance_delivery,
    advance_stage,
    overall_status,
    progress,
)


@pytest.mark.parametrize(("current", "kind", "expected"), [
    (None, "accepted", ACCEPTED),
    (None, "validated", VALIDATED),          # validator's event landed first
    (ACCEPTED, "validated", VALIDATED),
    (VALIDATED, "routed", ROUTED),
    (VALIDATED, "accepted", VALIDATED),      # late `accepted` never moves it back
    (ROUTED, "accepted", ROUTED),
    (ROUTED, "validated", ROUTED),
    (ACCEPTED, "rejected", REJECTED),
    (VALIDATED, "rejected", REJECTED),
    (ROUTED, "failed", DEAD_LETTERED),
    (None, "failed", DEAD_LETTERED),
    (REJECTED, "accepted", REJECTED),        # terminal states stay
    (REJECTED, "validated", REJECTED),
    (REJECTED, "routed", REJECTED),
    (REJECTED, "failed", REJECTED),
    (DEAD_LETTERED, "routed", DEAD_LETTERED),
    (DEAD_LETTERED, "rejected", DEAD_LETTERED),
    (ROUTED, "delivered", ROUTED),           # delivery events are not stage events
    (ROUTED, "retry_scheduled", ROUTED),
    (None, "delivered", None),
    (VALIDATED, "something-new", VALIDATED),
])
def test_advance_stage(current: str | None, kind: str, expected: str | None) -> None:
    assert advance_stage(current, kind) == expected


@pytest.mark.parametrize("order", [
    ["accepted", "validated", "routed"],
    ["validated", "accepted", "routed"],
    ["routed", "validated", "accepted"],
    ["accepted", "routed", "validated"],
])
def test_advance_stage_reaches_routed_in_any_order(order: list[str]) -> None:
    status: str | None = None
    for kind in order:
        status = advance_stage(status, kind)
    assert status == ROUTED


@pytest.mark.parametrize(("current", "kind", "expected"), [
    (None, "routed", PENDING),
    (PENDING, "retry_scheduled", RETRYING),
    (RETRYING, "retry_scheduled", RETRYING),
    (RETRYING, "delivered", DELIVERED),
    (PENDING, "delivered", DELIVERED),
    (RETRYING, "dead_lettered", DEAD_LETTERED),
    (DELIVERED, "routed", DELIVERED),        # late `routed` after the delivery finished
    (DELIVERED, "retry_scheduled", DELIVERED),
    (DEAD_LETTERED, "retry_scheduled", DEAD_LETTERED),
    (DEAD_LETTERED, "delivered", DEAD_LETTERED),
    (DELIVERED, "dead_lettered", DELIVERED),
    (DEAD_LETTERED, "replayed", PENDING),    # the one explicit way back
    (RETRYING, "replayed", PENDING),
    (None, "replayed", PENDING),
    (None, "delivered", DELIVERED),
    (PENDING, "accepted", PENDING),
    (None, "validated", None),
])
def test_advance_delivery(current: str | None, kind: str, expected: str | None) -> None:
    assert advance_delivery(current, kind) == expected


def test_replayed_dead_letter_can_be_delivered_again() -> None:
    status: str | None = None
    for kind in ["routed", "retry_scheduled", "dead_lettered", "replayed", "retry_scheduled", "delivered"]:
        status = advance_delivery(status, kind)
    assert status == DELIVERED


@pytest.mark.parametrize(("stage", "deliveries", "expected"), [
    (ACCEPTED, [], ACCEPTED),
    (VALIDATED, [], VALIDATED),
    (ROUTED, [], ROUTED),
    (REJECTED, [], REJECTED),
    (DEAD_LETTERED, [], DEAD_LETTERED),
    (DEAD_LETTERED, [DELIVERED], DEAD_LETTERED),
    (REJECTED, [PENDING], REJECTED),
    (VALIDATED, [DELIVERED], VALIDATED),      # deliveries count only once routed
    (ROUTED, [PENDING], DELIVERING),
    (ROUTED, [PENDING, PENDING], DELIVERING),
    (ROUTED, [RETRYING, DELIVERED], DELIVERING),
    (ROUTED, [DEAD_LETTERED, PENDING], DELIVERING),
    (ROUTED, [DELIVERED], DELIVERED),
    (ROUTED, [DELIVERED, DELIVERED], DELIVERED),
    (ROUTED, [DELIVERED, DEAD_LETTERED], DEAD_LETTERED),
    (ROUTED, [DEAD_LETTERED], DEAD_LETTERED),
])
def test_overall_status(stage: str, deliveries: list[str], expected: str) -> None:
    assert overall_status(stage, deliveries) == expected
    assert overall_status(stage, iter(deliveries)) == expected


def test_terminal_statuses() -> None:
    assert TERMINAL == {DELIVERED, REJECTED, DEAD_LETTERED}


@pytest.mark.parametrize(("stage", "deliveries", "text"), [
    (ACCEPTED, [], "accepted"),
    (VALIDATED, [], "validated"),
    (ROUTED, [], "routed"),
    (ROUTED, [PENDING, PENDING], "delivering: 0/2 target(s) done"),
    (ROUTED, [DELIVERED, PENDING], "delivering: 1/2 target(s) done"),
    (ROUTED, [DELIVERED, DEAD_LETTERED, RETRYING], "delivering: 2/3 target(s) done, 1 retrying"),
    (ROUTED, [RETRYING, RETRYING], "delivering: 0/2 target(s) done, 2 retrying"),
])
def test_progress(stage: str, deliveries: list[str], text: str) -> None:
    assert progress(stage, deliveries) == text
