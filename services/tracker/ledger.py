"""The ledger: each transfer's status, per-target deliveries and history, projected from `transfers.events`.

SQLAlchemy Core over an async engine: SQLite (default) or PostgreSQL (`RELAIS_DATABASE_URL`). The
tracker is its only writer; ingress reads it to answer `GET /transfers/{id}`. It never stores a
Bundle — only ids, statuses, the targets' transaction-responses and OperationOutcomes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import functools
import hashlib
import hmac
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from services.core.clock import aware
from services.core.errors import ConfigurationError, TransientError
from services.core.shielded import shielded
from services.tracker import logic, prepared
from services.tracker.dbfaults import unavailable
from services.tracker.projection import Event, Projection
from services.tracker.sealed import SealedJSON

T = TypeVar("T")
metadata = sa.MetaData()
SCHEMA_LOCK_KEY = 0x52454C41  # "RELA": PostgreSQL advisory lock taken while creating the schema

transfers = sa.Table(
    "transfers", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("producer", sa.String(128), index=True),
    sa.Column("stage_status", sa.String(32), nullable=False),
    sa.Column("status", sa.String(32), nullable=False, index=True),
    sa.Column("targets", sa.JSON, nullable=True),
    sa.Column("size", sa.Integer, nullable=True),
    sa.Column("outcome", SealedJSON, nullable=True),  # quotes rejected values: sealed at rest (tracker/sealed.py)
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    # FINESS numbers the transfer concerns, as ",750000001,750000002," so one LIKE finds one of them.
    sa.Column("finess", sa.String(512), nullable=True),
    # Operator queries: newest first, optionally by producer or status (cursor pagination on (created_at, id)).
    sa.Index("ix_transfers_created_id", "created_at", "id"),
    sa.Index("ix_transfers_producer_created", "producer", "created_at"),
    sa.Index("ix_transfers_status_created", "status", "created_at"),
    sa.Index("ix_transfers_updated", "updated_at"),
)

deliveries = sa.Table(
    "deliveries", metadata,
    sa.Column("transfer_id", sa.String(64), primary_key=True),
    sa.Column("target", sa.String(64), primary_key=True),
    sa.Column("status", sa.String(32), nullable=False, index=True),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("response", SealedJSON, nullable=True),  # the target's words: sealed at rest
    sa.Column("assigned", sa.JSON, nullable=True),  # producer's fullUrl -> location the target assigned
    sa.Column("outcome", SealedJSON, nullable=True),
    sa.Column("last_http_status", sa.Integer, nullable=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    # Per-target views: waiting records and dead letters of one target.
    sa.Index("ix_deliveries_target_status", "target", "status"),
)

events = sa.Table(
    "events", metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # the CloudEvents id: replays are no-ops
    sa.Column("transfer_id", sa.String(64), nullable=False, index=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("stage", sa.String(32), nullable=False),
    sa.Column("target", sa.String(64), nullable=True),
    sa.Column("attempt", sa.Integer, nullable=False, default=0),
    sa.Column("time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("detail", SealedJSON, nullable=True),  # copies outcomes and responses: sealed at rest
    # A transfer's timeline in order; a target's recent outcomes (success rate, latency).
    sa.Index("ix_events_transfer_time", "transfer_id", "time"),
    sa.Index("ix_events_target_kind_time", "target", "kind", "time"),
)

# Dead letters of a stage (the runner's poison topic): one row per (transfer, slot), where slot names the
# stage that could not handle the record ("@validator", or "@delivery:<target>"). Delivery dead letters
# live in `deliveries`; `services.dlq` lists both as one queue. The payload stays on the poison topic.
stage_dead_letters = sa.Table(
    "stage_dead_letters", metadata,
    sa.Column("transfer_id", sa.String(64), primary_key=True),
    sa.Column("slot", sa.String(128), primary_key=True),
    sa.Column("stage", sa.String(32), nullable=False),
    sa.Column("target", sa.String(64), nullable=True),
    sa.Column("status", sa.String(32), nullable=False, index=True),
    # Sealed at rest (a reason may quote content): reason, topic, partition, offset, key, poison_id, attempts.
    sa.Column("detail", SealedJSON, nullable=True),
    sa.Column("dead_lettered_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)


def stage_slot(stage: str, target: str | None) -> str:
    """The operator-facing name of a stage's dead letter within its transfer."""
    return f"@{stage}:{target}" if target else f"@{stage}"


