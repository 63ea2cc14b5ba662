"""One thread, one sqlite3 connection, and every write that is waiting committed together.

Through aiosqlite every statement is a hop between the event loop and a worker thread, and a hop
costs 0.15-0.9 ms on a loaded 2-core machine: a reservation of five statements took several ms, and
sixteen in flight queued for tens. Here each write (a batch of ledger rows, a reservation, a
release) is one plain function run on a dedicated thread, and the thread runs every function
submitted while it was busy in ONE transaction, each in a savepoint of its own: a function that
fails is rolled back alone, and none is answered before the transaction commits. So sixteen
reservations in flight cost one hop and one commit, not sixteen. This process's writers are
serialized by the thread itself (other processes by BEGIN IMMEDIATE and busy_timeout). Reads and
migrations still go through SQLAlchemy. The rows written are exactly those SQLAlchemy writes (UTC
text datetimes, JSON text), so both paths read each other's rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from sqlalchemy.engine import URL

from .rows import (
    CALL_COLUMNS,
    SUMS,
    WINDOW_COLUMNS,
    Outcome,
    PendingWrite,
    Refusal,
    WindowKey,
    rollup_deltas,
    spent_after,
    sqlite_call_rows,
    text_time,
)

__all__ = ["SQLiteFile", "database_path", "text_time"]


def database_path(url: URL) -> str | None:
    """The file a SQLite URL's database lives in, or None for an in-memory database. A URI
    filename (`...?uri=true`: `file:ledger.db`, `file:///abs/ledger.db`) gives its path; one naming
    `:memory:` or `mode=memory` is in memory."""
    database = url.database
    if database in (None, "", ":memory:") or "mode=memory" in str(url):
        return None
    assert database is not None
    if url.query.get("uri") == "true" and database.startswith("file:"):
        path = unquote(urlsplit(database).path)
        return None if path in ("", ":memory:") else path
    return database


T = TypeVar("T")
Body = Callable[[sqlite3.Connection], Any]
_Op = tuple[Body, "asyncio.Future[Any]", asyncio.AbstractEventLoop]

_INSERT_CALLS = (
    f"INSERT INTO llm_calls ({', '.join(CALL_COLUMNS)}) VALUES ({', '.join('?' * len(CALL_COLUMNS))}) "
    "ON CONFLICT (event_id) DO NOTHING"
)
_KEY = WINDOW_COLUMNS
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

_BUSY_TIMEOUT = 30.0
"""How long a transaction waits for another process's write lock before it fails."""
_BUSY_STEP_MS = 50
"""SQLite's own busy wait, one step of it: between steps, a close in progress stops the wait."""
_MAX_ROUND = 256
"""The most functions one transaction runs (the rest wait for the next)."""
_CHECKPOINT_EVERY = 100
"""Transactions committed on the loop's thread between two checkpoints asked of the thread."""
_WAL_CAP = 64 << 20
"""The WAL size past which a checkpoint makes writers wait until it restarted the WAL."""


def _checkpoint(conn: sqlite3.Connection) -> None:
    """A marker: after its round, the thread checkpoints the WAL (see `_Worker._checkpoint`)."""


def _key(key: WindowKey) -> tuple[str, str, str, str]:
    return key.period, text_time(key.start), key.scope_key, key.scope_value


class Undo(Exception):
    """Raised by a function to roll back what it wrote and answer `value` (not an error)."""

    def __init__(self, value: object) -> None:
        self.value = value


