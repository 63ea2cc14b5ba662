"""A PostgreSQL ledger write in one statement, one round trip, autocommitted.

A batch (ledger rows, the reservations they settle, the rollup increments) used to be five round
trips through SQLAlchemy: BEGIN, the rows, the settlements, the increments, COMMIT. Here it is one
statement on the pool's raw asyncpg connection. The rows go as one JSON document, an array per row,
which the server unpacks with `jsonb_array_elements`: asyncpg checks every element of an array
parameter against abstract base classes in Python (31 checks per row when each column was an
array), where orjson writes the whole batch in one call (+10% calls/s).

Two statements, tried in turn:

- the fresh one (`_fresh_sql`), for a batch of calls never recorded whose reservations are all still
  held, which is every batch but a replay's or one whose reservations a sweep freed: the increments
  are worked out here and sent as a second document. It checks that every row was inserted and every
  reservation deleted, and fails otherwise (a cast that names llm-spend in the server's log), which
  undoes the whole statement;
- the exact one (`_sql`): its CTEs insert the rows (`ON CONFLICT (event_id) DO NOTHING`), delete the
  settled reservations, and compute each window's increment from what was actually inserted and
  deleted, so a replayed or duplicated call is counted once and a reservation released once,
  exactly as `rows.rollup_deltas` counts them. The window keys and the releases stay arrays (rows
  name their windows by index).

The fresh statement takes the server half the time of the exact one (0.14 against 0.22 ms), and the
reservations wait for it: guarded calls on PostgreSQL spend 0.3 ms less at p50 (docs/performance.md).
Both lock the rollup rows in key order, the order of every other writer, and last.

A tracker's fresh statement answers with the totals its budgets judge only (`Store(watch=...)`): a
window's once it reached the smallest limit of a budget on such windows, none of a window no budget
watches. Most writes then answer with their check alone; the rows of the totals, which every write
read back before, were a fifth of the writes' lane's Python per statement (docs/performance.md).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from ..usage import CallRecord
from .rows import CALL_COLUMNS, SUMS, TOKEN_COLUMNS, WINDOW_COLUMNS, PendingWrite, WindowKey

__all__ = ["warm", "write_batch"]

try:  # the extra [fast]
    import orjson

    def _dumps(rows: Sequence[Sequence[Any]]) -> str:
        try:
            return orjson.dumps(rows).decode()
        except orjson.JSONEncodeError as error:  # the data's fault, as the database would say
            if "Integer" in str(error):  # past 64 bits: no bigint holds it
                raise OverflowError(str(error)) from error
            raise UnicodeEncodeError("utf-8", "", 0, 0, str(error)) from error  # a lone surrogate

except ImportError:  # pragma: no cover - the stdlib writes the same JSON (a surrogate as an escape,
    # which the server refuses as the data's fault, like the text arrays before)

    def _dumps(rows: Sequence[Sequence[Any]]) -> str:
        return json.dumps(rows, default=datetime.isoformat)


_KEY = WINDOW_COLUMNS
_CALL_TYPES = {
    "occurred_at": "timestamptz",
    "stream": "bool",
    "latency_ms": "int",
    **dict.fromkeys((*TOKEN_COLUMNS, "cache_write_1h_tokens", "cost_nanousd"), "bigint"),
}
_N = len(CALL_COLUMNS)


def _fields() -> str:
    """The ledger row's columns read from a row of the document (`r`)."""
    return ", ".join(
        f"(r ->> {i})::{_CALL_TYPES.get(c, 'text')} AS {c}" if c != "tags" else f"r -> {i} AS tags"
        for i, c in enumerate(CALL_COLUMNS)
    )


