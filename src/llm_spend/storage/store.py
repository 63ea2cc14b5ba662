"""Store: the ledger database behind a small async interface (SQLAlchemy Core, async).

One method per operation. Every write is one transaction: ledger rows, rollup increments and
reservation settlements commit together, so the rollups always equal the ledger's sums. Increments
are single ``INSERT ... ON CONFLICT DO UPDATE SET x = x + excluded.x`` statements, never
read-then-write. Rows are touched in key order so concurrent writers on PostgreSQL cannot deadlock.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, bindparam, case, delete, event, func, select, text, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from .pg_drivers import Drivers
from .pg_reserve import Pending, PostgresReservations
from .pg_write import warm as warm_writes
from .pg_write import write_batch
from .rows import (
    CALL_COLUMNS,
    SUMS,
    Outcome,
    PendingWrite,
    Refusal,
    WindowKey,
    call_row,
    rollup_deltas,
    spent_after,
    sqlite_call_rows,
    text_time,
    window_json,
)
from .schema import UTCDateTime, calls, meta, reservations, rollups
from .sqlite_file import SQLiteFile, database_path

__all__ = [
    "ASYNC_URLS",
    "HEAD_REVISION",
    "PendingWrite",
    "Refusal",
    "Store",
    "WindowKey",
    "driver_error",
    "parse_url",
]

HEAD_REVISION = "0002"
"""The newest migration in migrations/versions (a test pins it to Alembic's own head)."""

_MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


SWEEP_CHUNK = 500
"""Expired reservations a sweep frees per transaction: estimates held until their windows end all
expire at the same instant (a month's calls of unknown cost at its end), and one transaction for all
of them would hold the write lock, and their rows in memory, for as long as they are many."""

_WRITE = "llm_spend_write"
"""The execution option of write transactions: BEGIN IMMEDIATE on SQLite (`Store.transaction`)."""


def _sqlite_setup(engine: AsyncEngine) -> None:
    """WAL, a busy timeout, and BEGIN IMMEDIATE for every write transaction: it takes the write lock
    first, so it never fails upgrading a read lock (SQLITE_BUSY_SNAPSHOT). A read transaction begins
    deferred: it takes no lock, and writers of every process go on while it reads (WAL)."""

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        for pragma in ("journal_mode=WAL", "busy_timeout=30000", "synchronous=NORMAL", "foreign_keys=ON"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")


logger = logging.getLogger("llm_spend")
T = TypeVar("T")

ASYNC_URLS = "sqlite+aiosqlite:///FILE or postgresql+asyncpg://USER@HOST/DB"


def parse_url(url: object) -> URL:
    """A SQLite or PostgreSQL URL with an async driver, parsed; ValueError naming `url` for anything
    else (a sync driver fails only when it first connects, or with a missing module, otherwise)."""
    if not isinstance(url, str) or not url.strip() or "\x00" in url:
        raise ValueError(f"url: not a URL string (expected {ASYNC_URLS}), got {url!r}")
    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except ArgumentError as exc:  # NoSuchModuleError (an unknown dialect or driver) included
        raise ValueError(f"url: {exc} (expected {ASYNC_URLS})") from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql") or not getattr(dialect, "is_async", False):
        raise ValueError(
            f"url: not an async SQLite or PostgreSQL URL (expected {ASYNC_URLS}), got {parsed!r}"
        )
    return parsed


def driver_error(exc: BaseException) -> tuple[BaseException, str]:
    """The driver's error behind a SQLAlchemy one (else `exc`), and the first line of what it says:
    the reason, without SQLAlchemy's SQL, parameters and link."""
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    return cause, (str(cause).strip().splitlines() or [""])[0]


class Store:
    """The ledger database: create with a SQLAlchemy async URL, `await close()` when done."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float | None = None,
        watch: Mapping[tuple[str, str], int] | None = None,
    ) -> None:
        """`connect_timeout`: seconds a new PostgreSQL connection may take (asyncpg's default: 60).
        `watch`: (period, scope key) -> the smallest limit of a day or month budget on such windows
        (`budgets.watched`); a PostgreSQL write then returns a window's total only once it reached
        that, below which no budget has anything to judge, and never a window no budget watches.
        None: every total comes back."""
        parsed = parse_url(url)
        self.url = url
        self.dialect = parsed.get_backend_name()
        # Transactions always end explicitly (commit or rollback), so the pool need not reset
        # connections on return: that would be one more round trip per transaction.
        kwargs: dict[str, Any] = {"pool_reset_on_return": None}
        if self.dialect == "sqlite":
            kwargs["connect_args"] = {"timeout": 30}
            if parsed.database in (None, "", ":memory:"):
                # One connection holds the database, lent to one user at a time: a read beginning
                # on it while a write transaction is open there would fail (StaticPool shares it).
                kwargs.update(poolclass=AsyncAdaptedQueuePool, pool_size=1, max_overflow=0)
        else:
            kwargs.update(pool_size=16, max_overflow=4, pool_use_lifo=True)
            if connect_timeout is not None:
                kwargs["connect_args"] = {"timeout": connect_timeout}
        self.engine = create_async_engine(url, **kwargs)
        """Reads: `engine.connect()` (on SQLite a deferred transaction, which blocks no writer)."""
        self._write_engine = self.engine.execution_options(**{_WRITE: True})
        self.path = path = database_path(parsed) if self.dialect == "sqlite" else None
        """The file of a SQLite database (None in memory, and on PostgreSQL)."""
        self._file = SQLiteFile(path) if path is not None else None
        if self.dialect == "sqlite":
            _sqlite_setup(self.engine)
        self._sql = _Statements(sqlite.insert if self.dialect == "sqlite" else postgresql.insert)
        self._drivers = Drivers(self.engine)
        self._pg = (
            PostgresReservations(functools.partial(self._drivers.run, "reservations"))
            if self.dialect == "postgresql"
            else None
        )
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        self.watch = watch
        self._reserving: set[asyncio.Task[Refusal | None]] = set()
        """Reservations under way on a pooled connection (the loop keeps weak references only)."""

    async def warm(self) -> None:
        """Ready the connections and statements of the hot writes before the first call needs them."""
        if self._pg is not None:
            await self._pg.warm()
            await self._drivers.run("writes", warm_writes)

    async def close(self) -> None:
        if self._file is not None:
            await self._file.close()
        await self._drivers.close()
        await self.engine.dispose()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction (committed when the block ends without error). On SQLite it begins
        IMMEDIATE, and this process's writers take turns in memory first, so they never sleep in
        SQLite's busy handler waiting for each other (other processes still do)."""
        if self.dialect != "sqlite":
            async with self._write_engine.begin() as conn:
                yield conn
            return
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        async with lock, self._write_engine.begin() as conn:
            yield conn

    # -- schema -------------------------------------------------------------------------------------

    async def migrate(self) -> None:
        """Bring the schema to the newest migration; safe to call again and from many processes.

        A schema already at the newest revision is left alone without loading Alembic (a start
        costs a query, not Alembic's import, about half a second on a slow machine)."""
        if await self.revision() == HEAD_REVISION:
            return
        async with _migration_lock(), self._write_engine.connect() as conn:
            await conn.run_sync(_upgrade)
            await conn.commit()

    async def revision(self) -> str | None:
        """The schema's current migration revision, or None before the first migration."""
        async with self.engine.connect() as conn:
            return await conn.run_sync(_current_revision)

    async def missing_schema(self) -> str | None:
        """Why this database has not the tables to read (no llm-spend schema yet, or an older one),
        or None: it has them, or that cannot be told (the database is unreachable)."""
        try:
            revision = await self.revision()
        except Exception:
            return None
        if revision == HEAD_REVISION:
            return None
        if revision is None:
            return "the database has no llm-spend schema yet"
        return f"the database's llm-spend schema is at revision {revision}, not {HEAD_REVISION}"

    async def identity(self) -> str:
        """The database's random id (created by the migrations): what a spool file belongs to."""
        async with self.engine.connect() as conn:
            value = (await conn.execute(select(meta.c.value).where(meta.c.key == "database_id"))).scalar_one()
        return str(value)

    # -- recording ----------------------------------------------------------------------------------

    async def write(self, batch: Sequence[PendingWrite]) -> list[dict[WindowKey, int] | None]:
        """Record a batch in one transaction.

        Returns, per item, each window's spent nano-USD right after that item (items in batch
        order), or None for an item whose event_id was already recorded (nothing changed for it).
        An empty batch writes nothing.
        """
        if not batch:
            return []
        if any(item.hold_until is not None for item in batch):
            batch = await self._hold(batch)
        if self._file is not None:
            return await self._file.write(batch)
        if self._pg is not None:
            write = functools.partial(write_batch, batch=batch, watch=self.watch)
            inserted, totals = await self._drivers.run("writes", write)
            return spent_after(batch, inserted, totals)
        try:
            return await self._write(batch, fast=self.dialect == "sqlite")
        except _Duplicates:  # a replay or retry: redo the batch, asking which rows are new
            return await self._write(batch, fast=False)

    async def _hold(self, batch: Sequence[PendingWrite]) -> list[PendingWrite]:
        """Push out the expiry of the reservations the batch holds (`PendingWrite.hold_until`), all
        in one transaction, then return the batch with those calls as plain records. Before the
        write, and safe to repeat: a write that fails after leaves them held, and its retry or
        replay holds them again."""
        held = [
            (item.reservation_id, item.hold_until)
            for item in batch
            if item.hold_until is not None and item.reservation_id is not None
        ]
        if held:
            await self._push_out(held)
        return [
            item if item.hold_until is None else PendingWrite(item.record, item.windows)  # a plain record
            for item in batch
        ]

    async def _write(self, batch: Sequence[PendingWrite], *, fast: bool) -> list[dict[WindowKey, int] | None]:
        async with self.transaction() as conn:
            insert = self._insert_new_calls if fast else self._insert_calls
            inserted = await insert(conn, batch)
            settled = await self._claim(conn, [i.reservation_id for i in batch if i.reservation_id])
            deltas = rollup_deltas(batch, inserted, settled)
            totals = await self._bump(conn, deltas) if deltas else {}
        return spent_after(batch, inserted, totals)

    async def _claim(self, conn: AsyncConnection, ids: Sequence[str]) -> set[str]:
        """Delete these reservations; the ones actually deleted are this transaction's to release.

        Settle, release and the expiry sweep all go through this, so a reservation is released once.
        """
        if not ids:
            return set()
        result = await conn.execute(self._sql.claim, {"ids": list(ids)})
        return set(result.scalars().all())

    async def _insert_new_calls(self, conn: AsyncConnection, batch: Sequence[PendingWrite]) -> set[str]:
        """SQLite fast path: the driver's executemany, no per-row SQLAlchemy processing.

        Event ids are fresh UUIDv7s, so normally every row is new; when the row count says some were
        not (a replay), the transaction is rolled back and redone with RETURNING.
        """
        result = await conn.exec_driver_sql(_SQLITE_INSERT_CALLS, sqlite_call_rows(batch))
        if result.rowcount != len(batch):
            raise _Duplicates
        return {item.record.event_id for item in batch}

    async def _insert_calls(self, conn: AsyncConnection, batch: Sequence[PendingWrite]) -> set[str]:
        result = await conn.execute(self._sql.insert_calls, [call_row(item.record) for item in batch])
        return set(result.scalars().all())

    async def _bump(
        self, conn: AsyncConnection, deltas: dict[WindowKey, dict[str, int]]
    ) -> dict[WindowKey, int]:
        rows = [_key_row(k) | sums for k, sums in sorted(deltas.items())]
        result = await conn.execute(self._sql.bump, rows)
        return {WindowKey(r[0], r[1], r[2], r[3]): r[4] for r in result.all()}

    # -- reservations -------------------------------------------------------------------------------

    def reserve(
        self,
        reservation_id: str,
        amounts: Sequence[tuple[WindowKey, int, int]],
        *,
        now: datetime,
        expires_at: datetime,
    ) -> asyncio.Future[Refusal | None]:
        """Reserve `amount` in each (window, amount, limit), all or nothing, in one transaction.

        Each window takes one conditional statement: ``reserved += x WHERE spent + reserved + x <=
        limit``. The future says None when every window accepted, else the first window that
        refused with its totals before the attempt, and nothing stays reserved anywhere. A future,
        not a coroutine: the reservation is under way once this returns; and an `Outcome`, which a
        caller cancelled while it waits does not cancel (it learns whether it was granted, and can
        give it back).
        """
        ordered = sorted(amounts)
        if self._file is not None:
            return self._file.reserve(reservation_id, ordered, now, expires_at)
        if self._pg is not None:
            return self._pg.reserve(Pending(reservation_id, ordered, now, expires_at))
        outcome = Outcome(loop=asyncio.get_running_loop())
        made = asyncio.ensure_future(self._reserve(reservation_id, ordered, now, expires_at))
        self._reserving.add(made)
        made.add_done_callback(self._reserving.discard)
        made.add_done_callback(functools.partial(_pass_on, outcome))
        return outcome

    async def _reserve(
        self,
        reservation_id: str,
        ordered: Sequence[tuple[WindowKey, int, int]],
        now: datetime,
        expires_at: datetime,
    ) -> Refusal | None:
        refusal: Refusal | None = None
        try:
            async with self.transaction() as conn:
                await conn.execute(
                    self._sql.insert_reservation,
                    {
                        "id": reservation_id,
                        "created_at": now,
                        "expires_at": expires_at,
                        "amount_nanousd": max(amount for _, amount, _ in ordered),
                        "windows": [[*window_json(key), amount] for key, amount, _ in ordered],
                    },
                )
                for key, amount, limit in ordered:
                    params = _key_row(key) | {"reserved_nanousd": amount, "lim": limit}
                    accepted = amount <= limit and (await conn.execute(self._sql.reserve, params)).first()
                    if not accepted:
                        row = (await conn.execute(self._sql.totals, _key_params(key))).first()
                        refusal = Refusal(key, *(row or (0, 0)))
                        raise _Refused
        except _Refused:  # the transaction rolled back: nothing is reserved
            return refusal
        return None

    async def release(self, reservation_id: str) -> bool:
        """Give a reservation's money back to its windows; False if it was already settled or swept."""
        if self._file is not None:
            return bool(await self._file.release("id = ?", (reservation_id,)))
        return bool(await self._again_if_lost(self._release_where, reservations.c.id == reservation_id))

    async def sweep(self, now: datetime) -> int:
        """Release every reservation that expired before `now` (its process died, or the windows a
        call of unknown cost held its estimate in ended); returns how many. `SWEEP_CHUNK` at a time,
        each chunk a transaction of its own, so that other writes go on between them; on PostgreSQL
        a reservation another transaction has locked (a settlement deleting it, another process's
        sweep) is skipped, not waited for."""
        if self._file is not None:
            where = "id IN (SELECT id FROM llm_spend_reservations WHERE expires_at < ? LIMIT ?)"
            params = (text_time(now), SWEEP_CHUNK)
            release = functools.partial(self._file.release, where, params)
        else:
            expired = select(reservations.c.id).where(reservations.c.expires_at < now).limit(SWEEP_CHUNK)
            condition = reservations.c.id.in_(expired.with_for_update(skip_locked=True).scalar_subquery())
            release = functools.partial(self._again_if_lost, self._release_where, condition)
        released = 0
        while True:
            chunk = await release()
            released += chunk
            if chunk < SWEEP_CHUNK:
                return released

    async def extend(self, reservation_id: str, expires_at: datetime) -> bool:
        """Push a live reservation's expiry out to `expires_at` (a long stream renews its lease);
        False if it is gone. Never in: a renewal that lands after a hold (`PendingWrite.hold_until`)
        leaves the reservation held until its windows end."""
        return await self._push_out([(reservation_id, expires_at)]) == 1

    async def _push_out(self, expiries: Sequence[tuple[str, datetime]]) -> int:
        """Push each (reservation, expiry) out to that expiry, never in, in one transaction; how
        many reservations were found."""
        if self._file is not None:
            return await self._file.push_out(expiries)
        params = [{"reservation_id": reservation_id, "until": until} for reservation_id, until in expiries]
        return await self._again_if_lost(self._push_out_rows, params)

    async def _push_out_rows(self, params: list[dict[str, Any]]) -> int:
        until = bindparam("until", type_=reservations.c.expires_at.type)
        expires_at = case((reservations.c.expires_at < until, until), else_=reservations.c.expires_at)
        statement = (
            update(reservations)
            .where(reservations.c.id == bindparam("reservation_id"))
            .values(expires_at=expires_at)
        )
        async with self.transaction() as conn:
            if len(params) == 1:  # one row: its count (an executemany's is not every driver's)
                return (await conn.execute(statement, params[0])).rowcount
            await conn.execute(statement, params)
        return len(params)

    async def _again_if_lost(self, work: Callable[..., Awaitable[T]], *args: Any) -> T:
        """`work(*args)`, once more on a new connection when the pool's was found lost (a server
        restart, a terminated backend), as the lanes' writes are (`Drivers.run`): each of these is
        safe to repeat, a release deleting the reservation it gives back."""
        try:
            return await work(*args)
        except DBAPIError as exc:
            if not exc.connection_invalidated or self.dialect != "postgresql":  # (a database in memory
                raise  # is its one connection: disposing of it would drop the database)
            logger.warning("llm-spend: a PostgreSQL connection was lost (%s); trying on a new one", exc.orig)
        await self.engine.dispose()  # the pool's other connections are likely gone too
        return await work(*args)

    async def _release_where(self, condition: Any) -> int:
        async with self.transaction() as conn:
            result = await conn.execute(
                delete(reservations).where(condition).returning(reservations.c.windows)
            )
            released = result.scalars().all()
            deltas: dict[WindowKey, int] = {}
            for windows in released:
                for period, start, scope_key, scope_value, amount in windows:
                    key = WindowKey(period, datetime.fromisoformat(start), scope_key, scope_value)
                    deltas[key] = deltas.get(key, 0) + amount
            if deltas:
                await conn.execute(
                    self._sql.unreserve,
                    [_key_params(key) | {"amount": amount} for key, amount in sorted(deltas.items())],
                )
        return len(released)

    async def counts(self, since: datetime) -> tuple[int, int]:
        """(reservations outstanding, calls since `since` whose model had no price)."""
        async with self.engine.connect() as conn:
            held = (await conn.execute(select(func.count()).select_from(reservations))).scalar_one()
            unknown = (
                await conn.execute(
                    select(func.count())
                    .select_from(calls)
                    .where(calls.c.occurred_at >= since, calls.c.pricing_status == "unknown_model")
                )
            ).scalar_one()
        return int(held), int(unknown)

    # -- reading ------------------------------------------------------------------------------------

    async def window_spent(self, keys: Sequence[WindowKey]) -> dict[WindowKey, tuple[int, int]]:
        """(spent, reserved) nano-USD of the given windows that have a row."""
        found: dict[WindowKey, tuple[int, int]] = {}
        async with self.engine.connect() as conn:
            for key in keys:
                row = (await conn.execute(self._sql.totals, _key_params(key))).first()
                if row is not None:
                    found[key] = (row[0], row[1])
        return found


class _Statements:
    """Every statement the store runs, built once (building them per call costs more than running)."""

    def __init__(self, insert: Any) -> None:
        key = (
            (rollups.c.period == bindparam("k_period"))
            & (rollups.c.window_start == bindparam("k_start", type_=UTCDateTime()))
            & (rollups.c.scope_key == bindparam("k_scope"))
            & (rollups.c.scope_value == bindparam("k_value"))
        )
        pk = ["period", "window_start", "scope_key", "scope_value"]
        self.insert_calls = (
            insert(calls).on_conflict_do_nothing(index_elements=["event_id"]).returning(calls.c.event_id)
        )
        bump = insert(rollups)
        self.bump = bump.on_conflict_do_update(
            index_elements=pk, set_={name: rollups.c[name] + bump.excluded[name] for name in SUMS}
        ).returning(*(rollups.c[name] for name in pk), rollups.c.spent_nanousd)
        reserve = insert(rollups)
        self.reserve = reserve.on_conflict_do_update(
            index_elements=pk,
            set_={"reserved_nanousd": rollups.c.reserved_nanousd + reserve.excluded.reserved_nanousd},
            where=rollups.c.spent_nanousd + rollups.c.reserved_nanousd + reserve.excluded.reserved_nanousd
            <= bindparam("lim"),
        ).returning(rollups.c.reserved_nanousd)
        self.totals = select(rollups.c.spent_nanousd, rollups.c.reserved_nanousd).where(key)
        self.unreserve = (
            update(rollups)
            .where(key)
            .values(reserved_nanousd=rollups.c.reserved_nanousd - bindparam("amount"))
        )
        self.insert_reservation = reservations.insert()
        self.claim = (
            delete(reservations)
            .where(reservations.c.id.in_(bindparam("ids", expanding=True)))
            .returning(reservations.c.id)
        )


class _Refused(Exception):
    """A window refused a reservation: roll the transaction back."""


class _Duplicates(Exception):
    """Some rows of a fast-path batch were already recorded."""


_SQLITE_INSERT_CALLS = (
    f"INSERT INTO llm_calls ({', '.join(CALL_COLUMNS)}) VALUES ({', '.join('?' * len(CALL_COLUMNS))}) "
    "ON CONFLICT (event_id) DO NOTHING"
)


def _pass_on(outcome: Outcome, made: asyncio.Task[Refusal | None]) -> None:
    if made.cancelled():  # the loop is shutting down: nothing will answer
        outcome.drop()
    elif (exc := made.exception()) is not None:
        outcome.set_exception(exc)
    else:
        outcome.set_result(made.result())


def _key_row(key: WindowKey) -> dict[str, Any]:
    return {
        "period": key.period,
        "window_start": key.start,
        "scope_key": key.scope_key,
        "scope_value": key.scope_value,
    }


def _key_params(key: WindowKey) -> dict[str, Any]:
    return {
        "k_period": key.period,
        "k_start": key.start,
        "k_scope": key.scope_key,
        "k_value": key.scope_value,
    }


# Alembic keeps the running migration in process-global state (`alembic.context`), so two
# migrations interleaved on one event loop would clobber each other: they take turns.
_MIGRATION_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def _migration_lock() -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    lock = _MIGRATION_LOCKS.get(loop)
    if lock is None:
        lock = _MIGRATION_LOCKS[loop] = asyncio.Lock()
    return lock


def _current_revision(sync_conn: Connection) -> str | None:
    if not sa_inspect(sync_conn).has_table("llm_spend_alembic_version"):
        return None
    revision = sync_conn.execute(text("SELECT version_num FROM llm_spend_alembic_version")).scalar()
    return None if revision is None else str(revision)


def _upgrade(sync_conn: Connection) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.attributes["connection"] = sync_conn
    command.upgrade(config, "head")