class _Worker:
    """The thread, its queue of functions and its connection; one per start of the SQLiteFile."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self.closing = False
        self.thread = threading.Thread(target=self._serve, name="llm-spend-sqlite", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn = _connect(self.path, f"busy_timeout={_BUSY_STEP_MS}")
        try:
            while True:
                first = self.queue.get()
                if first is None:
                    return
                ops = [first]
                stop = False
                while len(ops) < _MAX_ROUND:
                    try:
                        op = self.queue.get_nowait()
                    except queue.Empty:
                        break
                    if op is None:
                        stop = True
                        break
                    ops.append(op)
                checkpoint = any(body is _checkpoint for body, _, _ in ops)
                ops = [op for op in ops if op[0] is not _checkpoint]
                if ops:
                    _answer(ops, self._round(conn, [body for body, _, _ in ops]))
                if checkpoint:
                    self._checkpoint(conn)
                if stop:
                    return
        finally:
            conn.close()

    def _round(self, conn: sqlite3.Connection, bodies: Sequence[Body]) -> list[tuple[bool, Any]]:
        """Run the functions in one transaction; (True, result) or (False, exception) for each."""
        try:
            self._begin(conn)
        except BaseException as exc:
            return [(False, exc)] * len(bodies)
        if len(bodies) == 1:  # alone, the transaction is its savepoint
            return [_alone(conn, bodies[0])]
        outcome: list[tuple[bool, Any]] = []
        for body in bodies:
            conn.execute("SAVEPOINT llm_spend_op")
            try:
                outcome.append((True, body(conn)))
            except Undo as undo:
                conn.execute("ROLLBACK TO llm_spend_op")
                outcome.append((True, undo.value))
            except BaseException as exc:
                if not conn.in_transaction:  # an error that ended the whole transaction
                    return [(False, exc)] * len(bodies)
                conn.execute("ROLLBACK TO llm_spend_op")
                outcome.append((False, exc))
            conn.execute("RELEASE llm_spend_op")
        try:
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.rollback()
            return [(False, exc)] * len(bodies)
        return outcome

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        """Copy the WAL into the database without stopping writers (PASSIVE). While writes go on the
        WAL cannot start over, so it grows until a pause; past `_WAL_CAP` writers wait (RESTART)."""
        try:
            size = os.path.getsize(self.path + "-wal")
        except OSError:
            return
        with contextlib.suppress(sqlite3.Error):  # busy or failing: the next one will do
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            if size > _WAL_CAP:  # what is left to copy after the passive one is little: a short wait
                conn.execute("PRAGMA wal_checkpoint(RESTART)")

    def _begin(self, conn: sqlite3.Connection) -> None:
        deadline = time.monotonic() + _BUSY_TIMEOUT
        while True:  # in WAL mode only BEGIN IMMEDIATE waits for a lock; COMMIT never does
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                busy = exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
                if not busy or self.closing or time.monotonic() > deadline:
                    raise


def _connect(path: str, *pragmas: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", *pragmas):
        conn.execute(f"PRAGMA {pragma}")
    return conn


def _alone(conn: sqlite3.Connection, body: Body) -> tuple[bool, Any]:
    """Run `body` in the transaction just begun on `conn` and end it: (True, result) once committed,
    (True, value) for an `Undo`, (False, exception) for a failure; both of those roll back."""
    try:
        result = body(conn)
    except Undo as undo:
        conn.rollback()
        return True, undo.value
    except BaseException as exc:
        conn.rollback()
        return False, exc
    try:
        conn.execute("COMMIT")
    except BaseException as exc:
        if conn.in_transaction:
            conn.rollback()
        return False, exc
    return True, result


def _answer(ops: Sequence[_Op], outcome: Sequence[tuple[bool, Any]]) -> None:
    """Hand each result to its future, with one wake-up per event loop (from the worker thread)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
    for (_, future, loop), (ok, value) in zip(ops, outcome, strict=True):
        by_loop.setdefault(loop, []).append((future, ok, value))
    for loop, answers in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(_settle, answers)


