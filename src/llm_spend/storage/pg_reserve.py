"""PostgreSQL reservations: one statement, one round trip, autocommitted; concurrent ones together.

Every guarded call updates the same global window row, so what bounds guarded calls in flight is how
long each holds that row's lock, and a lock is held until its commit (a WAL flush). So the
reservations of this process that wait while one statement runs go together in the next one
(group commit), and each statement holds the lock for its own execution and one commit.

A statement locks the windows' rows in key order (`FOR UPDATE`, sorted in byte order, as every other
writer sorts them) and decides from the locked (newest) totals, then adds the amounts and inserts the
reservation rows, or changes nothing. For one reservation it decides that one, all or nothing. For
several it grants all of them when each fits in every window after those before it (a running sum
per window); if any would not, nothing changes and they are tried again one by one, in order, so
each refusal is exact and reports its window's totals. Rows must exist to be locked: a window seen
for the first time is created first (`ON CONFLICT DO NOTHING`, no lock taken), and the keys known
to exist are remembered, boundedly.
"""

from __future__ import annotations

import asyncio
import functools
import json
import weakref
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from .pg_drivers import Work
from .rows import WINDOW_COLUMNS, Outcome, Refusal, WindowKey, window_json

__all__ = ["PostgresReservations"]

_KEY = WINDOW_COLUMNS
_ORDER = 'period COLLATE "C", window_start, scope_key COLLATE "C", scope_value COLLATE "C"'
_MATCH = " AND ".join(f"r.{c} = w.{c}" for c in _KEY.split(", "))
_LOCK_ORDER = ", ".join("r." + c for c in _ORDER.split(", "))
_MAX_KNOWN = 100_000
_MAX_BATCH = 200

Run = Callable[[Work[Any]], Awaitable[Any]]
"""Runs its work on a connection of the lane (`Drivers.run`: once more on a new one if it was lost)."""


class Pending(NamedTuple):
    """One reservation to make: the windows (sorted by key) with (amount, limit) each."""

    reservation_id: str
    ordered: Sequence[tuple[WindowKey, int, int]]
    now: datetime
    expires: datetime


@functools.cache  # one text per number of windows: built once, and asyncpg's statement cache hits
def _reserve_sql(n: int) -> str:
    want = ", ".join(
        f"(${4 * i + 5}::text, ${4 * i + 6}::timestamptz, ${4 * i + 7}::text, ${4 * i + 8}::text, "
        f"${4 * n + 5 + 2 * i}::bigint, ${4 * n + 6 + 2 * i}::bigint)"
        for i in range(n)
    )
    return f"""
WITH w ({_KEY}, amount, lim) AS (VALUES {want}),
locked AS (
    SELECT r.period, r.window_start, r.scope_key, r.scope_value, r.spent_nanousd, r.reserved_nanousd,
           w.amount <= w.lim AND r.spent_nanousd + r.reserved_nanousd + w.amount <= w.lim AS ok
    FROM llm_spend_rollups r JOIN w ON {_MATCH}
    ORDER BY {_LOCK_ORDER}
    FOR UPDATE OF r
),
verdict AS (SELECT count(*) = {n} AND coalesce(bool_and(ok), false) AS ok FROM locked),
granted AS (
    UPDATE llm_spend_rollups r SET reserved_nanousd = r.reserved_nanousd + w.amount
    FROM w WHERE (SELECT ok FROM verdict) AND {_MATCH}
    RETURNING 1
),
kept AS (
    INSERT INTO llm_spend_reservations (id, created_at, expires_at, amount_nanousd, windows)
    SELECT $1, $2, $3, $4, ${6 * n + 5}::json WHERE (SELECT ok FROM verdict)
    RETURNING 1
)
SELECT {_KEY}, spent_nanousd, reserved_nanousd, ok, (SELECT count(*) FROM kept) FROM locked
"""


