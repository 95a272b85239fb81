"""The tracker's hot statements, compiled once per dialect and run with plain tuples.

SQLAlchemy Core builds, caches and binds a statement on every execute: 60–180 µs of CPU per statement (an
IN list the most), most of the tracker's CPU per Bundle once a poll's statements ran on one thread. Here
each statement shape is built and compiled once by SQLAlchemy (so its SQL is the dialect's own), and each
execution only converts values with the columns' own processors — DateTime, JSON and SealedJSON exactly as
Core would — and hands the driver tuples through `exec_driver_sql` (errors still arrive as SQLAlchemy's).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import CursorResult, Dialect

Processor = Callable[[Any], Any] | None


@dataclass(frozen=True, slots=True)
class Prepared:
    """One statement shape compiled for one dialect: its SQL, its binds in order, its result columns."""

    sql: str
    positional: bool
    names: tuple[str, ...]
    binds: tuple[Processor, ...]
    columns: tuple[str, ...]
    results: tuple[Processor, ...]
    constants: Mapping[str, Any]  # values the statement itself binds (`audit_head.c.id == 1`)

    def run(self, conn: sa.Connection, rows: Sequence[Mapping[str, Any]]) -> CursorResult[Any]:
        """Execute once per row of bind values (one row: execute; several: executemany)."""
        params = [self._params(row) for row in rows]
        return conn.exec_driver_sql(self.sql, params[0] if len(params) == 1 else params)

    def all(self, conn: sa.Connection, row: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The result rows as dicts of column name → value, converted as Core would."""
        return [{name: value if convert is None else convert(value)
                 for name, convert, value in zip(self.columns, self.results, found, strict=True)}
                for found in self.run(conn, [row]).fetchall()]

    def _params(self, row: Mapping[str, Any]) -> Any:
        row = {**self.constants, **row} if self.constants else row
        values = [row[name] if convert is None else convert(row[name]) for name, convert in zip(self.names, self.binds,
                                                                                                strict=True)]
        return tuple(values) if self.positional else dict(zip(self.names, values, strict=True))


_CACHE: dict[tuple[str, str, Hashable], Prepared] = {}


def prepared(conn: sa.Connection, key: Hashable, build: Callable[[], Any],
             column_keys: Sequence[str] | None = None) -> Prepared:
    """The statement `build()` makes, compiled for `conn`'s dialect once per `key` (which names its shape)."""
    dialect = conn.dialect
    cache_key = (dialect.name, dialect.driver, key)
    found = _CACHE.get(cache_key)
    if found is None:
        statement = build()
        compiled = statement.compile(dialect=dialect, column_keys=list(column_keys) if column_keys else None)
        names = tuple(compiled.positiontup or ()) if compiled.positional else tuple(compiled.binds)
        columns = tuple(getattr(statement, "exported_columns", ()))
        found = _CACHE[cache_key] = Prepared(
            sql=compiled.string, positional=compiled.positional, names=names,
            binds=tuple(_bind_processor(compiled.binds[name].type, dialect) for name in names),
            columns=tuple(c.key for c in columns),
            results=tuple(c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns),
            constants={name: bind.value for name, bind in compiled.binds.items() if bind.value is not None})
    return found


def _bind_processor(type_: sa.types.TypeEngine[Any], dialect: Dialect) -> Processor:
    return type_.dialect_impl(dialect).bind_processor(dialect)


def insert(conn: sa.Connection, table: sa.Table, rows: Sequence[Mapping[str, Any]], *,
           skip_existing: bool = False) -> None:
    """INSERT `rows` (each with the same keys: the columns written) in one executemany; with `skip_existing`,
    a row whose key is already there is left out (ON CONFLICT DO NOTHING) instead of failing."""
    if not rows:
        return
    keys = tuple(rows[0])

    def build() -> Any:
        if not skip_existing:
            return table.insert()
        dialect_insert = _INSERTS.get(conn.dialect.name)
        if dialect_insert is None:
            raise NotImplementedError(f"the ledger runs on SQLite or PostgreSQL, not {conn.dialect.name}")
        return dialect_insert(table).on_conflict_do_nothing()

    prepared(conn, ("insert", table.name, keys, skip_existing), build, column_keys=keys).run(conn, rows)


_INSERTS: dict[str, Callable[[sa.Table], Any]] = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


def select_in(conn: sa.Connection, columns: Sequence[sa.ColumnElement[Any]], column: sa.Column[Any],
              values: Sequence[Any]) -> list[dict[str, Any]]:
    """SELECT `columns` WHERE `column` IN `values` (one compiled shape per length of the list)."""
    if not values:
        return []
    shape = ("select-in", tuple(str(c) for c in columns), str(column), len(values))
    statement = prepared(conn, shape, lambda: sa.select(*columns).where(column.in_(
        [sa.bindparam(f"v{i}", type_=column.type) for i in range(len(values))])))
    return statement.all(conn, {f"v{i}": value for i, value in enumerate(values)})


def update(conn: sa.Connection, table: sa.Table, keys: Sequence[str], columns: Sequence[str],
           rows: Sequence[Mapping[str, Any]]) -> None:
    """UPDATE `table` SET `columns` WHERE its `keys` equal each row's (rows hold keys and columns by name)."""
    if not rows:
        return

    def build() -> Any:
        where = sa.and_(*(table.c[k] == sa.bindparam(f"k_{k}", type_=table.c[k].type) for k in keys))
        return table.update().where(where).values({c: sa.bindparam(f"c_{c}", type_=table.c[c].type) for c in columns})

    statement = prepared(conn, ("update", table.name, tuple(keys), tuple(columns)), build)
    statement.run(conn, [{**{f"k_{k}": row[k] for k in keys}, **{f"c_{c}": row[c] for c in columns}} for row in rows])
