"""One thread, one sqlite3 connection, one hop per transaction: SQLite-file writes, fast.

Through aiosqlite every statement is a hop between the event loop and a worker thread, and a hop
costs 0.3-0.9 ms on a loaded 2-core machine: a reservation of five statements took several ms, and
sixteen in flight queued for tens. Here each write transaction is one plain function run on a
dedicated thread, so it costs one hop, and this process's transactions are serialized by the
thread itself (other processes are serialized by BEGIN IMMEDIATE and busy_timeout). Reads and
migrations still go through SQLAlchemy. The rows written are exactly those SQLAlchemy writes (UTC
text datetimes, JSON text), so both paths read each other's rows.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

from .rows import (
    CALL_COLUMNS,
    SUMS,
    PendingWrite,
    Refusal,
    WindowKey,
    rollup_deltas,
    spent_after,
    sqlite_call_row,
)

__all__ = ["SQLiteFile"]

T = TypeVar("T")

_INSERT_CALLS = (
    f"INSERT INTO llm_calls ({', '.join(CALL_COLUMNS)}) VALUES ({', '.join('?' * len(CALL_COLUMNS))}) "
    "ON CONFLICT (event_id) DO NOTHING"
)
_KEY = "period, window_start, scope_key, scope_value"
_BUMP = (
    f"INSERT INTO llm_spend_rollups ({_KEY}, {', '.join(SUMS)}) "
    f"VALUES (?, ?, ?, ?, {', '.join('?' * len(SUMS))}) "
    f"ON CONFLICT ({_KEY}) DO UPDATE SET {', '.join(f'{n} = {n} + excluded.{n}' for n in SUMS)} "
    "RETURNING spent_nanousd"
)
_RESERVE = (
    f"INSERT INTO llm_spend_rollups ({_KEY}, reserved_nanousd) VALUES (?, ?, ?, ?, ?) "
    f"ON CONFLICT ({_KEY}) DO UPDATE SET reserved_nanousd = reserved_nanousd + excluded.reserved_nanousd "
    "WHERE spent_nanousd + reserved_nanousd + excluded.reserved_nanousd <= ? RETURNING reserved_nanousd"
)
_MATCH = "period = ? AND window_start = ? AND scope_key = ? AND scope_value = ?"
_TOTALS = f"SELECT spent_nanousd, reserved_nanousd FROM llm_spend_rollups WHERE {_MATCH}"
_UNRESERVE = f"UPDATE llm_spend_rollups SET reserved_nanousd = reserved_nanousd - ? WHERE {_MATCH}"
_INSERT_RESERVATION = (
    "INSERT INTO llm_spend_reservations (id, created_at, expires_at, amount_nanousd, windows) "
    "VALUES (?, ?, ?, ?, ?)"
)


def text_time(value: datetime) -> str:
    """An aware datetime as SQLAlchemy stores it in SQLite (naive UTC text, microseconds)."""
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def _key(key: WindowKey) -> tuple[str, str, str, str]:
    return key.period, text_time(key.start), key.scope_key, key.scope_value


class _Refused(Exception):
    pass


_BUSY_TIMEOUT = 30.0
"""How long a transaction waits for another process's write lock before it fails."""
_BUSY_STEP_MS = 50
"""SQLite's own busy wait, one step of it: between steps, a close in progress stops the wait."""


