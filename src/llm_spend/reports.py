"""Reports: where the money went, by day, month, model, provider or any tag, read from the ledger.

One grouped SQL query per report. Tag lookups bind the key as a parameter (SQLite ``json_extract``
with a bound path; PostgreSQL ``jsonb_extract_path_text``) and tag filters use JSONB containment on
PostgreSQL, so its GIN index applies. Days and months are calendar windows in the tracker's time zone:
PostgreSQL converts with ``AT TIME ZONE``; SQLite, which has no time zones, buckets the UTC timestamps
by the window boundaries computed here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, and_, case, cast, func, literal, select
from sqlalchemy.dialects.postgresql import JSONB

from .budgets import Budget, BudgetRule, describe, window_bounds
from .money import from_nanousd
from .storage.schema import UTCDateTime, calls, rollups
from .storage.store import Store

__all__ = ["BudgetStatus", "ReportRow", "WindowTotal", "budget_status", "current_windows", "report"]

_TAG_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_COLUMNS = ("model", "provider")
_MAX_BUCKETS = 2_000


@dataclass(frozen=True, slots=True)
class ReportRow:
    """One group of a report: its key, what it cost, and its token sums (canonical buckets)."""

    group: dict[str, str | None]
    key: tuple[str | None, ...]
    cost: Decimal
    """USD of the calls with a known cost; `unknown_cost_calls` counts the others."""
    calls: int
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    unknown_cost_calls: int


async def report(
    store: Store,
    tz: ZoneInfo,
    *,
    start: datetime,
    end: datetime,
    group_by: Sequence[str] = (),
    where: Mapping[str, str] | None = None,
) -> list[ReportRow]:
    """Sums of the calls in [start, end), grouped by `group_by`, filtered by `where` (all must match)."""
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("start and end must be aware datetimes")
    if not start < end:
        raise ValueError(f"start ({start.isoformat()}) must be before end ({end.isoformat()})")
    if isinstance(group_by, str):
        group_by = (group_by,)
    postgres = store.dialect == "postgresql"
    groups = [_group(name, postgres, tz, start, end) for name in group_by]
    conditions = [calls.c.occurred_at >= start, calls.c.occurred_at < end]
    conditions += _filters(where or {}, postgres)
    query = (
        select(
            *groups,
            func.coalesce(func.sum(calls.c.cost_nanousd), 0),
            func.count(),
            *(func.coalesce(func.sum(calls.c[n]), 0) for n in _TOKENS),
            func.count() - func.count(calls.c.cost_nanousd),
        )
        .where(and_(*conditions))
        .group_by(*groups)
        .order_by(*groups)
    )
    async with store.engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [_row(tuple(group_by), tuple(r), postgres) for r in rows]


_TOKENS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")


def _row(names: tuple[str, ...], values: tuple[Any, ...], postgres: bool) -> ReportRow:
    n = len(names)
    key = tuple(_label(v) for v in values[:n])
    sums = [int(v) for v in values[n:]]
    return ReportRow(dict(zip(names, key, strict=True)), key, from_nanousd(sums[0]), sums[1], *sums[2:])


def _label(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, datetime):
        return value.date().isoformat()
    return str(value)


def _group(name: str, postgres: bool, tz: ZoneInfo, start: datetime, end: datetime) -> ColumnElement[Any]:
    if name in _COLUMNS:
        return calls.c[name]
    if name in ("day", "month"):
        return _calendar(name, postgres, tz, start, end).label(name)
    if not isinstance(name, str) or not _TAG_KEY.fullmatch(name):
        raise ValueError(f"group_by {name!r} must be day, month, model, provider or a tag key")
    return _tag(name, postgres).label(f"tag_{name}")


def _tag(key: str, postgres: bool) -> ColumnElement[Any]:
    if postgres:
        return func.jsonb_extract_path_text(calls.c.tags, literal(key))
    return func.json_extract(calls.c.tags, literal(f'$."{key}"'))


def _calendar(
    period: str, postgres: bool, tz: ZoneInfo, start: datetime, end: datetime
) -> ColumnElement[Any]:
    """The day (YYYY-MM-DD) or month (YYYY-MM) of each call, in the tracker's time zone."""
    if postgres:
        local = func.timezone(literal(tz.key), calls.c.occurred_at)
        fmt = "YYYY-MM-DD" if period == "day" else "YYYY-MM"
        return func.to_char(func.date_trunc(literal(period), local), literal(fmt))
    starts = []
    at = window_bounds(period, start, tz)[0]
    while at < end:
        starts.append(at)
        at = window_bounds(period, at, tz)[1]
        if len(starts) > _MAX_BUCKETS:
            raise ValueError(f"a {period} report over more than {_MAX_BUCKETS} {period}s is too long")
    width = 10 if period == "day" else 7
    whens = [
        (calls.c.occurred_at >= literal(s, UTCDateTime()), s.astimezone(tz).isoformat()[:width])
        for s in reversed(starts)
    ]
    return case(*whens, else_=None)


