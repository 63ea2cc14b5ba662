"""Re-pricing the ledger, and the models it could not price.

`reprice` recomputes the cost of ledger rows in a time range with a Pricer (e.g. after adding an
override for a model that was unknown) and corrects the rollups by the difference in the same
transaction, batch by batch, so the rollups keep equalling the ledger's sums. A priced row the Pricer
has no price for keeps its cost (`ModelChange.kept`): a Pricer without the app's overrides or
fallback must not turn recorded spend into unknown. So does a row an override priced, when the
Pricer has no overrides (the command line's cannot be given any): the app's price stands. Each
batch locks the rows it changes (FOR UPDATE on PostgreSQL, BEGIN IMMEDIATE on SQLite) and prices
them again, so overlapping runs change a row, and move its windows, once.

A row's windows: every call counts in the global day and month windows (the latest global window
start at or before its time, so the tracker's time zone need not be given again). A per-tag window
counts only the calls recorded by a tracker with that per-tag budget, which the row does not say.
So a window's calls are identified among the ledger rows carrying its tag in its span: all of them,
or the latest or the earliest `calls` of them (a budget added or removed within the window),
whichever its call count, unknown count, spend and token sums match. A window none matches is left
as it is, with a warning.
"""

from __future__ import annotations

import bisect
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    bindparam,
    case,
    cast,
    func,
    literal,
    literal_column,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection

from ..pricing import Pricer
from ..usage import Usage
from .rows import WindowKey
from .schema import UTCDateTime, calls, rollups
from .store import Store

__all__ = ["ModelChange", "UnpricedModel", "reprice", "unpriced_models"]

logger = logging.getLogger("llm_spend")

_BATCH = 500
_KEYS_PER_QUERY = 200
_USAGE = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "reasoning_tokens",
)
_PRICING = ("cost_nanousd", "pricing_status", "price_source")
_KEY_PARAMS = ("k_period", "k_start", "k_scope", "k_value")
_ZERO: ColumnElement[int] = literal_column("0")
_ONE: ColumnElement[int] = literal_column("1")
_SUMMED = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")


@dataclass
class ModelChange:
    """What re-pricing changes for one (provider, model): calls whose cost changed, nano-USD before/after;
    `kept`: priced calls the Pricer has no price for, left at their recorded cost; `relabelled`: calls
    whose cost stays and whose price source alone changed (updated too, not counted in `calls`)."""

    provider: str
    model: str
    calls: int = 0
    before_nanousd: int = 0
    after_nanousd: int = 0
    unknown_before: int = 0
    unknown_after: int = 0
    kept: int = 0
    relabelled: int = 0


@dataclass(frozen=True, slots=True)
class UnpricedModel:
    """A model seen in the ledger without a price from a price table (unknown, or a fallback rate)."""

    provider: str
    model: str
    calls: int
    input_tokens: int
    output_tokens: int
    price_source: str | None


async def unpriced_models(store: Store, since: datetime) -> list[UnpricedModel]:
    """Models recorded since `since` with an unknown price or priced by `fallback_price`."""
    query = (
        select(
            calls.c.provider,
            calls.c.model,
            func.count(),
            func.sum(calls.c.input_tokens),
            func.sum(calls.c.output_tokens),
            func.max(calls.c.price_source),
        )
        .where(calls.c.occurred_at >= since)
        .where(or_(calls.c.pricing_status == "unknown_model", calls.c.price_source.like("fallback%")))
        .group_by(calls.c.provider, calls.c.model)
        .order_by(func.count().desc())
    )
    async with store.engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [UnpricedModel(r[0], r[1], int(r[2]), int(r[3] or 0), int(r[4] or 0), r[5]) for r in rows]


class _Update(NamedTuple):
    """A row's new pricing."""

    row: Any
    cost: int | None
    status: str
    source: str | None


@dataclass(frozen=True, slots=True)
class _Counted:
    """The ledger ids [low, high] a per-tag window counts (none when low is None), as known for rows
    up to id `upto`; `identified` is False when no candidate matched the window (it counts some)."""

    low: int | None
    high: int | None
    upto: int
    identified: bool = True

    def covers(self, row_id: int) -> bool:
        return self.low is not None and self.high is not None and self.low <= row_id <= self.high


