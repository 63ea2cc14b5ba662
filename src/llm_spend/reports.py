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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, case, cast, func, literal, select
from sqlalchemy.dialects.postgresql import JSONB

from .budgets import Budget, BudgetRule, describe, window_bounds
from .context import is_secret_key, storable, stored_value
from .money import from_nanousd
from .storage.schema import UTCDateTime, calls, rollups
from .storage.store import Store

__all__ = [
    "MAX_TOP",
    "Bounds",
    "BudgetStatus",
    "ReportRow",
    "WindowTotal",
    "budget_status",
    "check_where",
    "current_windows",
    "group_keys",
    "ledger_conditions",
    "report",
    "safe_cell",
    "tag_value",
]

_TAG_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_COLUMNS = ("model", "provider")
_CALENDAR = ("day", "month")
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
    where: Mapping[str, object] | None = None,
    limit: int | None = None,
) -> list[ReportRow]:
    """Sums of the calls in [start, end), grouped by `group_by`, filtered by `where` (all must match).
    With `limit`, only the `limit` groups of highest cost (then most calls) are read from the ledger.

    Without `where`, grouped by nothing, "day" or "month", over whole days in `tz`, it reads the global
    day (or month) rollups: a few rows per day whatever the traffic, and totals that still count pruned
    calls. Anything else reads the ledger.
    """
    names = _check(start, end, group_by)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    for period in _CALENDAR:
        if period in names:
            _window_starts(period, tz, start, end)  # a bounded number of buckets, whichever path
    if not where and set(names) <= set(_CALENDAR):
        from_rollups = await _rollup_report(store, tz, start, end, names)
        if from_rollups is not None:
            return from_rollups
    postgres = store.dialect == "postgresql"
    groups = [_group(name, postgres, tz, start, end) for name in names]
    query = (
        select(
            *groups,
            func.coalesce(func.sum(calls.c.cost_nanousd), 0),
            func.count(),
            *(func.coalesce(func.sum(calls.c[n]), 0) for n in _TOKENS),
            func.count() - func.count(calls.c.cost_nanousd),
        )
        .where(*ledger_conditions(store, start, end, where))
        .group_by(*groups)
    )
    if limit is not None:
        query = query.order_by(func.sum(calls.c.cost_nanousd).desc().nulls_last(), func.count().desc())
        query = query.limit(limit)
    async with store.engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return sorted((_row(names, tuple(r)) for r in rows), key=_order)


_TOKENS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")


def _order(row: ReportRow) -> tuple[tuple[bool, str], ...]:
    """Rows sorted by key, a missing tag (None) last, the same on every backend."""
    return tuple((value is None, value or "") for value in row.key)


def _check(start: datetime, end: datetime, group_by: Sequence[str]) -> tuple[str, ...]:
    for name, value in (("start", start), ("end", end)):
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise ValueError(f"{name} must be an aware datetime, got {value!r}")
    if not start < end:
        raise ValueError(f"start ({start.isoformat()}) must be before end ({end.isoformat()})")
    return group_keys(group_by)


MAX_TOP = 1_000_000
"""Windows per budget in a status: more than any page shows (and a count the database can take)."""


def _check_top(top: int) -> None:
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= MAX_TOP:
        raise ValueError(f"top must be a positive integer, at most {MAX_TOP:,}, got {top!r}")


def group_keys(group_by: str | Sequence[str], option: str = "group_by") -> tuple[str, ...]:
    """The keys a report groups by, checked: ValueError naming `option` (the argument, or the CLI's
    option) for one that is not day, month, model, provider or a tag key, or given twice."""
    if not isinstance(group_by, str | Iterable):
        raise ValueError(f"{option} must be a key or a sequence of keys, got {group_by!r}")
    names = (group_by,) if isinstance(group_by, str) else tuple(group_by)
    for at, name in enumerate(names):
        if not isinstance(name, str) or not (name in _CALENDAR + _COLUMNS or _TAG_KEY.fullmatch(name)):
            raise ValueError(f"{option} {name!r} must be day, month, model, provider or a tag key")
        if name in names[:at]:
            raise ValueError(f"{option} names {name!r} twice")
    return names


def check_where(where: Mapping[str, object], option: str = "where") -> None:
    """ValueError naming `option` unless `where` maps model, provider or tag keys to values."""
    if not isinstance(where, Mapping):
        raise ValueError(f"{option} must be a mapping of key to value, got {where!r}")
    for key in where:
        if key not in _COLUMNS and not (isinstance(key, str) and _TAG_KEY.fullmatch(key)):
            raise ValueError(f"{option} key {key!r} must be model, provider or a tag key")


def ledger_conditions(
    store: Store, start: datetime, end: datetime, where: Mapping[str, object] | None = None
) -> list[ColumnElement[bool]]:
    """The WHERE clauses selecting ledger rows in [start, end) that match `where` (model, provider,
    tags). Tag keys and values are bound parameters; on PostgreSQL the tags are one JSONB containment
    test, which the GIN index on `tags` serves."""
    conditions = [calls.c.occurred_at >= start, calls.c.occurred_at < end]
    if where is None:
        return conditions
    check_where(where)
    return conditions + _filters(where, store.dialect == "postgresql")


def _row(names: tuple[str, ...], values: tuple[Any, ...]) -> ReportRow:
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
    if name in _CALENDAR:
        return _calendar(name, postgres, tz, start, end).label(name)
    return tag_value(name, postgres).label(f"tag_{name}")