def _settle(answers: Sequence[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in answers:
        if future.done():  # the waiter was cancelled
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class SQLiteFile:
    """The write transactions of a SQLite file database, run on one thread, waiting ones together."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._worker: _Worker | None = None
        self._pending = 0
        """Functions handed to the thread and not answered yet (counted on the loop's thread)."""
        self._inline: sqlite3.Connection | None = None
        self._inline_thread: int | None = None
        self._inline_commits = 0

    async def close(self) -> None:
        """Finish what was submitted, close the connection and stop the thread; the next write starts
        them again. A transaction still waiting for another process's write lock gives up within one
        busy step (its caller has gone: the writer spooled its batch), so closing never waits it out."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.closing = True
            worker.queue.put(None)
            await asyncio.to_thread(worker.thread.join)
        if self._inline is not None:
            self._inline.close()
            self._inline = None

    def _run(
        self,
        body: Callable[[sqlite3.Connection], T],
        *,
        small: bool = True,
        future: asyncio.Future[T] | None = None,
    ) -> asyncio.Future[T]:
        """Run `body(conn)` in the next transaction; the future (`future`, else a new one) has its
        result once that committed."""
        loop = asyncio.get_running_loop()
        if future is None:
            future = loop.create_future()
        if small and self._pending == 0 and self._here(future, body):
            return future
        worker = self._thread()
        self._pending += 1
        future.add_done_callback(self._answered)
        worker.queue.put((body, future, loop))
        return future

    def _answered(self, _future: asyncio.Future[Any]) -> None:
        self._pending -= 1

    def _here(self, future: asyncio.Future[T], body: Callable[[sqlite3.Connection], T]) -> bool:
        """Run a small transaction on the calling thread when nobody holds the write lock (no wait)."""
        conn = self._inline
        if conn is None:
            conn = self._inline = _connect(self._path, "busy_timeout=0", "wal_autocheckpoint=0")
            self._inline_thread = threading.get_ident()
        elif self._inline_thread != threading.get_ident():
            return False
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY:
                return False
            future.set_exception(exc)
            return True
        ok, value = _alone(conn, body)
        if not ok:
            future.set_exception(value)
            return True
        future.set_result(value)
        self._inline_commits += 1
        if self._inline_commits % _CHECKPOINT_EVERY == 0:  # this connection does not checkpoint
            self._thread().queue.put((_checkpoint, future, asyncio.get_running_loop()))
        return True

    def _thread(self) -> _Worker:
        """The write thread, started on first need (again after a close)."""
        if self._worker is None:
            self._worker = _Worker(self._path)
        return self._worker

    # -- the transactions ---------------------------------------------------------------------------

    async def write(self, batch: Sequence[PendingWrite]) -> list[dict[WindowKey, int] | None]:
        return await self._run(lambda conn: _write(conn, batch), small=len(batch) <= 16)

    def reserve(
        self,
        reservation_id: str,
        ordered: Sequence[tuple[WindowKey, int, int]],
        now: datetime,
        expires: datetime,
    ) -> asyncio.Future[Refusal | None]:
        """Queue a reservation; its `Outcome` says None (granted) or the window that refused."""

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
                    raise Undo(Refusal(key, *(row or (0, 0))))

        outcome: asyncio.Future[Any] = Outcome(loop=asyncio.get_running_loop())
        return self._run(body, future=outcome)

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

        return await self._run(body, small=where == "id = ?")

    def push_out(self, expiries: Sequence[tuple[str, datetime]]) -> asyncio.Future[int]:
        """Push each (reservation, expiry) out to that expiry, never in; how many were found."""
        params = [(text_time(expires), reservation_id) for reservation_id, expires in expiries]

        def body(conn: sqlite3.Connection) -> int:
            sql = "UPDATE llm_spend_reservations SET expires_at = max(expires_at, ?) WHERE id = ?"
            return conn.executemany(sql, params).rowcount

        return self._run(body, small=len(params) <= 16)


def _write(conn: sqlite3.Connection, batch: Sequence[PendingWrite]) -> list[dict[WindowKey, int] | None]:
    rows = sqlite_call_rows(batch)
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
    return spent_after(batch, inserted, totals)