def _filters(where: Mapping[str, str], postgres: bool) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    tags: dict[str, str] = {}
    for key, value in where.items():
        if key in _COLUMNS:
            conditions.append(calls.c[key] == str(value))
        elif isinstance(key, str) and _TAG_KEY.fullmatch(key):
            tags[key] = str(value)
        else:
            raise ValueError(f"where key {key!r} must be model, provider or a tag key")
    if tags and postgres:
        conditions.append(calls.c.tags.op("@>")(cast(literal(json.dumps(tags)), JSONB)))
    else:
        conditions += [_tag(key, False) == value for key, value in tags.items()]
    return conditions


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """Where one budget window stands now. Money in USD."""

    budget: Budget
    description: str
    mode: str
    scope_value: str | None
    """The tag value of a per-tag budget's window (None for a global budget)."""
    window_start: datetime
    window_end: datetime
    limit: Decimal
    spent: Decimal
    reserved: Decimal
    remaining: Decimal
    """limit - spent - reserved, never below 0."""
    percent: Decimal
    """(spent + reserved) / limit x 100, to 0.1."""
    projected: Decimal
    """Spend at the window's end if it goes on at the pace so far (linear in elapsed time)."""


async def budget_status(
    store: Store, rules: Sequence[BudgetRule], bounds: Any, *, now: datetime, top: int = 20
) -> list[BudgetStatus]:
    """The current window of every day and month budget; per-tag budgets show their `top` windows by spend."""
    found: list[BudgetStatus] = []
    async with store.engine.connect() as conn:
        for rule in rules:
            period = rule.budget.period
            if period == "call":
                continue
            start, end = bounds(period, now)
            query = (
                select(rollups.c.scope_value, rollups.c.spent_nanousd, rollups.c.reserved_nanousd)
                .where(rollups.c.period == period, rollups.c.window_start == start)
                .where(rollups.c.scope_key == rule.scope_key)
                .order_by(rollups.c.spent_nanousd.desc(), rollups.c.scope_value)
                .limit(top)
            )
            rows: list[Any] = list((await conn.execute(query)).all())
            if not rows and rule.budget.per is None:
                rows = [("", 0, 0)]  # nothing spent yet in this window
            found += [_status(rule, row, start, end, now) for row in rows]
    return found


def _status(rule: BudgetRule, row: Any, start: datetime, end: datetime, now: datetime) -> BudgetStatus:
    spent, reserved = from_nanousd(int(row[1])), from_nanousd(int(row[2]))
    limit = rule.budget.limit
    elapsed = max((now - start).total_seconds(), 1.0) / (end - start).total_seconds()
    used = spent + reserved
    return BudgetStatus(
        budget=rule.budget,
        description=describe(rule.budget),
        mode=rule.mode,
        scope_value=row[0] if rule.budget.per is not None else None,
        window_start=start,
        window_end=end,
        limit=limit,
        spent=spent,
        reserved=reserved,
        remaining=max(limit - used, Decimal(0)),
        percent=(used * 100 / limit).quantize(Decimal("0.1")) if limit else Decimal(100),
        projected=(spent / Decimal(str(min(elapsed, 1.0)))).quantize(Decimal("0.000001")),
    )


@dataclass(frozen=True, slots=True)
class WindowTotal:
    """One rollup window as stored: what `llm-spend budgets` shows without a budget configuration."""

    period: str
    window_start: datetime
    scope_key: str
    scope_value: str
    spent: Decimal
    reserved: Decimal
    calls: int


async def current_windows(store: Store, tz: ZoneInfo, *, now: datetime, top: int = 20) -> list[WindowTotal]:
    """Today's and this month's windows in `tz`: the global ones, then per scope the `top` by spend."""
    found: list[WindowTotal] = []
    async with store.engine.connect() as conn:
        for period in ("day", "month"):
            start = window_bounds(period, now, tz)[0]
            base = select(
                rollups.c.scope_key, rollups.c.scope_value, rollups.c.spent_nanousd,
                rollups.c.reserved_nanousd, rollups.c.calls,
            ).where(rollups.c.period == period, rollups.c.window_start == start)  # fmt: skip
            keys = (await conn.execute(select(rollups.c.scope_key).distinct().where(
                rollups.c.period == period, rollups.c.window_start == start))).scalars().all()  # fmt: skip
            for key in sorted(keys):
                query = (
                    base.where(rollups.c.scope_key == key).order_by(rollups.c.spent_nanousd.desc()).limit(top)
                )
                for r in (await conn.execute(query)).all():
                    found.append(
                        WindowTotal(
                            period, start, r[0], r[1], from_nanousd(r[2]), from_nanousd(r[3]), int(r[4])
                        )
                    )
    return found
