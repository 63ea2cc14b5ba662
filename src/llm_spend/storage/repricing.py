"""Re-pricing the ledger, and the models it could not price.

`reprice` recomputes the cost of ledger rows in a time range with a Pricer (e.g. after adding an
override for a model that was unknown) and corrects the rollups by the difference in the same
transaction, batch by batch, so the rollups keep equalling the ledger's sums. A row's windows are
found among the rollup rows themselves (the latest window start at or before the row's time, for
each period; then the per-tag windows of that start whose tag the row carries), so the tracker's
time zone need not be given again.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from ..pricing import Pricer
from ..usage import Usage
from .schema import UTCDateTime, calls, rollups
from .store import Store

__all__ = ["ModelChange", "UnpricedModel", "reprice", "unpriced_models"]

_BATCH = 500
_USAGE = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "reasoning_tokens",
)


@dataclass
class ModelChange:
    """What re-pricing changes for one (provider, model): calls whose cost changed, nano-USD before/after."""

    provider: str
    model: str
    calls: int = 0
    before_nanousd: int = 0
    after_nanousd: int = 0
    unknown_before: int = 0
    unknown_after: int = 0


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


async def reprice(
    store: Store, pricer: Pricer, *, since: datetime, until: datetime, dry_run: bool = False
) -> list[ModelChange]:
    """Recompute costs of rows in [since, until); with dry_run, report the difference and change nothing."""
    changes: dict[tuple[str, str], ModelChange] = {}
    async with store.engine.connect() as conn:
        windows = _Windows(
            {period: await _window_starts(conn, period) for period in ("day", "month")},
            await _scoped_windows(conn),
        )
    last_id = 0
    while True:
        async with store.engine.begin() as conn:
            rows = (
                (
                    await conn.execute(
                        select(calls)
                        .where(
                            calls.c.occurred_at >= since, calls.c.occurred_at < until, calls.c.id > last_id
                        )
                        .order_by(calls.c.id)
                        .limit(_BATCH)
                    )
                )
                .mappings()
                .all()
            )
            if not rows:
                break
            last_id = rows[-1]["id"]
            updates = [u for u in (_repriced(row, pricer, changes) for row in rows) if u is not None]
            if updates and not dry_run:
                await _apply(conn, updates, windows)
    return sorted(changes.values(), key=lambda c: (c.provider, c.model))


def _repriced(row: Any, pricer: Pricer, changes: dict[tuple[str, str], ModelChange]) -> dict[str, Any] | None:
    """The new pricing of a row when it differs from the stored one, noting it in `changes`."""
    if row["usage_source"] == "unknown":  # no usage arrived: nothing to price
        return None
    usage = Usage(**{name: row[name] for name in _USAGE})
    tier = row["service_tier"]
    context: dict[str, Any] = {"batch": True} if tier == "batch" else {"service_tier": tier}
    cost = pricer.price(row["provider"], row["model"], usage, at=row["occurred_at"], **context)
    if (cost.nanousd, cost.status, cost.source) == (
        row["cost_nanousd"],
        row["pricing_status"],
        row["price_source"],
    ):
        return None
    change = changes.setdefault((row["provider"], row["model"]), ModelChange(row["provider"], row["model"]))
    change.calls += 1
    change.before_nanousd += row["cost_nanousd"] or 0
    change.after_nanousd += cost.nanousd or 0
    change.unknown_before += row["cost_nanousd"] is None
    change.unknown_after += cost.nanousd is None
    return {
        "row_id": row["id"],
        "occurred_at": row["occurred_at"],
        "tags": row["tags"] or {},
        "new_cost": cost.nanousd,
        "new_status": cost.status,
        "new_source": cost.source,
        "delta": (cost.nanousd or 0) - (row["cost_nanousd"] or 0),
        "unknown_delta": int(cost.nanousd is None) - int(row["cost_nanousd"] is None),
    }


@dataclass(frozen=True, slots=True)
class _Windows:
    """The rollup windows that exist: global starts per period, and the per-tag window keys."""

    starts: dict[str, list[datetime]]
    scoped: set[tuple[str, datetime, str, str]]


async def _apply(conn: AsyncConnection, updates: list[dict[str, Any]], windows: _Windows) -> None:
    """Update the rows and move their windows' rollups by the difference, in the caller's transaction."""
    await conn.execute(
        update(calls)
        .where(calls.c.id == bindparam("row_id"))
        .values(
            cost_nanousd=bindparam("new_cost"),
            pricing_status=bindparam("new_status"),
            price_source=bindparam("new_source"),
        ),
        updates,
    )
    deltas: dict[tuple[str, datetime, str, str], list[int]] = {}
    for u in updates:
        for period, known in windows.starts.items():
            at = bisect.bisect_right(known, u["occurred_at"]) - 1
            if at < 0:
                continue
            start = known[at]
            keys = [(period, start, "", "")] + [
                (period, start, k, str(v))
                for k, v in u["tags"].items()
                if (period, start, k, str(v)) in windows.scoped
            ]
            for key in keys:
                d = deltas.setdefault(key, [0, 0])
                d[0] += u["delta"]
                d[1] += u["unknown_delta"]
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
            {
                "k_period": k[0],
                "k_start": k[1],
                "k_scope": k[2],
                "k_value": k[3],
                "d_spent": d[0],
                "d_unknown": d[1],
            }
            for k, d in sorted(deltas.items())
        ],
    )


async def _window_starts(conn: AsyncConnection, period: str) -> list[datetime]:
    query = select(rollups.c.window_start).where(rollups.c.period == period, rollups.c.scope_key == "")
    return sorted((await conn.execute(query)).scalars().all())


async def _scoped_windows(conn: AsyncConnection) -> set[tuple[str, datetime, str, str]]:
    query = select(
        rollups.c.period, rollups.c.window_start, rollups.c.scope_key, rollups.c.scope_value
    ).where(rollups.c.scope_key != "")
    return {(r[0], r[1], r[2], r[3]) for r in (await conn.execute(query)).all()}