@functools.cache
def _sql() -> str:
    """The exact statement: the increments derived from the rows inserted and the reservations
    deleted, so a call recorded before, or twice in the batch, counts once (see the docstring)."""
    fields = _fields()
    columns = ", ".join(CALL_COLUMNS)
    w, r = 2, 6  # windows, releases
    tokens = ", ".join(f"sum(k.{c})::bigint" for c in TOKEN_COLUMNS)
    zeros = ", ".join("0::bigint" for _ in TOKEN_COLUMNS)
    sums = ", ".join(f"sum(d.{c})::bigint" for c in SUMS)
    update = ", ".join(f"{c} = llm_spend_rollups.{c} + excluded.{c}" for c in SUMS)
    return f"""
WITH c AS (
    SELECT {fields}, r -> {_N} AS windows, n FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS t(r, n)
),
new AS (
    INSERT INTO llm_calls ({columns}) SELECT {columns} FROM c ORDER BY n
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
),
claimed AS (
    DELETE FROM llm_spend_reservations WHERE id = ANY(${r}::text[]) RETURNING id
),
counted AS (
    SELECT DISTINCT ON (c.event_id) c.* FROM c JOIN new USING (event_id) ORDER BY c.event_id, c.n
),
w AS (
    SELECT * FROM unnest(${w}::text[], ${w + 1}::timestamptz[], ${w + 2}::text[], ${w + 3}::text[])
        WITH ORDINALITY AS w({_KEY}, i)
),
d ({", ".join(("i", *SUMS))}) AS (
    SELECT m.i::bigint, sum(coalesce(k.cost_nanousd, 0))::bigint, 0::bigint, count(*),
           count(*) FILTER (WHERE k.cost_nanousd IS NULL), {tokens}
    FROM counted k, jsonb_array_elements_text(k.windows) AS m(i)
    GROUP BY m.i
    UNION ALL
    SELECT x.i, 0::bigint, -sum(x.amount)::bigint, 0::bigint, 0::bigint, {zeros}
    FROM unnest(${r + 1}::text[], ${r + 2}::bigint[], ${r + 3}::bigint[]) AS x(id, i, amount)
        JOIN claimed USING (id)
    GROUP BY x.i
),
bumped AS (
    INSERT INTO llm_spend_rollups ({_KEY}, {", ".join(SUMS)})
    SELECT {", ".join("w." + c for c in _KEY.split(", "))}, {sums} FROM d JOIN w USING (i)
    GROUP BY w.i, {", ".join("w." + c for c in _KEY.split(", "))} ORDER BY w.i
    ON CONFLICT ({_KEY}) DO UPDATE SET {update}
    RETURNING {_KEY}, spent_nanousd
)
SELECT 'n' AS kind, event_id AS id, NULL::text, NULL::timestamptz, NULL::text, NULL::text, NULL::bigint
    FROM new
UNION ALL SELECT 'b', NULL, {_KEY}, spent_nanousd FROM bumped
"""


_WRITE_AGAIN = (
    "llm-spend: this batch is written again by the exact statement "
    "(a call of it was recorded before, or a reservation it settles is gone)"
)
"""What the fresh statement's check casts to an integer when it fails: the server's log says why."""
_FAILED_CHECK = "22P02"  # invalid_text_representation: that cast


@functools.cache
def _fresh_sql() -> str:
    """The statement of a batch of calls never recorded whose reservations are all still held (every
    batch but a replay's, or one whose reservation a sweep freed). The windows' increments are worked
    out here and sent as a second document, in key order. When fewer rows were inserted or
    reservations deleted than expected, the windows are left alone and its first row fails (a cast
    of `_WRITE_AGAIN` to an integer), which undoes the whole statement; `write_batch` then makes
    the exact one. It takes the server half the time of the exact one.

    The increments wait for `ok`, so the rows are inserted and the reservations deleted before any
    window's row is locked, as in the exact statement (whose increments are worked out from them):
    a sweep deletes a reservation and then updates its windows, and a write that locked the windows
    first could deadlock with it; the reservations, which wait for those locks, wait less too."""
    sums = ", ".join(SUMS)
    increments = ", ".join(f"(x ->> {4 + j})::bigint" for j in range(len(SUMS)))
    update = ", ".join(f"{c} = llm_spend_rollups.{c} + excluded.{c}" for c in SUMS)
    return f"""
WITH new AS (
    INSERT INTO llm_calls ({", ".join(CALL_COLUMNS)})
    SELECT {_fields()} FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS t(r, n) ORDER BY n
    ON CONFLICT (event_id) DO NOTHING
    RETURNING 1
),
claimed AS (DELETE FROM llm_spend_reservations WHERE id = ANY($3::text[]) RETURNING 1),
ok AS (SELECT (SELECT count(*) FROM new) = $4 AND (SELECT count(*) FROM claimed) = $5 AS ok),
w AS (
    SELECT x ->> 0 AS period, (x ->> 1)::timestamptz AS window_start, x ->> 2 AS scope_key,
           x ->> 3 AS scope_value, x, i
    FROM jsonb_array_elements($2::jsonb) WITH ORDINALITY AS t(x, i)
),
bumped AS (
    INSERT INTO llm_spend_rollups ({_KEY}, {sums})
    SELECT {_KEY}, {increments} FROM w
    WHERE (SELECT ok FROM ok)
    ORDER BY i
    ON CONFLICT ({_KEY}) DO UPDATE SET {update}
    RETURNING {_KEY}, spent_nanousd
)
SELECT NULL::text, NULL::timestamptz, NULL::text, NULL::text, NULL::bigint,
    (CASE WHEN (SELECT ok FROM ok) THEN '0' ELSE '{_WRITE_AGAIN}' END)::int AS checked
UNION ALL SELECT {", ".join("b." + c for c in _KEY.split(", "))}, b.spent_nanousd, NULL
FROM bumped b JOIN w USING ({_KEY})
WHERE b.spent_nanousd >= (w.x ->> {4 + len(SUMS)})::bigint
"""


async def warm(conn: Any) -> None:
    """Prepare both statements on `conn` with a batch of none (which changes nothing)."""
    await _write_fresh(conn, [])
    await _write_exact(conn, [])


NEVER = 2**63 - 1
"""A window's threshold when no budget watches it: no total reaches it, so none comes back."""


