"""Delivery decisions as pure functions: classify an answer, then decide the record's fate."""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

RETRY_AFTER_CAP_S = 3600.0
# Statuses that mean "try again later" even though they are 4xx.
TRANSIENT_4XX = frozenset({408, 425, 429})


class Fate(enum.Enum):
    """What becomes of a delivery record after one attempt."""

    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD_LETTER = "dead-letter"


class Failure(enum.Enum):
    """How an attempt failed, when it did."""

    NONE = "none"
    TRANSIENT = "transient"  # network, timeout, 5xx, 408, 429: waiting may help
    PERMANENT = "permanent"  # other 4xx, unusable answers: waiting will not help


@dataclass(frozen=True, slots=True)
class Decision:
    """The fate of a record, and for a retry which tier it waits in and for how long."""

    fate: Fate
    reason: str
    tier: int = 0
    delay_s: float = 0.0


def classify(status: int | None) -> Failure:
    """Classify an HTTP status (None: no answer at all — connection refused, reset, timeout)."""
    if status is None:
        return Failure.TRANSIENT
    if 200 <= status < 300:
        return Failure.NONE
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
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_S)


def decide(failure: Failure, attempt: int, *, max_attempts: int, tiers_s: Sequence[float],
           retry_after_s: float | None = None, reason: str = "",
           jitter: float = 0.1, rng: random.Random | None = None) -> Decision:
    """The fate after attempt number `attempt` (counted from 1) failed (or not) as `failure` says."""
    if failure is Failure.NONE:
        return Decision(Fate.DELIVERED, "delivered")
    if failure is Failure.PERMANENT:
        return Decision(Fate.DEAD_LETTER, f"permanent failure: {reason}")
    if attempt >= max_attempts:
        return Decision(Fate.DEAD_LETTER, f"gave up after {attempt} attempt(s): {reason}")
    tier = min(attempt, len(tiers_s))  # attempt 1 failed → tier 1, ...; the last tier repeats
    delay = tiers_s[tier - 1]
    # Jitter spreads a crowd of retries that failed together, so a recovering target is not stampeded.
    delay *= 1 + jitter * (rng or random).uniform(-1, 1)  # noqa: S311 - not cryptographic
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)
    return Decision(Fate.RETRY, f"transient failure: {reason}", tier=tier, delay_s=delay)