# Operator state, written by the ops API and not projected from events (a rebuild leaves it alone).
target_state = sa.Table(
    "target_state", metadata,
    sa.Column("target", sa.String(64), primary_key=True),
    sa.Column("paused", sa.Boolean, nullable=False, default=False),
    sa.Column("reason", sa.String(500), nullable=True),
    sa.Column("changed_by", sa.String(128), nullable=True),
    sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
)

# Each delivery process's view of each target's circuit breaker (breakers live in process memory).
target_circuits = sa.Table(
    "target_circuits", metadata,
    sa.Column("target", sa.String(64), primary_key=True),
    sa.Column("process", sa.String(128), primary_key=True),
    sa.Column("circuit", sa.String(16), nullable=False),
    sa.Column("failures", sa.Integer, nullable=False, default=0),
    sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
)

# Dashboard sign-ins: the cookie holds a random session id, this table its SHA-256 (never the operator's token).
ops_sessions = sa.Table(
    "ops_sessions", metadata,
    sa.Column("id_sha256", sa.String(64), primary_key=True),
    sa.Column("operator", sa.String(128), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False, index=True),
)

# Search keys of the business identifier values a transfer's Bundle carries: HMAC-SHA-256, under a key derived from
# the audit key (never in the database), of each value's SHA-256 (services.core.identifiers), base64url: 43
# characters. A plain hash of an INS would be reversed by trying every plausible number.
transfer_identifiers = sa.Table(
    "transfer_identifiers", metadata,
    sa.Column("digest", sa.String(64), primary_key=True),
    sa.Column("transfer_id", sa.String(64), primary_key=True),
)

# Delivery's journal of attempts (services/delivery/journal.py), written *before* each POST to a target:
# after a crash, a started attempt with no outcome is known to be in doubt, not blindly sent again.
delivery_attempts = sa.Table(
    "delivery_attempts", metadata,
    sa.Column("transfer_id", sa.String(64), primary_key=True),
    sa.Column("target", sa.String(64), primary_key=True),
    sa.Column("round", sa.Integer, primary_key=True),    # 0, then one more per DLQ replay
    sa.Column("attempt", sa.Integer, primary_key=True),  # 1-based within the round
    sa.Column("state", sa.String(16), nullable=False),   # started | delivered | not-applied | in-doubt
    sa.Column("process", sa.String(128), nullable=True),
    # host|boot id|PID namespace|PID|start time of the process that made it (services/delivery/liveness.py)
    sa.Column("incarnation", sa.String(320), nullable=True),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),  # the outcome is committed on the bus
    sa.Column("http_status", sa.Integer, nullable=True),
    sa.Column("response", SealedJSON, nullable=True),  # a delivered attempt's transaction-response: sealed at rest
    sa.Column("assigned", sa.JSON, nullable=True),
)