_BATCH_SQL = f"""
WITH w AS (
    SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[])
        WITH ORDINALITY AS w({_KEY}, i)
),
want AS (
    SELECT * FROM unnest($5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[]) AS x(j, i, amount, lim)
),
locked AS (
    SELECT w.i, r.spent_nanousd + r.reserved_nanousd AS used
    FROM llm_spend_rollups r JOIN w ON {_MATCH}
    ORDER BY {_LOCK_ORDER}
    FOR UPDATE OF r
),
checked AS (
    SELECT x.amount <= x.lim
           AND l.used + sum(x.amount) OVER (PARTITION BY x.i ORDER BY x.j) <= x.lim AS ok
    FROM want x JOIN locked l USING (i)
),
verdict AS (
    SELECT (SELECT count(*) FROM locked) = cardinality($1::text[]) AND coalesce(bool_and(ok), false) AS ok
    FROM checked
),
granted AS (
    UPDATE llm_spend_rollups r SET reserved_nanousd = r.reserved_nanousd + t.amount
    FROM (SELECT i, sum(amount)::bigint AS amount FROM want GROUP BY i) t JOIN w USING (i)
    WHERE (SELECT ok FROM verdict) AND {_MATCH}
    RETURNING 1
),
kept AS (
    INSERT INTO llm_spend_reservations (id, created_at, expires_at, amount_nanousd, windows)
    SELECT id, c, e, a, ws::json
    FROM unnest($9::text[], $10::timestamptz[], $11::timestamptz[], $12::bigint[], $13::text[])
        AS x(id, c, e, a, ws)
    WHERE (SELECT ok FROM verdict)
    RETURNING 1
)
SELECT ok, (SELECT count(*) FROM kept) FROM verdict
"""


@functools.cache
def _create_sql(n: int) -> str:
    rows = ", ".join(
        f"(${4 * i + 1}::text, ${4 * i + 2}::timestamptz, ${4 * i + 3}::text, ${4 * i + 4}::text)"
        for i in range(n)
    )
    return f"INSERT INTO llm_spend_rollups ({_KEY}) VALUES {rows} ON CONFLICT ({_KEY}) DO NOTHING"


