"""Delivery decisions: classify an answer, read Retry-After, and decide delivered / retry / dead letter."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from services.core.fate import Fate
from services.delivery.logic import (
    RETRY_AFTER_CAP_S,
    Breaker,
    BreakerEvent,
    Circuit,
    Failure,
    breaker_after,
    breaker_allows,
    classify,
    decide,
    park_tier,
    parse_retry_after,
    probe_due,
)

NOW = datetime(2025, 6, 2, 12, 0, 0, tzinfo=UTC)
TIERS = (10.0, 60.0, 600.0)


@pytest.mark.parametrize(("status", "failure"), [
    (200, Failure.NONE), (201, Failure.NONE), (204, Failure.NONE), (299, Failure.NONE),
    (400, Failure.PERMANENT), (401, Failure.PERMANENT), (403, Failure.PERMANENT), (404, Failure.PERMANENT),
    (409, Failure.PERMANENT), (412, Failure.PERMANENT), (422, Failure.PERMANENT),
    (408, Failure.TRANSIENT), (425, Failure.TRANSIENT), (429, Failure.TRANSIENT),
    (500, Failure.TRANSIENT), (502, Failure.AMBIGUOUS), (503, Failure.TRANSIENT), (504, Failure.AMBIGUOUS),
    (None, Failure.TRANSIENT),
    (301, Failure.PERMANENT), (302, Failure.PERMANENT),  # a FHIR base that redirects a POST is misconfigured
])
def test_classify(status: int | None, failure: Failure) -> None:
    assert classify(status) is failure


# --- Retry-After ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "seconds"), [
    ("0", 0.0),
    ("120", 120.0),
    (" 30 ", 30.0),
    ("3600", 3600.0),
    ("3601", RETRY_AFTER_CAP_S),
    ("999999999", RETRY_AFTER_CAP_S),
    (format_datetime(NOW + timedelta(seconds=90), usegmt=True), 90.0),
    (format_datetime(NOW + timedelta(days=2), usegmt=True), RETRY_AFTER_CAP_S),
    (format_datetime(NOW - timedelta(minutes=5), usegmt=True), 0.0),
    ("Mon, 02 Jun 2025 12:01:00 GMT", 60.0),
    ("Mon, 02 Jun 2025 12:01:00", 60.0),  # no zone: taken as UTC
])
def test_parse_retry_after(value: str, seconds: float) -> None:
    assert parse_retry_after(value, now=NOW) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [
    None, "", "   ", "soon", "-5", "1.5", "12s", "Mon, 99 Foo 2025", "NaN",
    "\u00b2",   # "²": what httpx hands back for a Retry-After byte 0xB2 (latin-1); str.isdigit() says yes
])
def test_parse_retry_after_garbage_is_none(value: str | None) -> None:
    assert parse_retry_after(value, now=NOW) is None


def test_parse_retry_after_http_date_uses_the_clock_by_default() -> None:
    future = format_datetime(datetime.now(UTC) + timedelta(seconds=300), usegmt=True)
    seconds = parse_retry_after(future)
    assert seconds is not None and 290 <= seconds <= 300


# --- decide --------------------------------------------------------------------------------------

def test_decide_delivered() -> None:
    decision = decide(Failure.NONE, 1, max_attempts=8, tiers_s=TIERS, reason="HTTP 200")
    assert (decision.fate, decision.tier, decision.delay_s) == (Fate.DELIVERED, 0, 0.0)


@pytest.mark.parametrize("attempt", [1, 5, 8, 20])
def test_decide_permanent_is_a_dead_letter_at_once(attempt: int) -> None:
    decision = decide(Failure.PERMANENT, attempt, max_attempts=8, tiers_s=TIERS, reason="HTTP 422",
                      retry_after_s=30.0)
    assert decision.fate is Fate.DEAD_LETTER
    assert "permanent" in decision.reason and "HTTP 422" in decision.reason
    assert decision.tier == 0


@pytest.mark.parametrize(("attempt", "tier", "base"), [
    (1, 1, 10.0), (2, 2, 60.0), (3, 3, 600.0), (4, 3, 600.0), (7, 3, 600.0),
])
def test_decide_transient_climbs_the_tiers_then_repeats_the_last(attempt: int, tier: int,
                                                                  base: float) -> None:
    decision = decide(Failure.TRANSIENT, attempt, max_attempts=8, tiers_s=TIERS, reason="HTTP 503",
                      jitter=0.0)
    assert decision.fate is Fate.RETRY
    assert decision.tier == tier
    assert decision.delay_s == base
    assert "transient" in decision.reason and "HTTP 503" in decision.reason


@pytest.mark.parametrize(("attempt", "max_attempts", "fate"), [
    (7, 8, Fate.RETRY), (8, 8, Fate.DEAD_LETTER), (9, 8, Fate.DEAD_LETTER), (1, 1, Fate.DEAD_LETTER),
    (1, 2, Fate.RETRY),
])
def test_decide_gives_up_at_max_attempts(attempt: int, max_attempts: int, fate: Fate) -> None:
    decision = decide(Failure.TRANSIENT, attempt, max_attempts=max_attempts, tiers_s=TIERS, reason="timeout")
    assert decision.fate is fate
    if fate is Fate.DEAD_LETTER:
        assert f"gave up after {attempt} attempt(s)" in decision.reason
        assert "timeout" in decision.reason


@pytest.mark.parametrize(("retry_after", "expected"), [
    (None, 10.0), (5.0, 10.0), (10.0, 10.0), (45.0, 45.0), (3600.0, 3600.0),
])
def test_retry_after_can_only_raise_the_delay(retry_after: float | None, expected: float) -> None:
    decision = decide(Failure.TRANSIENT, 1, max_attempts=8, tiers_s=TIERS, retry_after_s=retry_after,
                      jitter=0.0)
    assert decision.tier == 1
    assert decision.delay_s == expected


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize(("attempt", "base"), [(1, 10.0), (2, 60.0), (5, 600.0)])
def test_jitter_is_bounded(seed: int, attempt: int, base: float) -> None:
    decision = decide(Failure.TRANSIENT, attempt, max_attempts=8, tiers_s=TIERS, jitter=0.1,
                      rng=random.Random(seed))
    assert base * 0.9 <= decision.delay_s <= base * 1.1


def test_jitter_spreads_delays_and_is_reproducible_with_a_seed() -> None:
    delays = [decide(Failure.TRANSIENT, 1, max_attempts=8, tiers_s=TIERS, rng=random.Random(s)).delay_s
              for s in range(50)]
    assert len(set(delays)) > 40
    assert min(delays) < 10.0 < max(delays)
    again = decide(Failure.TRANSIENT, 1, max_attempts=8, tiers_s=TIERS, rng=random.Random(3)).delay_s
    assert again == delays[3]


def test_single_tier_repeats() -> None:
    decisions = [decide(Failure.TRANSIENT, n, max_attempts=5, tiers_s=[7.0], jitter=0.0) for n in range(1, 5)]
    assert [(d.tier, d.delay_s) for d in decisions] == [(1, 7.0)] * 4


# --- ambiguity, max age, parking -----------------------------------------------------------------

@pytest.mark.parametrize(("status", "sent", "failure"), [
    (None, False, Failure.TRANSIENT),   # refused, unreachable, TLS handshake: never reached the target
    (None, True, Failure.AMBIGUOUS),    # read timeout, reset after send
    (502, True, Failure.AMBIGUOUS), (504, True, Failure.AMBIGUOUS),
    (503, True, Failure.TRANSIENT), (500, True, Failure.TRANSIENT), (200, True, Failure.NONE),
    (400, True, Failure.PERMANENT),
])
def test_classify_sent(status: int | None, sent: bool, failure: Failure) -> None:
    assert classify(status, sent=sent) is failure


@pytest.mark.parametrize(("policy", "fate", "probe"), [
    ("retry", Fate.RETRY, False), ("probe", Fate.RETRY, True), ("dead-letter", Fate.DEAD_LETTER, False),
])
def test_ambiguous_policy(policy: str, fate: Fate, probe: bool) -> None:
    decision = decide(Failure.AMBIGUOUS, 1, max_attempts=8, tiers_s=TIERS, reason="ReadTimeout",
                      ambiguous=policy, jitter=0.0)  # type: ignore[arg-type]
    assert (decision.fate, decision.probe) == (fate, probe)
    assert "ambiguous" in decision.reason


def test_transient_ignores_the_ambiguous_policy() -> None:
    decision = decide(Failure.TRANSIENT, 1, max_attempts=8, tiers_s=TIERS, ambiguous="dead-letter")
    assert decision.fate is Fate.RETRY and not decision.probe


@pytest.mark.parametrize(("age", "fate"), [(0.0, Fate.RETRY), (99.0, Fate.RETRY), (100.0, Fate.DEAD_LETTER),
                                           (1e6, Fate.DEAD_LETTER)])
def test_max_age(age: float, fate: Fate) -> None:
    decision = decide(Failure.TRANSIENT, 2, max_attempts=8, tiers_s=TIERS, age_s=age, max_age_s=100.0)
    assert decision.fate is fate
    if fate is Fate.DEAD_LETTER:
        assert "max age" in decision.reason


@pytest.mark.parametrize(("wait", "tier"), [
    (0.0, 1), (5.0, 1), (10.0, 1), (59.0, 1), (60.0, 2), (599.0, 2), (600.0, 3), (3600.0, 3),
])
def test_park_tier_is_the_longest_tier_not_longer_than_the_wait(wait: float, tier: int) -> None:
    assert park_tier(wait, TIERS) == tier


# --- circuit breaker -----------------------------------------------------------------------------

def _run(events: list[tuple[BreakerEvent, float]], threshold: int = 3, every: float = 10.0) -> list[Breaker]:
    state, out = Breaker(), []
    for ev, now in events:
        state = breaker_after(state, ev, now, threshold=threshold, probe_every_s=every)
        out.append(state)
    return out


def test_breaker_opens_after_threshold_consecutive_failures() -> None:
    F, S = BreakerEvent.FAILURE, BreakerEvent.SUCCESS
    states = _run([(F, 1), (F, 2), (S, 3), (F, 4), (F, 5), (F, 6)])
    assert [s.circuit for s in states] == [Circuit.CLOSED] * 5 + [Circuit.OPEN]
    assert states[2].failures == 0  # a success resets the count
    assert states[-1].next_probe_at == 16.0
    assert not breaker_allows(states[-1])


def test_open_breaker_probes_then_closes_on_probation() -> None:
    F = BreakerEvent.FAILURE
    opened = _run([(F, 0), (F, 0), (F, 0)])[-1]
    assert not probe_due(opened, 9.9) and probe_due(opened, 10.0)
    still = breaker_after(opened, BreakerEvent.PROBE_FAILED, 10.0, threshold=3, probe_every_s=10.0)
    assert still.circuit is Circuit.OPEN and still.next_probe_at == 20.0
    back = breaker_after(still, BreakerEvent.PROBE_OK, 20.0, threshold=3, probe_every_s=10.0)
    assert breaker_allows(back) and back.failures == 2
    again = breaker_after(back, F, 21.0, threshold=3, probe_every_s=10.0)
    assert again.circuit is Circuit.OPEN  # on probation: one failure re-opens at once
    healed = breaker_after(back, BreakerEvent.SUCCESS, 21.0, threshold=3, probe_every_s=10.0)
    assert healed == Breaker()


def test_failures_while_open_keep_it_open_and_do_not_move_the_probe() -> None:
    F = BreakerEvent.FAILURE
    opened = _run([(F, 0), (F, 0), (F, 0)])[-1]
    later = breaker_after(opened, F, 5.0, threshold=3, probe_every_s=10.0)
    assert later.circuit is Circuit.OPEN and later.next_probe_at == opened.next_probe_at