async def write_batch(
    conn: Any, batch: Sequence[PendingWrite], watch: Mapping[tuple[str, str], int] | None = None
) -> tuple[set[str], dict[WindowKey, int]]:
    """Write the batch; returns (event ids inserted, windows' spent after). With `watch` ((period,
    scope key) -> the smallest limit of a budget on such windows), a batch of fresh calls returns
    only the totals that reached their window's (below it, no budget has anything to judge; a
    window no budget watches never comes back)."""
    if len({item.record.event_id for item in batch}) == len(batch):  # no call twice (a replay's)
        try:
            return await _write_fresh(conn, batch, watch)
        except Exception as exc:
            if getattr(exc, "sqlstate", None) != _FAILED_CHECK:
                raise
    return await _write_exact(conn, batch)


def _columns(record: CallRecord, tags: dict[str, str]) -> tuple[Any, ...]:
    """A ledger row's columns as the documents hold them (CALL_COLUMNS' order)."""
    usage = record.usage
    return (
        record.event_id, record.occurred_at, record.provider, record.model,
        usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.cache_write_tokens,
        usage.cache_write_1h_tokens, usage.reasoning_tokens, record.cost_nanousd, record.pricing_status,
        record.price_source, record.usage_source, record.stream, record.latency_ms,
        record.service_tier, record.provider_response_id, record.request_id, tags,
    )  # fmt: skip


async def _write_fresh(
    conn: Any, batch: Sequence[PendingWrite], watch: Mapping[tuple[str, str], int] | None = None
) -> tuple[set[str], dict[WindowKey, int]]:
    rows: list[tuple[Any, ...]] = []
    sums: dict[WindowKey, list[int]] = {}
    ids: list[str] = []
    tags: object = None
    tags_doc: dict[str, str] = {}
    for item in batch:
        record, usage = item.record, item.record.usage
        if record.tags is not tags:  # calls of one scope share its (never mutated) tags mapping
            tags, tags_doc = record.tags, dict(record.tags)  # an object in the document
        rows.append(_columns(record, tags_doc))
        cost = record.cost_nanousd
        added = (
            cost or 0, 0, 1, 1 if cost is None else 0, usage.input_tokens, usage.output_tokens,
            usage.cache_read_tokens, usage.cache_write_tokens, usage.reasoning_tokens,
        )  # fmt: skip  # SUMS' order
        for key in item.windows:
            total = sums.get(key)
            sums[key] = list(added) if total is None else [a + b for a, b in zip(total, added, strict=True)]
        if item.reservation_id and item.release:  # a reservation without windows has no row
            ids.append(item.reservation_id)
            for key, amount in item.release:
                total = sums.setdefault(key, [0] * len(SUMS))
                total[1] -= amount
    # locked in key order, as every writer does; each with the total from which it comes back
    if watch is None:
        windows = [[*key, *sums[key], 0] for key in sorted(sums)]
    else:
        windows = [[*key, *sums[key], watch.get((key[0], key[2]), NEVER)] for key in sorted(sums)]
    found = await conn.fetch(_fresh_sql(), _dumps(rows), _dumps(windows), ids, len(rows), len(ids))
    return {row[0] for row in rows}, {WindowKey(*row[:4]): row[4] for row in found if row[0] is not None}


async def _write_exact(conn: Any, batch: Sequence[PendingWrite]) -> tuple[set[str], dict[WindowKey, int]]:
    windows: dict[WindowKey, int] = {}
    last: object = None
    for item in batch:
        if item.windows is not last:  # calls of one day without tag scopes share one tuple
            last = item.windows
            windows.update(dict.fromkeys(item.windows, 0))
        if item.release:
            windows.update(dict.fromkeys((key for key, _ in item.release), 0))
    ordered = sorted(windows)
    for index, key in enumerate(ordered, 1):
        windows[key] = index
    rows: list[tuple[Any, ...]] = []
    tags: object = None
    tags_doc: dict[str, str] = {}
    last, indexes = None, []
    ids, release_ids, release_windows, release_amounts = [], [], [], []
    released: set[str] = set()
    for item in batch:
        record = item.record
        if item.windows is not last:
            last, indexes = item.windows, [windows[key] for key in item.windows]
        if record.tags is not tags:
            tags, tags_doc = record.tags, dict(record.tags)
        rows.append((*_columns(record, tags_doc), indexes))
        if item.reservation_id and item.reservation_id not in released:  # given back once (rows.py)
            released.add(item.reservation_id)
            ids.append(item.reservation_id)
            for key, amount in item.release:
                release_ids.append(item.reservation_id)
                release_windows.append(windows[key])
                release_amounts.append(amount)
    keys = list(zip(*ordered, strict=True)) if ordered else [(), (), (), ()]
    args = [_dumps(rows), *keys, ids, release_ids, release_windows, release_amounts]
    inserted, totals = set(), {}
    for kind, value, period, start, scope_key, scope_value, spent in await conn.fetch(_sql(), *args):
        if kind == "n":
            inserted.add(value)
        else:
            totals[WindowKey(period, start, scope_key, scope_value)] = spent
    return inserted, totals