async def reprice(
    store: Store, pricer: Pricer, *, since: datetime, until: datetime, dry_run: bool = False
) -> list[ModelChange]:
    """Recompute costs of rows in [since, until); with dry_run, report the difference and change nothing."""
    changes: dict[tuple[str, str], ModelChange] = {}
    counted: dict[WindowKey, _Counted] = {}
    unidentified: set[WindowKey] = set()
    postgres = store.dialect == "postgresql"
    last_id = 0
    while True:
        async with store.engine.connect() as conn:  # reading, then identifying windows, locks nothing
            batch = _rows(calls.c.occurred_at >= since, calls.c.occurred_at < until, calls.c.id > last_id)
            rows = (await conn.execute(batch.limit(_BATCH))).mappings().all()
            if not rows:
                break
            last_id = rows[-1]["id"]
            updates, kept = _priced(rows, pricer)
            _tally(changes, updates if dry_run else [], kept)
            if dry_run or not updates:
                continue
            starts = await _global_starts(conn, [u.row["occurred_at"] for u in updates])
            await _identify(conn, [u for u in updates if _moves(u)], starts, counted, postgres)
        async with store.transaction() as conn:
            ids = [u.row["id"] for u in updates]
            locked = (await conn.execute(_rows(calls.c.id.in_(ids)).with_for_update())).mappings().all()
            updates, kept = _priced(locked, pricer)  # as they are now: another run may have changed them
            _tally(changes, updates, kept)
            if updates:
                await _identify(conn, [u for u in updates if _moves(u)], starts, counted, postgres)
                await _apply(conn, updates, starts, counted, unidentified)
    if unidentified:
        _warn(unidentified)
    return sorted(changes.values(), key=lambda c: (c.provider, c.model))


def _warn(unidentified: set[WindowKey]) -> None:
    named = (f"{k.period} {k.start:%Y-%m-%d} {k.scope_key}={k.scope_value}" for k in sorted(unidentified))
    logger.warning(
        "reprice: %d per-tag rollup windows count some of their calls and the ledger does not say "
        "which; left as they were: %s",
        len(unidentified),
        ", ".join(list(named)[:5]),
    )


def _rows(*where: ColumnElement[bool]) -> Select[Any]:
    return select(calls).where(*where).order_by(calls.c.id)


def _priced(rows: Sequence[Any], pricer: Pricer) -> tuple[list[_Update], list[Any]]:
    """The rows whose pricing changes, with it; and the priced rows the Pricer has no price for."""
    updates, kept = [], []
    for row in rows:
        if row["usage_source"] == "unknown":  # no usage arrived: nothing to price
            continue
        if row["price_source"] == "override" and not pricer.has_overrides:
            kept.append(row)  # the app's own price, which this Pricer (the command line's) has not
            continue
        usage = Usage(**{name: row[name] for name in _USAGE})
        tier = row["service_tier"]
        context: dict[str, Any] = {"batch": True} if tier == "batch" else {"service_tier": tier}
        cost = pricer.price(row["provider"], row["model"], usage, at=row["occurred_at"], **context)
        if cost.nanousd is None and row["cost_nanousd"] is not None:
            kept.append(row)
        elif (cost.nanousd, cost.status, cost.source) != tuple(row[name] for name in _PRICING):
            updates.append(_Update(row, cost.nanousd, cost.status, cost.source))
    return updates, kept


def _moves(u: _Update) -> bool:
    """Whether a row's new pricing moves its windows (its cost, or whether it is known)."""
    before = u.row["cost_nanousd"]
    return (u.cost or 0) != (before or 0) or (u.cost is None) != (before is None)


def _tally(changes: dict[tuple[str, str], ModelChange], updates: list[_Update], kept: list[Any]) -> None:
    def change(row: Any) -> ModelChange:
        return changes.setdefault((row["provider"], row["model"]), ModelChange(row["provider"], row["model"]))

    for u in updates:
        c = change(u.row)
        if (u.cost, u.status) == (u.row["cost_nanousd"], u.row["pricing_status"]):
            c.relabelled += 1
            continue
        c.calls += 1
        c.before_nanousd += u.row["cost_nanousd"] or 0
        c.after_nanousd += u.cost or 0
        c.unknown_before += u.row["cost_nanousd"] is None
        c.unknown_after += u.cost is None
    for row in kept:
        change(row).kept += 1


