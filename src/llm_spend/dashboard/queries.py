"""The dashboard's reads beyond the report API: one page of calls, the rows of a CSV export, tag keys,
and data-quality counts. Every query takes the conditions built by `reports.ledger_conditions` (bound
parameters only) plus, optionally, one data-quality issue."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, and_, case, cast, func, literal, select, true
from sqlalchemy.dialects.postgresql import JSONB

from ..money import from_nanousd
from ..reports import ReportRow, tag_value
from ..storage.schema import calls
from ..storage.store import Store

NOT_TAG_KEYS = ("model", "provider", "day", "month")
"""Keys a report reads as columns or calendar periods: tags so named are shown, never grouped by."""

__all__ = [
    "ISSUES",
    "CallRow",
    "Quality",
    "TagSpread",
    "calls_page",
    "export_rows",
    "issue_condition",
    "quality",
    "tag_keys",
    "tag_spread",
]

ISSUES = {
    "unknown_price": "unknown price (model not in any price table)",
    "unknown_usage": "unknown usage (the provider reported no tokens)",
    "fallback_price": "priced at the fallback rate",
    "untagged": "untagged calls",
    "stream_no_usage": "streams that ended without usage",
}
"""The data-quality issues a calls filter can select, with what they mean."""

EXPORT_COLUMNS = tuple(c.name for c in calls.columns if c.name != "id")


def issue_condition(issue: str, postgres: bool) -> ColumnElement[bool]:
    """The ledger rows that have one data-quality `issue` (a key of ISSUES)."""
    if issue == "unknown_price":
        return calls.c.pricing_status == "unknown_model"
    if issue == "unknown_usage":
        return calls.c.pricing_status == "unknown_usage"
    if issue == "fallback_price":
        return calls.c.price_source.like("fallback%")
    if issue == "untagged":
        if postgres:
            return calls.c.tags.op("=")(cast(literal("{}"), JSONB))
        return func.json(calls.c.tags) == "{}"
    if issue == "stream_no_usage":
        return and_(calls.c.stream.is_(True), calls.c.usage_source == "unknown")
    raise ValueError(f"issue must be one of {', '.join(ISSUES)}, got {issue!r}")


@dataclass(frozen=True, slots=True)
class CallRow:
    """One ledger row as the calls table shows it."""

    event_id: str
    occurred_at: datetime
    provider: str
    model: str
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    reasoning_tokens: int
    cost: Decimal | None
    pricing_status: str
    usage_source: str
    stream: bool
    latency_ms: int | None
    tags: dict[str, str]


async def calls_page(
    store: Store, conditions: Sequence[ColumnElement[bool]], *, limit: int, offset: int
) -> tuple[list[CallRow], bool]:
    """The matching calls, newest first: `limit` of them from `offset`, and whether more follow."""
    query = (
        select(calls)
        .where(*conditions)
        .order_by(calls.c.occurred_at.desc(), calls.c.id.desc())
        .limit(limit + 1)
        .offset(offset)
    )
    async with store.engine.connect() as conn:
        rows = (await conn.execute(query)).mappings().all()
    return [_call_row(row) for row in rows[:limit]], len(rows) > limit


def _call_row(row: Any) -> CallRow:
    cost = row["cost_nanousd"]
    tags = row["tags"]
    return CallRow(
        event_id=row["event_id"],
        occurred_at=row["occurred_at"],
        provider=row["provider"],
        model=row["model"],
        input_tokens=row["input_tokens"],
        output_tokens=row["output_tokens"],
        cache_read_tokens=row["cache_read_tokens"],
        reasoning_tokens=row["reasoning_tokens"],
        cost=None if cost is None else from_nanousd(cost),
        pricing_status=row["pricing_status"],
        usage_source=row["usage_source"],
        stream=bool(row["stream"]),
        latency_ms=row["latency_ms"],
        tags=dict(json.loads(tags) if isinstance(tags, str) else tags),
    )


async def export_rows(
    store: Store, conditions: Sequence[ColumnElement[bool]], *, batch: int = 1_000
) -> AsyncIterator[list[dict[str, Any]]]:
    """The matching ledger rows, oldest first, in batches, read through a server-side cursor (constant
    memory whatever the range). Each row maps EXPORT_COLUMNS to values; `cost_nanousd` stays an integer.
    In memory, where the database's one connection is lent to one user at a time, the rows are read
    first (they are in memory already), so that a slow download holds no write up."""
    query = select(calls).where(*conditions).order_by(calls.c.occurred_at, calls.c.id)
    if store.dialect == "sqlite" and store.path is None:
        async with store.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        for start in range(0, len(rows), batch):
            yield [{name: row[name] for name in EXPORT_COLUMNS} for row in rows[start : start + batch]]
        return
    async with store.engine.connect() as conn:
        result = await conn.stream(query.execution_options(yield_per=batch))
        async for partition in result.mappings().partitions():
            yield [{name: row[name] for name in EXPORT_COLUMNS} for row in partition]


async def tag_keys(
    store: Store, conditions: Sequence[ColumnElement[bool]], *, limit: int = 50
) -> list[tuple[str, int]]:
    """The tag keys carried by the matching calls, with how many calls carry each, most used first."""
    if store.dialect == "postgresql":
        keys = select(func.jsonb_object_keys(calls.c.tags).label("key")).where(*conditions).subquery()
    else:
        each = func.json_each(calls.c.tags).table_valued("key", name="each")
        inner = select(each.c.key.label("key")).select_from(calls).join(each, true()).where(*conditions)
        keys = inner.subquery()
    query = (
        select(keys.c.key, func.count().label("n"))
        .where(keys.c.key.not_in(NOT_TAG_KEYS))
        .group_by(keys.c.key)
        .order_by(func.count().desc(), keys.c.key)
        .limit(limit)
    )
    async with store.engine.connect() as conn:
        return [(str(key), int(n)) for key, n in (await conn.execute(query)).all()]


@dataclass(frozen=True, slots=True)
class TagSpread:
    """How many distinct values one tag key takes in the matching calls, and the sums of the matching
    calls that lack the key (the "(no key)" row of the tags page; None when every call carries it)."""

    values: int
    without: ReportRow | None


_TOKENS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")


async def tag_spread(store: Store, conditions: Sequence[ColumnElement[bool]], key: str) -> TagSpread:
    """One pass over the matching calls: the distinct values of tag `key` (a bound parameter), and the
    cost, calls and token sums of those without it, however many values rank above them."""
    value = tag_value(key, store.dialect == "postgresql")
    missing = value.is_(None)
    query = select(
        func.count(func.distinct(value)),
        func.coalesce(func.sum(case((missing, calls.c.cost_nanousd))), 0),
        func.count(case((missing, 1))),
        *(func.coalesce(func.sum(case((missing, calls.c[name]))), 0) for name in _TOKENS),
        func.count(case((missing, 1))) - func.count(case((missing, calls.c.cost_nanousd))),
    ).where(*conditions)
    async with store.engine.connect() as conn:
        values, nanousd, n, *sums = (int(v) for v in (await conn.execute(query)).one())
    without = ReportRow({key: None}, (None,), from_nanousd(nanousd), n, *sums) if n else None
    return TagSpread(values, without)


@dataclass(frozen=True, slots=True)
class Quality:
    """How many of the matching calls have each data-quality issue (keys of ISSUES), of how many."""

    calls: int
    counts: dict[str, int]


async def quality(store: Store, conditions: Sequence[ColumnElement[bool]]) -> Quality:
    """One pass over the matching calls counting every issue."""
    postgres = store.dialect == "postgresql"
    counts = [
        func.coalesce(func.sum(case((issue_condition(name, postgres), 1), else_=0)), 0) for name in ISSUES
    ]
    query = select(func.count(), *counts).where(*conditions)
    async with store.engine.connect() as conn:
        total, *found = (await conn.execute(query)).one()
    return Quality(int(total), {name: int(n) for name, n in zip(ISSUES, found, strict=True)})


async def models_with(store: Store, conditions: Sequence[ColumnElement[bool]]) -> list[tuple[str, str, int]]:
    """(provider, model, calls) of the matching calls, most calls first (at most 50)."""
    query = (
        select(calls.c.provider, calls.c.model, func.count())
        .where(*conditions)
        .group_by(calls.c.provider, calls.c.model)
        .order_by(func.count().desc(), calls.c.provider, calls.c.model)
        .limit(50)
    )
    async with store.engine.connect() as conn:
        return [(p, m, int(n)) for p, m, n in (await conn.execute(query)).all()]