# Who looked at what: every operator access to a Bundle or to personal data is recorded here.
access_log = sa.Table(
    "access_log", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("time", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("operator", sa.String(128), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("transfer_id", sa.String(64), nullable=True, index=True),
    sa.Column("target", sa.String(64), nullable=True),
    sa.Column("detail", sa.JSON, nullable=True),
)


# What ingress accepted, written by ingress itself before it answers 202 (services/ingress/submissions.py):
# the status URL answers from here until the tracker has projected the transfer, on every replica, and
# a producer's Idempotency-Key (or Bundle.identifier) maps to one transfer. Not projected from events.
submissions = sa.Table(
    "submissions", metadata,
    sa.Column("transfer_id", sa.String(64), primary_key=True),
    sa.Column("producer", sa.String(128), nullable=False),
    sa.Column("idem_key", sa.String(320), nullable=True),  # None: the producer gave no key
    sa.Column("fingerprint", sa.String(64), nullable=False),  # SHA-256 of the targets and the body
    sa.Column("state", sa.String(16), nullable=False),  # publishing | published | failed
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    # Two requests with one key, at once, on two replicas: the database lets exactly one insert win.
    sa.UniqueConstraint("producer", "idem_key", name="uq_submissions_producer_key"),
)


@dataclass(frozen=True, slots=True)
class LedgerEvent:
    """One fact from `transfers.events`, as the ledger records it."""

    id: str
    transfer_id: str
    kind: str
    stage: str
    time: datetime
    producer: str | None = None
    target: str | None = None
    attempt: int = 0
    detail: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class DeliveryView:
    """One target's side of a transfer."""

    target: str
    status: str
    attempts: int
    response: dict[str, Any] | None
    outcome: dict[str, Any] | None
    last_http_status: int | None
    assigned: dict[str, str] | None = None  # the producer's fullUrl -> the location the target assigned


@dataclass(frozen=True, slots=True)
class TransferView:
    """What the ledger knows of one transfer."""

    id: str
    producer: str | None
    status: str
    stage_status: str
    targets: list[str]
    outcome: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    deliveries: list[DeliveryView]


class Ledger:
    """Async access to the ledger database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: AsyncEngine = _engine(url)
        # The identifier search keys' secret, given by `audit.bind` (it comes with the audit key).
        self.identifier_key: Callable[[], bytes] | None = None
        # Ingress's submissions (written before each 202) live where no worker writes: SQLite has one
        # writer per file, so in the ledger file every 202 would queue behind the tracker's and the
        # delivery journal's transactions. PostgreSQL locks rows: one database serves both.
        sibling = _submissions_url(url)
        self.submissions_engine: AsyncEngine = self.engine if sibling is None else _engine(sibling)
        self._writer = _SqliteWriter(url) if _sqlite_file(url) is not None else None  # see `write`

    async def create_schema(self) -> None:
        """Create missing tables and columns (idempotent, and safe when several processes start at once).

        create_all checks, then creates; ingress, tracker and delivery all call this at start, so the
        check-and-create is serialised across processes: an advisory lock on PostgreSQL, a file lock
        beside the database on SQLite.
        """
        apart = self.submissions_engine is not self.engine
        async with self._schema_lock():
            async with self.engine.begin() as conn:
                if self.engine.dialect.name == "postgresql":
                    await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
                tables = [t for t in metadata.sorted_tables if not (apart and t is submissions)]
                await conn.run_sync(lambda sync: metadata.create_all(sync, tables=tables))
                await conn.run_sync(_add_missing_columns)
            if apart:
                async with self.submissions_engine.begin() as conn:
                    await conn.run_sync(lambda sync: submissions.create(sync, checkfirst=True))
                await self._move_submissions_out()

    async def _move_submissions_out(self) -> None:
        """A ledger file from before the submissions had their own file: move its rows there (once)."""
        async with self.engine.begin() as conn:
            if not await conn.run_sync(lambda sync: sa.inspect(sync).has_table("submissions")):
                return
            rows = [dict(r) for r in (await conn.execute(sa.select(submissions))).mappings()]
            if rows:
                async with self.submissions_engine.begin() as target:
                    await target.execute(submissions.insert().prefix_with("OR IGNORE"), rows)
            await conn.execute(sa.text("DROP TABLE submissions"))

    @contextlib.asynccontextmanager
    async def _schema_lock(self) -> AsyncIterator[None]:
        database = self.engine.url.database
        if self.engine.dialect.name != "sqlite" or not database or database == ":memory:":
            yield
            return
        with open(f"{database}.schema-lock", "a+b") as lock:  # noqa: ASYNC230 - opening a lock file is instant
            await asyncio.to_thread(fcntl.flock, lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    async def close(self) -> None:
        """Release connections; safe twice."""
        await self.engine.dispose()
        await self.submissions_engine.dispose()
        if self._writer is not None:
            await self._writer.close()

    # --- writing (tracker) ---------------------------------------------------------------
    @shielded
    async def write(self, fn: Callable[[sa.Connection], T]) -> T:
        """Run `fn` on a connection in one transaction, its statements in one go; what `fn` returns.

        On a SQLite file, on a synchronous engine and a thread of its own, in BEGIN IMMEDIATE (the write
        lock first, so reading then writing never fails on another process's commit): through aiosqlite each
        statement was a hop to its thread and back, ~200 µs of CPU, most of the tracker's CPU per Bundle.
        On PostgreSQL, `fn` runs on the async engine (asyncpg has no thread to hop to).
        """
        if self._writer is not None:
            return await self._writer.run(fn)
        async with self.engine.begin() as conn:
            return await conn.run_sync(fn)

    @property
    def write_engine(self) -> sa.Engine:
        """The engine whose transactions `write` runs (to listen to its events: commits, statements)."""
        return self._writer.engine if self._writer is not None else self.engine.sync_engine

    async def apply_many(self, evs: Sequence[LedgerEvent],
                         also: Callable[[sa.Connection, Sequence[LedgerEvent]], None] | None = None) -> int:
        """Project a poll's events in one transaction; returns how many were new (replays change nothing).

        The rows the events concern are read once, moved in memory (`projection.py`) and written back in a
        few statements. `also` writes more for the same events in the same transaction (the audit trail's rows).
        """
        batch = list({ev.id: ev for ev in evs}.values())  # one copy of each id, where it first came
        if not batch:
            return 0
        write = functools.partial(_apply_events, evs=batch, identifier_secret=self._identifier_secret, also=also)
        with unavailable("ledger"):
            for _ in range(5):
                try:
                    return await self.write(write)
                except IntegrityError:
                    continue  # another writer applied some of them meanwhile: the next try skips those
        raise TransientError("ledger writes kept conflicting with another writer's; the poll will be retried")

    async def apply(self, ev: LedgerEvent) -> bool:
        """Project one event; returns False when it was already applied (at-least-once input)."""
        return await self.apply_many([ev]) == 1

    def search_digest(self, identifier_sha256: str) -> str:
        """The search key this ledger files an identifier under (its SHA-256 from `core.identifiers.digest`)."""
        return _search_digest(self._identifier_secret(), identifier_sha256)

    def _identifier_secret(self) -> bytes:
        if self.identifier_key is None:
            raise ConfigurationError("this ledger has no identifier search key: call audit.bind(ledger, settings) "
                                     "where the ledger is built")
        return self.identifier_key()

    @shielded
    async def rekey_identifiers(self) -> int:
        """File the plain SHA-256 search keys of an older ledger under the keyed ones; returns how many."""
        secret, moved = self._identifier_secret(), 0
        while True:
            async with self.engine.begin() as conn:
                plain = (await conn.execute(sa.select(transfer_identifiers).where(
                    sa.func.length(transfer_identifiers.c.digest) == 64).limit(1000))).all()
                if not plain:
                    return moved
                keyed = {(_search_digest(secret, d), t) for d, t in plain}
                await conn.execute(transfer_identifiers.delete().where(sa.tuple_(
                    transfer_identifiers.c.digest, transfer_identifiers.c.transfer_id).in_([tuple(r) for r in plain])))
                present = {(d, t) for d, t in (await conn.execute(sa.select(transfer_identifiers).where(
                    transfer_identifiers.c.transfer_id.in_({t for _, t in keyed})))).all()}
                fresh = [{"digest": d, "transfer_id": t} for d, t in sorted(keyed - present)]
                if fresh:
                    await conn.execute(transfer_identifiers.insert(), fresh)
                moved += len(plain)

    # --- reading (ingress, operators) ----------------------------------------------------
    @shielded
    async def get(self, transfer_id: str) -> TransferView | None:
        """One transfer with its deliveries, or None when the ledger has not seen it."""
        with unavailable("ledger"):
            async with self.engine.connect() as conn:
                row = (await conn.execute(
                    sa.select(transfers).where(transfers.c.id == transfer_id))).mappings().first()
                if row is None:
                    return None
                rows = (await conn.execute(
                    sa.select(deliveries).where(deliveries.c.transfer_id == transfer_id)
                    .order_by(deliveries.c.target))).mappings().all()
        return TransferView(
            id=row["id"], producer=row["producer"], status=row["status"], stage_status=row["stage_status"],
            targets=list(row["targets"] or []), outcome=row["outcome"],
            created_at=aware(row["created_at"]), updated_at=aware(row["updated_at"]),
            deliveries=[DeliveryView(r["target"], r["status"], r["attempts"], r["response"], r["outcome"],
                                     r["last_http_status"], r["assigned"]) for r in rows],
        )

    @shielded
    async def warnings(self, transfer_id: str) -> list[tuple[str, str | None, dict[str, Any]]]:
        """(kind, target, detail) of the events that carry warnings for the producer: the validator's
        findings (`validated`) and the envelope repairs made for a target (`repaired`), oldest first."""
        with unavailable("ledger"):
            async with self.engine.connect() as conn:
                rows = (await conn.execute(
                    sa.select(events.c.kind, events.c.target, events.c.detail)
                    .where(events.c.transfer_id == transfer_id, events.c.kind.in_(("validated", "repaired")))
                    .order_by(events.c.time))).all()
        return [(kind, target, dict(detail or {})) for kind, target, detail in rows]

    async def count_by_status(self) -> dict[str, int]:
        """How many transfers are in each status."""
        with unavailable("ledger"):
            async with self.engine.connect() as conn:
                rows = (await conn.execute(
                    sa.select(transfers.c.status, sa.func.count()).group_by(transfers.c.status))).all()
        return {status: n for status, n in rows}


def _event_row(ev: LedgerEvent) -> dict[str, Any]:
    return {"id": ev.id, "transfer_id": ev.transfer_id, "kind": ev.kind, "stage": ev.stage, "target": ev.target,
            "attempt": ev.attempt, "time": ev.time, "detail": dict(ev.detail or {})}


def _chunks(values: Sequence[Any], size: int = 500) -> list[Sequence[Any]]:
    """IN lists of a bounded length (databases cap a statement's parameters)."""
    return [values[i:i + size] for i in range(0, len(values), size)]


def _apply_events(conn: sa.Connection, evs: Sequence[LedgerEvent], identifier_secret: Callable[[], bytes],
                  also: Callable[[sa.Connection, Sequence[LedgerEvent]], None] | None) -> int:
    """Project the events the ledger has not recorded yet (by id), then `also`; how many were new."""
    known: set[str] = set()
    for chunk in _chunks([ev.id for ev in evs]):
        known.update(row["id"] for row in prepared.select_in(conn, [events.c.id], events.c.id, chunk))
    fresh = [ev for ev in evs if ev.id not in known]
    if fresh:
        prepared.insert(conn, events, [_event_row(ev) for ev in fresh])
        _project(conn, fresh, identifier_secret)
    if also is not None:
        also(conn, evs)
    return len(fresh)


def _project(conn: sa.Connection, evs: Sequence[LedgerEvent], identifier_secret: Callable[[], bytes]) -> None:
    """Read the rows the events concern, move them in memory, write back what changed."""
    ids = sorted({ev.transfer_id for ev in evs})
    loaded_transfers: dict[str, dict[str, Any]] = {}
    loaded_deliveries: dict[str, dict[str, dict[str, Any]]] = {}
    for chunk in _chunks(ids):
        for row in prepared.select_in(conn, list(transfers.columns), transfers.c.id, chunk):
            row.update(created_at=aware(row["created_at"]), updated_at=aware(row["updated_at"]))
            loaded_transfers[row["id"]] = row
        for row in prepared.select_in(conn, list(deliveries.columns), deliveries.c.transfer_id, chunk):
            loaded_deliveries.setdefault(row["transfer_id"], {})[row["target"]] = row
    moved = Projection(loaded_transfers, loaded_deliveries)
    for ev in evs:
        moved.apply(ev)

    prepared.insert(conn, transfers, [moved.transfers[i] for i in sorted(moved.new_transfers)])
    for columns, keys in _by_columns(moved.changed_transfers).items():
        prepared.update(conn, transfers, ("id",), columns, [moved.transfers[k] for k in keys])
    prepared.insert(conn, deliveries, [moved.deliveries[t][target] for t, target in sorted(moved.new_deliveries)])
    for columns, pairs in _by_columns(moved.changed_deliveries).items():
        prepared.update(conn, deliveries, ("transfer_id", "target"), columns,
                        [moved.deliveries[t][target] for t, target in pairs])
    if moved.identifiers:
        secret = identifier_secret()
        _index_identifiers(conn, {t: {_search_digest(secret, d) for d in ds} for t, ds in moved.identifiers.items()})
    for dead in moved.dead_letter_events:
        _project_stage_dead_letter(conn, dead)  # rare: one at a time, in order, through Core


def _search_digest(secret: bytes, identifier_sha256: str) -> str:
    mac = hmac.new(secret, identifier_sha256.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def _by_columns(changed: Mapping[Any, set[str]]) -> dict[tuple[str, ...], list[Any]]:
    """Changed rows grouped by the columns they change: one executemany per group."""
    groups: dict[tuple[str, ...], list[Any]] = {}
    for key, columns in sorted(changed.items()):
        groups.setdefault(tuple(sorted(columns)), []).append(key)
    return groups


def _index_identifiers(conn: sa.Connection, digests: Mapping[str, set[str]]) -> None:
    """Remember each transfer's identifier digests (a replayed event adds nothing new).

    ON CONFLICT DO NOTHING, not a read of what is there first: no index leads with `transfer_id`, so that
    read scanned the whole table on every poll (most of the tracker's SQLite time, growing with the ledger).
    """
    wanted = sorted({(d, tid) for tid, ds in digests.items() for d in ds})
    prepared.insert(conn, transfer_identifiers, [{"digest": d, "transfer_id": t} for d, t in wanted],
                    skip_existing=True)


def _project_stage_dead_letter(conn: sa.Connection, ev: Event) -> None:
    """A stage's dead letter appears (`failed`), or is closed by an operator (`replayed`, `discarded`)."""
    detail = dict(ev.detail or {})
    if ev.kind != "failed":
        where = ((stage_dead_letters.c.transfer_id == ev.transfer_id)
                 & (stage_dead_letters.c.slot == str(detail["slot"])))
        status = logic.REPLAYED if ev.kind == "replayed" else logic.DISCARDED
        conn.execute(stage_dead_letters.update().where(where).values(status=status, updated_at=ev.time))
        return
    slot = stage_slot(ev.stage, ev.target)
    values = {"stage": ev.stage, "target": ev.target, "status": logic.DEAD_LETTERED, "detail": detail,
              "dead_lettered_at": ev.time, "updated_at": ev.time}
    where = (stage_dead_letters.c.transfer_id == ev.transfer_id) & (stage_dead_letters.c.slot == slot)
    if (conn.execute(stage_dead_letters.update().where(where).values(**values))).rowcount == 0:
        conn.execute(stage_dead_letters.insert().values(transfer_id=ev.transfer_id, slot=slot, **values))


def _add_missing_columns(sync_conn: Any) -> None:
    """Columns added to a table after a ledger was created (create_all only creates missing tables)."""
    inspector = sa.inspect(sync_conn)
    for table in (transfers, deliveries, delivery_attempts):
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present:
                kind = column.type.compile(dialect=sync_conn.dialect)
                sync_conn.execute(sa.text(f'ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}'))


def _json_text(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def _engine(url: str) -> AsyncEngine:
    # JSON columns through orjson: the standard library's encoder was a tenth of the tracker's CPU (issue 16).
    kwargs: dict[str, Any] = {"json_serializer": _json_text, "json_deserializer": orjson.loads}
    if url.startswith("sqlite"):
        # One writer at a time is SQLite's nature; a generous timeout rides out the other's commit.
        kwargs["connect_args"] = {"timeout": 30}
    engine = create_async_engine(url, **kwargs)
    if url.startswith("sqlite"):
        sa.event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


class _SqliteWriter:
    """A synchronous engine on a SQLite ledger file and the one thread that runs its write transactions."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(make_url(url).set(drivername="sqlite"), json_serializer=_json_text,
                                       json_deserializer=orjson.loads, connect_args={"timeout": 30})
        sa.event.listen(self.engine, "connect", _writer_connect)
        sa.event.listen(self.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        self._thread: ThreadPoolExecutor | None = None
        self._conn: sa.Connection | None = None  # kept between transactions: no pool check-out, reset, check-in

    async def run(self, fn: Callable[[sa.Connection], T]) -> T:
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="ledger-writer")
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._transaction, fn)

    def _transaction(self, fn: Callable[[sa.Connection], T]) -> T:
        if self._conn is None:
            self._conn = self.engine.connect()
        try:
            with self._conn.begin():
                return fn(self._conn)
        except sa.exc.DBAPIError:
            self._drop()  # the file may have gone bad: the next transaction opens it afresh
            raise

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sa.exc.DBAPIError):
                conn.close()

    def _dispose(self) -> None:
        self._drop()
        self.engine.dispose()

    async def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(thread, self._dispose)  # after the pending writes
            thread.shutdown(wait=False)


def _writer_connect(dbapi_connection: Any, record: Any) -> None:
    dbapi_connection.isolation_level = None  # the driver's own BEGIN off: the engine says BEGIN IMMEDIATE
    _sqlite_pragmas(dbapi_connection, record)


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite ledger; None for PostgreSQL or an in-memory SQLite database."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    return Path(database)


def _submissions_url(url: str) -> str | None:
    """A SQLite ledger file's sibling for ingress's submissions (`ledger.db` → `ledger.submissions.db`);
    None when the submissions stay in the ledger database (PostgreSQL, in-memory SQLite)."""
    path = _sqlite_file(url)
    if path is None:
        return None
    return make_url(url).set(database=str(path.with_name(f"{path.stem}.submissions{path.suffix or '.db'}"))) \
        .render_as_string(hide_password=False)


def _sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