def _spans(at: datetime, starts: dict[str, list[datetime]]) -> list[tuple[str, datetime, datetime | None]]:
    """(period, start, end or None) of the global windows holding `at`; the end is the next start."""
    spans = []
    for period, known in starts.items():
        i = bisect.bisect_right(known, at) - 1
        if i >= 0:
            spans.append((period, known[i], known[i + 1] if i + 1 < len(known) else None))
    return spans


def _tag_keys(u: _Update, starts: dict[str, list[datetime]]) -> list[tuple[WindowKey, datetime | None]]:
    """The per-tag windows a row could count in, with their ends."""
    tags = u.row["tags"] or {}
    return [
        (WindowKey(period, start, k, str(v)), end)
        for period, start, end in _spans(u.row["occurred_at"], starts)
        for k, v in tags.items()
    ]


async def _identify(
    conn: AsyncConnection,
    updates: list[_Update],
    starts: dict[str, list[datetime]],
    counted: dict[WindowKey, _Counted],
    postgres: bool,
) -> None:
    """Learn which calls the existing per-tag windows of these rows count, where not known yet."""
    wanted: dict[WindowKey, datetime | None] = {}
    for u in updates:
        for key, end in _tag_keys(u, starts):
            known = counted.get(key)
            if known is None or u.row["id"] > known.upto:
                wanted[key] = end
    keys = sorted(wanted)
    columns = (rollups.c.period, rollups.c.window_start, rollups.c.scope_key, rollups.c.scope_value)
    for i in range(0, len(keys), _KEYS_PER_QUERY):
        query = select(*columns).where(tuple_(*columns).in_(keys[i : i + _KEYS_PER_QUERY]))
        for period, start, scope_key, scope_value in (await conn.execute(query)).all():
            key = WindowKey(period, start, scope_key, scope_value)
            result = await _counted_calls(conn, key, wanted[key], postgres)
            if result is not None:
                counted[key] = result


async def _counted_calls(
    conn: AsyncConnection, key: WindowKey, end: datetime | None, postgres: bool
) -> _Counted | None:
    """Which ledger rows carrying the window's tag in its span the window counts, read with the
    window's row in one statement (one snapshot): all, the latest or the earliest `calls` of them."""
    span = [calls.c.occurred_at >= literal(key.start, UTCDateTime()), _carries(key, postgres)]
    if end is not None:
        span.append(calls.c.occurred_at < literal(end, UTCDateTime()))
    ranked = (
        select(
            calls.c.id,
            calls.c.cost_nanousd,
            *(calls.c[name] for name in _SUMMED),
            func.row_number().over(order_by=calls.c.id.desc()).label("late"),
            func.row_number().over(order_by=calls.c.id).label("early"),
        )
        .where(*span)
        .subquery()
    )
    totals = [rollups.c[name] for name in ("calls", "spent_nanousd", "unknown_cost_calls", *_SUMMED)]
    is_window = and_(
        rollups.c.period == key.period,
        rollups.c.window_start == literal(key.start, UTCDateTime()),
        rollups.c.scope_key == key.scope_key,
        rollups.c.scope_value == key.scope_value,
    )
    query = (
        select(
            func.max(ranked.c.id),
            *totals,
            *_sums(ranked, ranked.c.late <= rollups.c.calls),
            *_sums(ranked, ranked.c.early <= rollups.c.calls),
        )
        .select_from(ranked.join(rollups, is_window))
        .group_by(*totals)
    )
    found = (await conn.execute(query)).first()
    if found is None:
        return None
    values = [None if v is None else int(v) for v in found]
    upto, window, n = values[0] or 0, values[1:9], 10
    for sums in (values[9 : 9 + n], values[9 + n : 9 + 2 * n]):
        if sums[:8] == window:
            return _Counted(sums[8], sums[9], upto)
    return _Counted(None, None, upto, identified=False)


