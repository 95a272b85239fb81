"""Operators (RELAIS_OPERATORS_FILE, YAML): who may look at and act on Relais, separate from producers.

```yaml
operators:
  - id: alice                        # recorded with every action and every access to personal data
    token_sha256: 9f86d081884c7d65...  # hex SHA-256 of the bearer token; the token itself is never stored
    role: operator                   # viewer: read only; operator: also replay, discard, pause, resume
```

The API takes `Authorization: Bearer <token>`; the dashboard's login form checks the token once and
sets an HttpOnly, SameSite=Strict cookie holding a server-side session id, never the token itself. A
producer token is refused on `/ops` (403), never mistaken for an operator. `RELAIS_OPS_TOKEN`, when set,
is one more operator (`ops-token`, role operator); with neither and `RELAIS_AUTH_DISABLED=true`, everyone
is operator `anonymous` (development).

Dashboard sessions: the cookie carries a random id; the ledger keeps its SHA-256, whose operator, and until
when. The operator's token is checked once, at sign-in, and never stored in the browser. A session names an
operator id, so a role change or a removal in RELAIS_OPERATORS_FILE applies to open sessions at once.
Sign-out deletes the row: the cookie is worthless afterwards, even if it was copied. Sessions live in
the ledger database, so every ingress replica knows them.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import sqlalchemy as sa
from fastapi import HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.core.clock import aware
from services.core.configfile import load_yaml_model, repeated
from services.core.settings import Settings
from services.core.shielded import shielded
from services.http.auth import note_refusal, request_token
from services.tracker.ledger import Ledger, ops_sessions

Role = Literal["viewer", "operator"]
_RANK: dict[str, int] = {"viewer": 0, "operator": 1}
COOKIE = "relais_ops"


class Operator(BaseModel):
    """One person (or tool) allowed on the operator API and dashboard."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
    token_sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    role: Role = "viewer"

    @field_validator("token_sha256")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.lower()

    def may(self, role: Role) -> bool:
        """True when this operator has `role` or a stronger one."""
        return _RANK[self.role] >= _RANK[role]


class OperatorFile(BaseModel):
    """The operators file's content."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    operators: list[Operator] = Field(default_factory=list)

    @field_validator("operators")
    @classmethod
    def _unique(cls, v: list[Operator]) -> list[Operator]:
        for attr in ("id", "token_sha256"):
            twice = repeated(getattr(o, attr) for o in v)
            if twice:
                raise ValueError(f"operator {attr} values must be unique; repeated: {', '.join(twice)[:200]}")
        return v


ANONYMOUS = Operator(id="anonymous", token_sha256="0" * 64, role="operator")


@dataclass(frozen=True)
class OperatorDirectory:
    """Every operator, plus whether unauthenticated access is allowed (development)."""

    operators: tuple[Operator, ...]
    open_access: bool = False

    def authenticate(self, token: str | None) -> Operator | None:
        """The operator whose token this is (hash compared in constant time), else None."""
        if not token:
            return ANONYMOUS if self.open_access else None
        digest = hashlib.sha256(token.encode()).hexdigest()
        found = None
        for operator in self.operators:  # no early exit: timing says nothing about which one matched
            if hmac.compare_digest(operator.token_sha256, digest):
                found = operator
        return found or (ANONYMOUS if self.open_access and not self.operators else None)

    def by_id(self, operator_id: str) -> Operator | None:
        """The operator with this id now (a session follows role changes and removals)."""
        if self.open_access and operator_id == ANONYMOUS.id:
            return ANONYMOUS
        return next((o for o in self.operators if o.id == operator_id), None)


def load_operators(settings: Settings) -> OperatorDirectory:
    """The operators of this Relais, from RELAIS_OPERATORS_FILE and RELAIS_OPS_TOKEN."""
    operators: list[Operator] = []
    if settings.operators_file is not None:
        operators += load_yaml_model(Path(settings.operators_file), OperatorFile, "operators").operators
    if settings.ops_token:
        operators.append(Operator(id="ops-token", role="operator",
                                  token_sha256=hashlib.sha256(settings.ops_token.encode()).hexdigest()))
    return OperatorDirectory(tuple(operators), open_access=settings.auth_disabled and not operators)


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
    return str(row[0]) if aware(row[1]) > datetime.now(UTC) else None


@shielded
async def close_session(ledger: Ledger, session_id: str) -> None:
    """Sign out: the session id is worthless from now on."""
    async with ledger.engine.begin() as conn:
        await conn.execute(ops_sessions.delete().where(ops_sessions.c.id_sha256 == _digest(session_id)))


async def identify(request: Request) -> Operator | None:
    """The operator making this request (bearer token, else the dashboard's session cookie), or None."""
    directory: OperatorDirectory = request.app.state.operators
    token = request_token(request)
    session_id = request.cookies.get(COOKIE)
    if token is None and session_id:
        operator_id = await session_operator(request.app.state.ops.ledger, session_id)
        return directory.by_id(operator_id) if operator_id else None
    return directory.authenticate(token)


async def check(request: Request, role: Role) -> Operator:
    """The operator making this request if they hold `role`; raises 401/403 otherwise (audited, rate-limited)."""
    try:
        return await _check(request, role)
    except HTTPException as exc:
        note_refusal(request, "ops", exc.status_code, str(exc.detail))
        raise


async def _check(request: Request, role: Role) -> Operator:
    token = request_token(request)
    operator = await identify(request)
    if operator is None:
        producers = getattr(getattr(request.app.state, "ingress", None), "producers", None)
        if token and producers is not None and producers.authenticate(token) is not None:
            raise HTTPException(403, "producer tokens are not accepted on /ops: use an operator token "
                                     "(RELAIS_OPERATORS_FILE)")
        raise HTTPException(401, "operator credentials required: send 'Authorization: Bearer <operator token>'",
                            headers={"WWW-Authenticate": "Bearer"})
    if not operator.may(role):
        raise HTTPException(403, f"operator {operator.id} has role {operator.role}; this needs role {role}")
    return operator


async def viewer(request: Request) -> Operator:
    """FastAPI dependency: any operator (viewer or operator role)."""
    return await check(request, "viewer")


async def operator(request: Request) -> Operator:
    """FastAPI dependency: an operator allowed to act (role operator)."""
    return await check(request, "operator")