class SQLiteFile:
    """The write transactions of a SQLite file database, each run whole on one thread."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._closing = False

    async def close(self) -> None:
        """Close the connection and stop the thread; the next transaction starts them again.

        A transaction still waiting for another process's write lock gives up within one busy step
        (its caller has gone: the writer spooled its batch), so closing never waits out the lock."""
        if self._executor is not None:
            executor, self._executor = self._executor, None
            self._closing = True
            try:
                await asyncio.get_running_loop().run_in_executor(executor, self._close)
            finally:
                executor.shutdown(wait=True)
                self._closing = False

    def _close(self, _conn: sqlite3.Connection | None = None) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-spend-sqlite")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self._path, timeout=30, isolation_level=None, check_same_thread=False)
            for pragma in ("journal_mode=WAL", f"busy_timeout={_BUSY_STEP_MS}", "synchronous=NORMAL"):
                conn.execute(f"PRAGMA {pragma}")
            self._conn = conn
        return self._conn

    def _transaction(self, body: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._connection()
        deadline = time.monotonic() + _BUSY_TIMEOUT
        while True:  # in WAL mode only BEGIN IMMEDIATE waits for a lock; COMMIT never does
            try:
                conn.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                busy = exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
                if not busy or self._closing or time.monotonic() > deadline:
                    raise
        try:
            result = body(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    # -- the transactions ---------------------------------------------------------------------------

    async def write(self, batch: Sequence[PendingWrite]) -> list[dict[WindowKey, int] | None]:
        return await self._run(self._transaction, lambda conn: _write(conn, batch))

    async def reserve(
        self,
        reservation_id: str,
        ordered: Sequence[tuple[WindowKey, int, int]],
        now: datetime,
        expires: datetime,
    ) -> Refusal | None:
        refusal: list[Refusal] = []

        def body(conn: sqlite3.Connection) -> None:
            windows = json.dumps(
                [[k.period, k.start.isoformat(), k.scope_key, k.scope_value, a] for k, a, _ in ordered]
            )
            amount = max(a for _, a, _ in ordered)
            conn.execute(
                _INSERT_RESERVATION, (reservation_id, text_time(now), text_time(expires), amount, windows)
            )
            for key, amount, limit in ordered:
                if amount > limit or conn.execute(_RESERVE, (*_key(key), amount, limit)).fetchone() is None:
                    row = conn.execute(_TOTALS, _key(key)).fetchone()
                    refusal.append(Refusal(key, *(row or (0, 0))))
                    raise _Refused

        try:
            await self._run(self._transaction, body)
        except _Refused:
            return refusal[0]
        return None

    async def release(self, where: str, params: tuple[Any, ...]) -> int:
        """Delete the reservations matching `where` and give their money back; returns how many."""

        def body(conn: sqlite3.Connection) -> int:
            rows = conn.execute(
                f"DELETE FROM llm_spend_reservations WHERE {where} RETURNING windows", params
            ).fetchall()
            deltas: dict[WindowKey, int] = {}
            for (windows,) in rows:
                for period, start, scope_key, scope_value, amount in json.loads(windows):
                    key = WindowKey(period, datetime.fromisoformat(start), scope_key, scope_value)
                    deltas[key] = deltas.get(key, 0) + amount
            conn.executemany(_UNRESERVE, [(amount, *_key(key)) for key, amount in sorted(deltas.items())])
            return len(rows)

        return await self._run(self._transaction, body)

    async def extend(self, reservation_id: str, expires: datetime) -> bool:
        def body(conn: sqlite3.Connection) -> bool:
            sql = "UPDATE llm_spend_reservations SET expires_at = ? WHERE id = ?"
            return conn.execute(sql, (text_time(expires), reservation_id)).rowcount == 1

        return await self._run(self._transaction, body)


def _write(conn: sqlite3.Connection, batch: Sequence[PendingWrite]) -> list[dict[WindowKey, int] | None]:
    rows = [sqlite_call_row(item.record) for item in batch]
    conn.execute("SAVEPOINT calls")
    if conn.executemany(_INSERT_CALLS, rows).rowcount == len(batch):
        conn.execute("RELEASE calls")
        inserted = {item.record.event_id for item in batch}
    else:  # some were recorded before (a replay): find out which rows are new, one by one
        conn.execute("ROLLBACK TO calls")
        conn.execute("RELEASE calls")
        one = _INSERT_CALLS + " RETURNING event_id"
        inserted = {r[0] for row in rows for r in conn.execute(one, row).fetchall()}
    ids = [item.reservation_id for item in batch if item.reservation_id]
    settled: set[str] = set()
    if ids:
        sql = f"DELETE FROM llm_spend_reservations WHERE id IN ({', '.join('?' * len(ids))}) RETURNING id"
        settled = {r[0] for r in conn.execute(sql, ids).fetchall()}
    deltas = rollup_deltas(batch, inserted, settled)
    totals = {
        key: conn.execute(_BUMP, (*_key(key), *(sums[n] for n in SUMS))).fetchone()[0]
        for key, sums in sorted(deltas.items())
    }
    return spent_after(batch, inserted, deltas, totals)
