"""Delivery decisions as pure functions: classify an answer, decide the record's fate, run the breaker.

No awaits, no HTTP, no Kafka: the stage feeds these the facts (status, attempt number, clock) and
acts on what they return.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Literal

from services.core.clock import aware
from services.core.fate import Fate

RETRY_AFTER_CAP_S = 3600.0
# Statuses that mean "try again later" even though they are 4xx.
TRANSIENT_4XX = frozenset({408, 425, 429})
# Gateway statuses: the request went past the gateway, the target may have applied it.
AMBIGUOUS_5XX = frozenset({502, 504})

AmbiguousPolicy = Literal["probe", "retry", "dead-letter"]


class Failure(enum.Enum):
    """How an attempt failed, when it did."""

    NONE = "none"
    TRANSIENT = "transient"  # nothing was applied, waiting may help: refused, 5xx, 408, 429, TLS
    AMBIGUOUS = "ambiguous"  # sent but no answer (read timeout, reset after send, 502/504): maybe applied
    PERMANENT = "permanent"  # other 4xx, unusable answers: waiting will not help


@dataclass(frozen=True, slots=True)
class Decision:
    """The fate of a record; for a retry, its policy tier, delay and whether to probe before re-sending."""

    fate: Fate
    reason: str
    tier: int = 0
    delay_s: float = 0.0
    probe: bool = False


def classify(status: int | None, *, sent: bool = False) -> Failure:
    """Classify an HTTP status; None means no answer, and `sent` says whether the request had gone out."""
    if status is None:
        return Failure.AMBIGUOUS if sent else Failure.TRANSIENT
    if 200 <= status < 300:
        return Failure.NONE
    if status in AMBIGUOUS_5XX:
        return Failure.AMBIGUOUS
    if status in TRANSIENT_4XX or status >= 500:
        return Failure.TRANSIENT
    return Failure.PERMANENT


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), capped; None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), RETRY_AFTER_CAP_S)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    seconds = (aware(when) - (now or datetime.now(UTC))).total_seconds()  # an HTTP-date without a zone is UTC
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_S)


def decide(failure: Failure, attempt: int, *, max_attempts: int, tiers_s: Sequence[float],
           retry_after_s: float | None = None, reason: str = "",
           jitter: float = 0.1, rng: random.Random | None = None,
           age_s: float = 0.0, max_age_s: float = math.inf,
           ambiguous: AmbiguousPolicy = "retry") -> Decision:
    """The fate after attempt number `attempt` (counted from 1) failed (or not) as `failure` says.

    `age_s` is the time since the delivery first failed; past `max_age_s` it is dead-lettered.
    """
    if failure is Failure.NONE:
        return Decision(Fate.DELIVERED, "delivered")
    if failure is Failure.PERMANENT:
        return Decision(Fate.DEAD_LETTER, f"permanent failure: {reason}")
    probe = False
    if failure is Failure.AMBIGUOUS:
        if ambiguous == "dead-letter":
            return Decision(Fate.DEAD_LETTER, f"ambiguous failure (the target may have applied the "
                                              f"transaction; policy dead-letter asks an operator): {reason}")
        probe = ambiguous == "probe"
    if attempt >= max_attempts:
        return Decision(Fate.DEAD_LETTER, f"gave up after {attempt} attempt(s): {reason}", probe=probe)
    if age_s >= max_age_s:
        return Decision(Fate.DEAD_LETTER, f"gave up after {age_s:.0f}s of failures (max age "
                                          f"{max_age_s:g}s), {attempt} attempt(s): {reason}", probe=probe)
    tier = min(attempt, len(tiers_s))  # attempt 1 failed → tier 1, ...; the last tier repeats
    delay = tiers_s[tier - 1]
    # Jitter spreads a crowd of retries that failed together, so a recovering target is not stampeded.
    delay *= 1 + jitter * (rng or random).uniform(-1, 1)  # not cryptographic: jitter only
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)
    kind = "ambiguous" if failure is Failure.AMBIGUOUS else "transient"
    return Decision(Fate.RETRY, f"{kind} failure: {reason}", tier=tier, delay_s=delay, probe=probe)


def park_tier(wait_s: float, topic_tiers_s: Sequence[float]) -> int:
    """The retry topic (1-based) a record waiting `wait_s` should sit in.

    Each retry topic holds records whose wait is about its own delay, so a partition's records become
    due roughly in log order and a record never holds up a sooner one behind it for long: the record
    goes to the longest tier not longer than its wait (tier 1 when all are longer). A record whose
    wait is longer than its tier's delay comes back early, sees it is not due, and is parked again.
    """
    chosen = 1
    for n, delay in enumerate(topic_tiers_s, start=1):
        if delay <= wait_s:
            chosen = n
    return chosen


# --- circuit breaker -----------------------------------------------------------------------------

class Circuit(enum.Enum):
    """Whether requests go to a target."""

    CLOSED = "closed"  # healthy: send
    OPEN = "open"      # unavailable: hold records, probe now and then


class BreakerEvent(enum.Enum):
    """What the breaker learns."""

    SUCCESS = "success"            # the target answered (2xx, or a 4xx proving it is up)
    FAILURE = "failure"            # transient or ambiguous failure
    PROBE_OK = "probe-ok"          # a health probe got an answer
    PROBE_FAILED = "probe-failed"  # a health probe did not
    SLOW = "slow"                  # the share of slow calls in the window reached the slow-call rate


@dataclass(frozen=True, slots=True)
class Breaker:
    """A target's breaker state; `next_probe_at` is on the caller's clock (monotonic seconds)."""

    circuit: Circuit = Circuit.CLOSED
    failures: int = 0
    next_probe_at: float = 0.0


def breaker_after(state: Breaker, event: BreakerEvent, now: float, *, threshold: int,
                  probe_every_s: float) -> Breaker:
    """The breaker state after `event` at `now`."""
    if event is BreakerEvent.SUCCESS:
        return Breaker()
    if event is BreakerEvent.PROBE_OK:
        # Back, but on probation: the next failure opens the circuit again at once.
        return Breaker(Circuit.CLOSED, failures=max(threshold - 1, 0))
    if event is BreakerEvent.PROBE_FAILED:
        return Breaker(Circuit.OPEN, state.failures, now + probe_every_s)
    if event is BreakerEvent.SLOW:  # resilience4j's slow-call rate: open as for failures, probe to close
        return state if state.circuit is Circuit.OPEN else Breaker(Circuit.OPEN, state.failures, now + probe_every_s)
    failures = state.failures + 1
    if state.circuit is Circuit.OPEN:
        return replace(state, failures=failures)
    if failures >= threshold:
        return Breaker(Circuit.OPEN, failures, now + probe_every_s)
    return Breaker(Circuit.CLOSED, failures)


def too_slow(slow_rate: float | None, slow_call_rate: float) -> bool:
    """Whether the share of slow calls (None: too few calls yet) should open the circuit."""
    return slow_rate is not None and slow_rate >= slow_call_rate


def breaker_allows(state: Breaker) -> bool:
    """True when records may be sent to the target."""
    return state.circuit is Circuit.CLOSED


def probe_due(state: Breaker, now: float) -> bool:
    """True when an open circuit should be probed."""
    return state.circuit is Circuit.OPEN and now >= state.next_probe_at