def tag_value(key: str, postgres: bool) -> ColumnElement[Any]:
    """The value of tag `key` of each ledger row (NULL when absent); the key is a bound parameter."""
    if postgres:
        return func.jsonb_extract_path_text(calls.c.tags, literal(key))
    return func.json_extract(calls.c.tags, literal(f'$."{key}"'))


def _window_starts(period: str, tz: ZoneInfo, start: datetime, end: datetime) -> list[datetime]:
    """The starts of the `period` windows in `tz` that overlap [start, end), at most _MAX_BUCKETS."""
    starts = []
    at = window_bounds(period, start, tz)[0]
    while at < end:
        starts.append(at)
        if len(starts) > _MAX_BUCKETS:
            raise ValueError(f"a {period} report over more than {_MAX_BUCKETS} {period}s is too long")
        at = window_bounds(period, at, tz)[1]
    return starts


def _calendar(
    period: str, postgres: bool, tz: ZoneInfo, start: datetime, end: datetime
) -> ColumnElement[Any]:
    """The day (YYYY-MM-DD) or month (YYYY-MM) of each call, in the tracker's time zone."""
    if postgres:
        local = func.timezone(literal(tz.key), calls.c.occurred_at)
        fmt = "YYYY-MM-DD" if period == "day" else "YYYY-MM"
        return func.to_char(func.date_trunc(literal(period), local), literal(fmt))
    whens = [
        (calls.c.occurred_at >= literal(s, UTCDateTime()), _local_label(period, s, tz))
        for s in reversed(_window_starts(period, tz, start, end))
    ]
    return case(*whens, else_=None)


def _local_label(period: str, at: datetime, tz: ZoneInfo) -> str:
    return at.astimezone(tz).isoformat()[: 10 if period == "day" else 7]


def _filters(where: Mapping[str, object], postgres: bool) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    tags: dict[str, str] = {}
    for key, value in where.items():
        if key in _COLUMNS or is_secret_key(key):
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise ValueError(f"where[{key!r}] must be a string, got {value!r}")
            if key in _COLUMNS:
                conditions.append(calls.c[key] == storable(str(value)))
            else:  # stored as REDACTED: only that matches (the dashboard links it)
                tags[key] = storable(str(value))
        else:  # a tag key (`check_where`): any value a tag takes (a UUID, a number), as it is stored
            try:
                tags[key] = stored_value(key, value)
            except ValueError as exc:
                raise ValueError(f"where[{key!r}]: {exc}") from None
    if tags and postgres:
        conditions.append(calls.c.tags.op("@>")(cast(literal(json.dumps(tags)), JSONB)))
    else:
        conditions += [tag_value(key, False) == value for key, value in tags.items()]
    return conditions


async def _rollup_report(
    store: Store, tz: ZoneInfo, start: datetime, end: datetime, names: tuple[str, ...]
) -> list[ReportRow] | None:
    """The report from the global rollups, or None when [start, end) is not whole days in `tz` or the
    rollups were written in another time zone: a window starting in the range, or the one before it
    (which could reach into the range), does not start where a window of `tz` does."""
    period = "month" if "day" not in names and _aligned("month", tz, start, end) else "day"
    if not _aligned(period, tz, start, end):
        return None
    glob = (rollups.c.period == period, rollups.c.scope_key == "", rollups.c.scope_value == "")
    query = (
        select(rollups.c.window_start, rollups.c.spent_nanousd, rollups.c.calls,
               *(rollups.c[n] for n in _TOKENS), rollups.c.unknown_cost_calls)
        .where(*glob, rollups.c.window_start >= start, rollups.c.window_start < end)
    )  # fmt: skip
    before = select(func.max(rollups.c.window_start)).where(*glob, rollups.c.window_start < start)
    async with store.engine.connect() as conn:
        rows = (await conn.execute(query)).all()
        previous = (await conn.execute(before)).scalar()
    starts = [r[0] for r in rows] + ([] if previous is None else [previous])
    if any(window_bounds(period, at, tz)[0] != at for at in starts):
        return None
    sums: dict[tuple[str | None, ...], list[int]] = {} if names else {(): [0] * 8}
    for window_start, *values in rows:
        if values[1]:
            key = tuple(_local_label(name, window_start, tz) for name in names)
            total = sums.setdefault(key, [0] * 8)
            for i, value in enumerate(values):
                total[i] += int(value)
    return [_row(names, (*key, *total)) for key, total in sorted(sums.items())]  # labels are never None


def _aligned(period: str, tz: ZoneInfo, start: datetime, end: datetime) -> bool:
    return all(window_bounds(period, at, tz)[0] == at for at in (start, end))


def safe_cell(value: str) -> str:
    """A CSV cell a spreadsheet will not run as a formula (OWASP: prefix a quote to = + - @ tab CR)."""
    return "'" + value if value.startswith(_FORMULA) else value


_FORMULA = ("=", "+", "-", "@", "\t", "\r")


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


Bounds = Callable[[str, datetime], tuple[datetime, datetime]]
"""The (start, end) of the window of a period containing a time: `Guard.bounds`."""


async def budget_status(
    store: Store, rules: Sequence[BudgetRule], bounds: Bounds, *, now: datetime, top: int = 20
) -> list[BudgetStatus]:
    """The current window of every day and month budget; per-tag budgets show their `top` windows by spend."""
    _check_top(top)
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
    _check_top(top)
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