class PostgresReservations:
    """Reservations through raw asyncpg connections that `run` lends (the engine's pool)."""

    def __init__(self, run: Run) -> None:
        self._on_connection = run
        self._known: set[WindowKey] = set()
        self._texts: dict[WindowKey, str] = {}
        """Each window's JSON as a reservation row stores it, without its closing bracket: made once
        (json.dumps and isoformat are a tenth of the Python between a lane's statements)."""
        self._queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Queue] = (
            weakref.WeakKeyDictionary()
        )

    def reserve(self, pending: Pending) -> Outcome:
        """Queue one reservation; the future says None (granted) or the first window that refused."""
        loop = asyncio.get_running_loop()
        queue = self._queues.get(loop)
        if queue is None:
            queue = self._queues[loop] = _Queue(self._run)
        return queue.put(loop, pending)

    async def warm(self) -> None:
        """Prepare the batch statement on the lane's connection with a batch of none (changes
        nothing), so that the first calls after a start do not wait for it to be parsed and planned
        in a fresh server process: 20-30 ms on a slow machine, while sixteen calls queue."""
        await self._on_connection(lambda conn: conn.fetchrow(_BATCH_SQL, *([()] * 13)))

    async def _run(self, batch: Sequence[Pending]) -> list[Refusal | Exception | None]:
        """Each reservation's outcome: granted (None), refused, or the error that stopped it (those
        made one by one before a failure keep their own outcome; on a lost connection the rest are
        made on the next)."""
        outcomes: list[Refusal | Exception | None] = []

        async def decide(conn: Any) -> list[Refusal | Exception | None]:
            keys = {key for item in batch for key, _, _ in item.ordered}
            if not self._known.issuperset(keys):
                await self._create(conn, sorted(keys))
            if not outcomes and len(batch) > 1 and await self._all(conn, batch, sorted(keys)):
                return [None] * len(batch)
            for item in batch[len(outcomes) :]:
                outcomes.append(await self._one(conn, item))
            return outcomes

        try:
            result: list[Refusal | Exception | None] = await self._on_connection(decide)
            return result
        except Exception as exc:
            if not outcomes:
                raise
            return [*outcomes, *[exc] * (len(batch) - len(outcomes))]

    async def _all(self, conn: Any, batch: Sequence[Pending], keys: list[WindowKey]) -> bool:
        """Grant every reservation of the batch in one statement, or change nothing (False)."""
        index = {key: i for i, key in enumerate(keys, 1)}
        want: tuple[list[int], list[int], list[int], list[int]] = ([], [], [], [])
        for j, item in enumerate(batch, 1):
            for key, amount, limit in item.ordered:
                for column, value in zip(want, (j, index[key], amount, limit), strict=True):
                    column.append(value)
        rows = [
            (item.reservation_id, item.now, item.expires, max(a for _, a, _ in item.ordered),
             self._windows_json(item.ordered))
            for item in batch
        ]  # fmt: skip
        ok, kept = await conn.fetchrow(_BATCH_SQL, *zip(*keys, strict=True), *want, *zip(*rows, strict=True))
        return bool(ok) and kept == len(batch)

    async def _one(self, conn: Any, item: Pending) -> Refusal | None:
        """One reservation, all or nothing; None when every window took its amount."""
        ordered = item.ordered
        keys = [key for key, _, _ in ordered]
        args: list[Any] = [item.reservation_id, item.now, item.expires, max(a for _, a, _ in ordered)]
        for key in keys:
            args += [key.period, key.start, key.scope_key, key.scope_value]
        for _, amount, limit in ordered:
            args += [amount, limit]
        args.append(self._windows_json(ordered))
        rows = await conn.fetch(_reserve_sql(len(ordered)), *args)
        if len(rows) < len(ordered):  # a window's row is gone (a database recreated): make it again
            self._known.difference_update(keys)
            await self._create(conn, keys)
            rows = await conn.fetch(_reserve_sql(len(ordered)), *args)
        if rows and rows[0][-1] == 1:
            return None
        for row in rows:
            if not row["ok"]:
                return Refusal(WindowKey(*row[:4]), row["spent_nanousd"], row["reserved_nanousd"])
        raise RuntimeError(f"reservation {item.reservation_id} neither granted nor refused")

    def _windows_json(self, ordered: Sequence[tuple[WindowKey, int, int]]) -> str:
        """The windows and amounts of a reservation, as its row stores them (JSON)."""
        texts, parts = self._texts, []
        for key, amount, _ in ordered:
            text = texts.get(key)
            if text is None:
                if len(texts) >= _MAX_KNOWN:
                    texts.clear()
                text = texts[key] = json.dumps(window_json(key))[:-1]
            parts.append(f"{text}, {amount}]")
        return f"[{', '.join(parts)}]"

    async def _create(self, conn: Any, keys: Sequence[WindowKey]) -> None:
        args = [value for key in keys for value in key]
        await conn.execute(_create_sql(len(keys)), *args)
        if len(self._known) + len(keys) > _MAX_KNOWN:
            self._known.clear()
        self._known.update(keys)


class _Queue:
    """The reservations of one event loop waiting for a statement; one drains at a time."""

    def __init__(self, run: Callable[[Sequence[Pending]], Any]) -> None:
        self._run = run
        self._waiting: list[tuple[Pending, Outcome]] = []
        self._draining: asyncio.Task[None] | None = None

    def put(self, loop: asyncio.AbstractEventLoop, pending: Pending) -> Outcome:
        future = Outcome(loop=loop)
        self._waiting.append((pending, future))
        if self._draining is None:
            self._draining = loop.create_task(self._drain(), name="llm-spend-reservations")
            self._draining.add_done_callback(self._ended)
        return future

    def _ended(self, task: asyncio.Task[None]) -> None:
        """A drain cancelled before its first step (its loop shutting down in the turn that made
        it) ran none of its own code: what waits is dropped here, since nothing will answer it."""
        if self._draining is not task:  # it ended by itself (and another may drain now)
            return
        self._draining = None
        for _, future in self._waiting:
            future.drop()
        self._waiting = []

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[:_MAX_BATCH], self._waiting[_MAX_BATCH:]
                try:
                    results = await self._run([pending for pending, _ in batch])
                except asyncio.CancelledError:  # the loop is shutting down: nobody will answer
                    for _, future in (*batch, *self._waiting):
                        future.drop()
                    self._waiting = []
                    raise
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._draining = None