def _sums(ranked: Any, inside: ColumnElement[bool]) -> list[ColumnElement[Any]]:
    """Calls, spend, unknown calls and token sums of the rows `inside`, then their lowest and highest id."""

    def total(value: Any) -> ColumnElement[Any]:
        return func.coalesce(func.sum(case((inside, value), else_=_ZERO)), _ZERO)

    return [
        total(_ONE),
        total(func.coalesce(ranked.c.cost_nanousd, _ZERO)),
        total(case((ranked.c.cost_nanousd.is_(None), _ONE), else_=_ZERO)),
        *(total(ranked.c[name]) for name in _SUMMED),
        func.min(case((inside, ranked.c.id))),
        func.max(case((inside, ranked.c.id))),
    ]


def _carries(key: WindowKey, postgres: bool) -> ColumnElement[bool]:
    """Ledger rows with the window's tag (JSONB containment on PostgreSQL, so the GIN index serves it)."""
    if postgres:
        return calls.c.tags.op("@>")(cast(literal(json.dumps({key.scope_key: key.scope_value})), JSONB))
    return func.json_extract(calls.c.tags, literal(f'$."{key.scope_key}"')) == key.scope_value


async def _global_starts(conn: AsyncConnection, times: list[datetime]) -> dict[str, list[datetime]]:
    """Per period, the global window starts from the one holding the earliest time to the one after
    the latest (the next start ends a window's span)."""
    first, last = min(times), max(times)
    starts = {}
    for period in ("day", "month"):
        is_global = and_(rollups.c.period == period, rollups.c.scope_key == "")
        column = rollups.c.window_start
        low = (await conn.execute(select(func.max(column)).where(is_global, column <= first))).scalar()
        high = (await conn.execute(select(func.min(column)).where(is_global, column > last))).scalar()
        between = select(column).where(is_global, column > first, column <= last)
        middle = list((await conn.execute(between)).scalars().all())
        starts[period] = sorted([s for s in (low, high) if s is not None] + middle)
    return starts


async def _apply(
    conn: AsyncConnection,
    updates: list[_Update],
    starts: dict[str, list[datetime]],
    counted: dict[WindowKey, _Counted],
    unidentified: set[WindowKey],
) -> None:
    """Update the rows and move the windows they count in by the difference, in the caller's transaction."""
    await conn.execute(
        update(calls)
        .where(calls.c.id == bindparam("row_id"))
        .values(
            cost_nanousd=bindparam("new_cost"),
            pricing_status=bindparam("new_status"),
            price_source=bindparam("new_source"),
        ),
        [
            {"row_id": u.row["id"], "new_cost": u.cost, "new_status": u.status, "new_source": u.source}
            for u in updates
        ],
    )
    deltas: dict[WindowKey, list[int]] = {}
    for u in updates:
        if not _moves(u):  # its price source alone changed: no window moves
            continue
        keys = [WindowKey(period, start, "", "") for period, start, _ in _spans(u.row["occurred_at"], starts)]
        for key, _ in _tag_keys(u, starts):
            known = counted.get(key)
            if known is not None and not known.identified:
                unidentified.add(key)
            elif known is not None and known.covers(u.row["id"]):
                keys.append(key)
        for key in keys:
            d = deltas.setdefault(key, [0, 0])
            d[0] += (u.cost or 0) - (u.row["cost_nanousd"] or 0)
            d[1] += int(u.cost is None) - int(u.row["cost_nanousd"] is None)
    if not deltas:
        return
    await conn.execute(
        update(rollups)
        .where(
            and_(
                rollups.c.period == bindparam("k_period"),
                rollups.c.window_start == bindparam("k_start", type_=UTCDateTime()),
                rollups.c.scope_key == bindparam("k_scope"),
                rollups.c.scope_value == bindparam("k_value"),
            )
        )
        .values(
            spent_nanousd=rollups.c.spent_nanousd + bindparam("d_spent"),
            unknown_cost_calls=rollups.c.unknown_cost_calls + bindparam("d_unknown"),
        ),
        [
            {**dict(zip(_KEY_PARAMS, k, strict=True)), "d_spent": d[0], "d_unknown": d[1]}
            for k, d in sorted(deltas.items())
        ],
    )
