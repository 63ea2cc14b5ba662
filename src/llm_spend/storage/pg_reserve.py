"""A PostgreSQL reservation in one statement, one round trip, autocommitted.

Every guarded call updates the same global window row, so what bounds guarded calls in flight is how
long each holds that row's lock. A transaction of one statement per window holds it across several
round trips; this statement holds it for the statement's own execution and its commit.

It locks the windows' rows in key order (`FOR UPDATE`, sorted in byte order, as every other writer
sorts them), decides all or nothing from the locked (newest) totals, and only then adds the amounts
and inserts the reservation row. A refusal changes nothing and returns each window's totals.
Rows must exist to be locked: a window seen for the first time is created first (`ON CONFLICT DO
NOTHING`, no lock taken), and the keys known to exist are remembered, boundedly.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from .rows import Refusal, WindowKey, window_json

__all__ = ["PostgresReservations"]

_KEY = "period, window_start, scope_key, scope_value"
_ORDER = 'period COLLATE "C", window_start, scope_key COLLATE "C", scope_value COLLATE "C"'
_MAX_KNOWN = 100_000


@functools.cache  # one text per number of windows: built once, and asyncpg's statement cache hits
def _reserve_sql(n: int) -> str:
    want = ", ".join(
        f"(${4 * i + 5}::text, ${4 * i + 6}::timestamptz, ${4 * i + 7}::text, ${4 * i + 8}::text, "
        f"${4 * n + 5 + 2 * i}::bigint, ${4 * n + 6 + 2 * i}::bigint)"
        for i in range(n)
    )
    match = " AND ".join(f"r.{c} = w.{c}" for c in _KEY.split(", "))
    return f"""
WITH want ({_KEY}, amount, lim) AS (VALUES {want}),
locked AS (
    SELECT r.period, r.window_start, r.scope_key, r.scope_value, r.spent_nanousd, r.reserved_nanousd,
           w.amount <= w.lim AND r.spent_nanousd + r.reserved_nanousd + w.amount <= w.lim AS ok
    FROM llm_spend_rollups r JOIN want w ON {match}
    ORDER BY {", ".join("r." + c for c in _ORDER.split(", "))}
    FOR UPDATE OF r
),
verdict AS (SELECT count(*) = {n} AND coalesce(bool_and(ok), false) AS ok FROM locked),
granted AS (
    UPDATE llm_spend_rollups r SET reserved_nanousd = r.reserved_nanousd + w.amount
    FROM want w WHERE (SELECT ok FROM verdict) AND {match}
    RETURNING 1
),
kept AS (
    INSERT INTO llm_spend_reservations (id, created_at, expires_at, amount_nanousd, windows)
    SELECT $1, $2, $3, $4, ${6 * n + 5}::json WHERE (SELECT ok FROM verdict)
    RETURNING 1
)
SELECT {_KEY}, spent_nanousd, reserved_nanousd, ok, (SELECT count(*) FROM kept) FROM locked
"""


@functools.cache
def _create_sql(n: int) -> str:
    rows = ", ".join(
        f"(${4 * i + 1}::text, ${4 * i + 2}::timestamptz, ${4 * i + 3}::text, ${4 * i + 4}::text)"
        for i in range(n)
    )
    return f"INSERT INTO llm_spend_rollups ({_KEY}) VALUES {rows} ON CONFLICT ({_KEY}) DO NOTHING"


class PostgresReservations:
    """Reserve through a raw asyncpg connection (the engine's pool lends it)."""

    def __init__(self) -> None:
        self._known: set[WindowKey] = set()

    async def reserve(
        self,
        conn: Any,
        reservation_id: str,
        ordered: Sequence[tuple[WindowKey, int, int]],
        now: datetime,
        expires: datetime,
    ) -> Refusal | None:
        """`ordered` is sorted by key. Returns None when every window took its amount, else the first
        window that refused, with its totals; then nothing is reserved anywhere."""
        keys = [key for key, _, _ in ordered]
        if not self._known.issuperset(keys):
            await self._create(conn, keys)
        args: list[Any] = [reservation_id, now, expires, max(amount for _, amount, _ in ordered)]
        for key in keys:
            args += [key.period, key.start, key.scope_key, key.scope_value]
        for _, amount, limit in ordered:
            args += [amount, limit]
        args.append(json.dumps([[*window_json(key), amount] for key, amount, _ in ordered]))
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
        raise RuntimeError(f"reservation {reservation_id} neither granted nor refused")  # pragma: no cover

    async def _create(self, conn: Any, keys: Sequence[WindowKey]) -> None:
        args = [value for key in keys for value in key]
        await conn.execute(_create_sql(len(keys)), *args)
        if len(self._known) + len(keys) > _MAX_KNOWN:
            self._known.clear()
        self._known.update(keys)
