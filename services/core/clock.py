"""Time as the ledger hands it back: every datetime Relais compares is timezone-aware, in UTC when it says nothing.

Relais writes every timestamp in UTC into `DateTime(timezone=True)` columns. PostgreSQL returns them aware;
SQLite stores no offset and returns them naive, and comparing a naive datetime with an aware one (`datetime.now(UTC)`)
raises TypeError. So a datetime read from the ledger, or from any source that may drop the offset, passes
through `aware()` once, where it is read.
"""

from __future__ import annotations

from datetime import UTC, datetime


def aware(moment: datetime) -> datetime:
    """`moment` as a timezone-aware datetime: a naive one is taken as UTC, an aware one is returned as it is."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
