"""Ledger columns that may quote health data, encrypted at rest like the records and blobs.

The validator's diagnostics quote the values they reject ("gender is 'X'"), and a target's
OperationOutcome or transaction-response says whatever it says: both would sit in clear in the ledger
database even with encryption at rest on. Rather than lose that text (producers and operators need
it), the columns that hold it (`transfers.outcome`, `deliveries.response`, `deliveries.outcome`,
`events.detail`) are `SealedJSON`: with a keyring installed, each value is stored as
`{"$sealed": "rls1:<kid>:<wrapped DEK>:<nonce+ciphertext>"}` (AES-256-GCM, per-value data key, the
same keys as the bus) and opened on read. Without a keyring values are plain JSON, and plain values
written before encryption was turned on still read.

The keyring is per process (`install`), set where the process starts (the launcher and the operator
commands), because SQLAlchemy column types see no connection-level state.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection

from services.core.crypto import DecryptionError, Keyring
from services.core.settings import Settings

PREFIX = "rls1:"
MARK = "$sealed"
_AAD = b"relais-ledger/1"
_keyring: Keyring | None = None


def install(keyring: Keyring | Settings | None) -> None:
    """Seal ledger values with this keyring from now on (None: plain JSON)."""
    global _keyring
    _keyring = Keyring.from_settings(keyring) if isinstance(keyring, Settings) else keyring


def seal_value(keyring: Keyring, value: Any) -> dict[str, str]:
    """A JSON value sealed under the current key."""
    sealed, kid, wrapped = keyring.seal(orjson.dumps(value), _AAD)
    return {MARK: f"{PREFIX}{kid}:{base64.b64encode(wrapped).decode()}:{base64.b64encode(sealed).decode()}"}


def is_sealed(value: Any) -> bool:
    """True for a value `seal_value` made."""
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get(MARK), str)


def sealed_kid(value: dict[str, str]) -> str:
    """The key id sealing a sealed value."""
    return value[MARK][len(PREFIX):].split(":", 1)[0]


def open_value(keyring: Keyring | None, value: dict[str, str]) -> Any:
    """The JSON value inside; DecryptionError when it does not open."""
    if keyring is None:
        raise DecryptionError("ledger value is encrypted but no encryption key is configured")
    try:
        kid, wrapped, sealed = value[MARK][len(PREFIX):].split(":", 2)
        return orjson.loads(keyring.open_(base64.b64decode(sealed), kid, base64.b64decode(wrapped), _AAD))
    except (ValueError, binascii.Error, orjson.JSONDecodeError) as exc:
        raise DecryptionError(f"ledger value is not a sealed value Relais wrote: {exc}") from exc


def unreadable(reason: str) -> dict[str, Any]:
    """What a reader gets for a value it cannot open: an OperationOutcome saying why (never an exception)."""
    return {"resourceType": "OperationOutcome", "sealed": True,
            "issue": [{"severity": "information", "code": "security", "diagnostics": reason}]}


class SealedJSON(sa.types.TypeDecorator[Any]):
    """JSON, sealed at rest when the process has a keyring."""

    impl = sa.JSON
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        """Seal on the way in."""
        if value is None or _keyring is None:
            return value
        return seal_value(_keyring, value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        """Open on the way out; a value that cannot be opened reads as an OperationOutcome saying so."""
        if not is_sealed(value):
            return value
        try:
            return open_value(_keyring, value)
        except DecryptionError as exc:
            return unreadable(f"encrypted at rest and cannot be opened here: {exc}")


def sealed_columns(metadata: sa.MetaData) -> list[sa.Column[Any]]:
    """Every SealedJSON column of the ledger's tables."""
    return [c for t in metadata.sorted_tables for c in t.columns if isinstance(c.type, SealedJSON)]


async def reseal(conn: AsyncConnection, metadata: sa.MetaData, keyring: Keyring,
                 progress: Callable[[str, int], None] | None = None) -> int:
    """Seal every ledger value (plain or under another key) under the current key; how many changed."""
    changed = 0
    for column in sealed_columns(metadata):
        table = column.table
        assert isinstance(table, sa.Table)
        keys = list(table.primary_key.columns)
        raw = sa.cast(column, sa.Text)  # read the stored JSON, bypassing the column type
        rows = (await conn.execute(sa.select(*keys, raw.label("raw")).where(column.is_not(None)))).all()
        for row in rows:
            stored = orjson.loads(row.raw) if row.raw is not None else None
            if stored is None or (is_sealed(stored) and sealed_kid(stored) == keyring.current):
                continue
            value = open_value(keyring, stored) if is_sealed(stored) else stored
            where = sa.and_(*(k == row[i] for i, k in enumerate(keys)))
            await conn.execute(table.update().where(where).values({column.name: sa.type_coerce(
                seal_value(keyring, value), sa.JSON)}))
            changed += 1
        if progress is not None:
            progress(f"{table.name}.{column.name}", len(rows))
    return changed


async def kids_in_use(conn: AsyncConnection, metadata: sa.MetaData) -> dict[str, int]:
    """How many ledger values each key id seals."""
    counts: dict[str, int] = {}
    for column in sealed_columns(metadata):
        raw = sa.cast(column, sa.Text)
        for (text,) in (await conn.execute(sa.select(raw).where(raw.like(f'%"{PREFIX}%')))).all():
            stored = orjson.loads(text)
            if is_sealed(stored):
                kid = sealed_kid(stored)
                counts[kid] = counts.get(kid, 0) + 1
    return counts
