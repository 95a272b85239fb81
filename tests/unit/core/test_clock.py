"""aware(): a ledger timestamp, naive or not, as an aware datetime on the same instant (naive means UTC)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.core.clock import aware

PARIS_WINTER = timezone(timedelta(hours=1))


@pytest.mark.parametrize(("moment", "expected"), [
    (datetime(2026, 12, 7, 9, 30), datetime(2026, 12, 7, 9, 30, tzinfo=UTC)),  # as SQLite hands it back
    (datetime(2026, 12, 7, 9, 30, tzinfo=UTC), datetime(2026, 12, 7, 9, 30, tzinfo=UTC)),
    (datetime(2026, 12, 7, 10, 30, tzinfo=PARIS_WINTER), datetime(2026, 12, 7, 9, 30, tzinfo=UTC)),
], ids=["naive-is-utc", "utc-kept", "offset-kept"])
def test_aware(moment: datetime, expected: datetime) -> None:
    made = aware(moment)
    assert made.tzinfo is not None
    assert made == expected
    if moment.tzinfo is not None:
        assert made is moment  # an aware time is kept as it is, offset and all


def test_a_naive_and_an_aware_time_compare_once_made_aware() -> None:
    naive, now = datetime(2026, 12, 7, 9, 30), datetime(2026, 12, 7, 9, 31, tzinfo=UTC)
    with pytest.raises(TypeError):
        assert naive < now  # the crash aware() is for
    assert aware(naive) < now
