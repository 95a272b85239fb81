"""Dashboard sessions: the cookie carries a random id; the ledger keeps its SHA-256, whose operator, and until when.

The operator's token is checked once, at sign-in, and never stored in the browser. A session names an
operator id, so a role change or a removal in RELAIS_OPERATORS_FILE applies to open sessions at once.
Sign-out deletes the row: the cookie is worthless afterwards, even if it was copied. Sessions live in
the ledger database, so every ingress replica knows them.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from services.core.shielded import shielded
from services.tracker.ledger import Ledger, ops_sessions

SESSION_TTL = timedelta(hours=12)


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


@shielded
async def open_session(ledger: Ledger, operator: str, *, ttl: timedelta = SESSION_TTL) -> str:
    """A new session for `operator`; returns the id to put in the cookie (and nowhere else)."""
    session_id = secrets.token_urlsafe(32)
    now = datetime.now(UTC)
    async with ledger.engine.begin() as conn:
        await conn.execute(ops_sessions.delete().where(ops_sessions.c.expires_at < now))  # keep the table small
        await conn.execute(ops_sessions.insert().values(id_sha256=_digest(session_id), operator=operator,
                                                        created_at=now, expires_at=now + ttl))
    return session_id


async def session_operator(ledger: Ledger, session_id: str) -> str | None:
    """The operator id of a live session, else None (unknown, signed out or expired)."""
    if not session_id or len(session_id) > 128:
        return None
    async with ledger.engine.connect() as conn:
        row = (await conn.execute(sa.select(ops_sessions.c.operator, ops_sessions.c.expires_at)
                                  .where(ops_sessions.c.id_sha256 == _digest(session_id)))).first()
    if row is None:
        return None
    expires = row[1] if row[1].tzinfo else row[1].replace(tzinfo=UTC)
    return str(row[0]) if expires > datetime.now(UTC) else None


@shielded
async def close_session(ledger: Ledger, session_id: str) -> None:
    """Sign out: the session id is worthless from now on."""
    async with ledger.engine.begin() as conn:
        await conn.execute(ops_sessions.delete().where(ops_sessions.c.id_sha256 == _digest(session_id)))
