"""Store: the ledger database behind a small async interface (SQLAlchemy Core, async).

One method per operation. Every write is one transaction: ledger rows, rollup increments and
reservation settlements commit together, so the rollups always equal the ledger's sums. Increments
are single ``INSERT ... ON CONFLICT DO UPDATE SET x = x + excluded.x`` statements, never
read-then-write. Rows are touched in key order so concurrent writers on PostgreSQL cannot deadlock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from datetime import datetime
from typing import Any, NamedTuple

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, event, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from ..usage import CallRecord
from .schema import calls, rollups

__all__ = ["PendingWrite", "Store", "WindowKey"]

_MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
_TOKEN_COLUMNS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")
_SUMS = ("spent_nanousd", "reserved_nanousd", "calls", "unknown_cost_calls", *_TOKEN_COLUMNS)


class WindowKey(NamedTuple):
    """The key of one rollup row: a calendar window of one scope value ("" and "" when global)."""

    period: str
    start: datetime
    scope_key: str
    scope_value: str


@dataclass(frozen=True, slots=True)
class PendingWrite:
    """A call to record: its ledger row, the rollup windows it counts in, and what it releases."""

    record: CallRecord
    windows: tuple[WindowKey, ...]
    reservation_id: str | None = None
    release: tuple[tuple[WindowKey, int], ...] = ()


def _sqlite_setup(engine: AsyncEngine) -> None:
    """WAL, a busy timeout, and BEGIN IMMEDIATE for every transaction (no lock upgrades, no SQLITE_BUSY)."""

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        for pragma in ("journal_mode=WAL", "busy_timeout=30000", "synchronous=NORMAL", "foreign_keys=ON"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


class Store:
    """The ledger database: create with a SQLAlchemy async URL, `await close()` when done."""

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self.url = url
        self.dialect = parsed.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"url must be a SQLite or PostgreSQL SQLAlchemy async URL, got {parsed!r}")
        kwargs: dict[str, Any] = {}
        if self.dialect == "sqlite":
            kwargs["connect_args"] = {"timeout": 30}
            if parsed.database in (None, "", ":memory:"):
                kwargs["poolclass"] = StaticPool
        else:
            kwargs.update(pool_size=10, max_overflow=20, pool_pre_ping=True)
        self.engine = create_async_engine(url, **kwargs)
        if self.dialect == "sqlite":
            _sqlite_setup(self.engine)
        self._insert = sqlite.insert if self.dialect == "sqlite" else postgresql.insert

    async def close(self) -> None:
        await self.engine.dispose()

    # -- schema -------------------------------------------------------------------------------------

    async def migrate(self) -> None:
        """Bring the schema to the newest migration; safe to call again and from many processes."""
        async with self.engine.connect() as conn:
            await conn.run_sync(_upgrade)
            await conn.commit()

    async def revision(self) -> str | None:
        """The schema's current migration revision, or None before the first migration."""
        async with self.engine.connect() as conn:
            return await conn.run_sync(
                lambda sync: MigrationContext.configure(
                    sync, opts={"version_table": "llm_spend_alembic_version"}
                ).get_current_revision()
            )

    # -- recording ----------------------------------------------------------------------------------

    async def write(self, batch: Sequence[PendingWrite]) -> list[dict[WindowKey, int] | None]:
        """Record a batch in one transaction.

        Returns, per item, each window's spent nano-USD right after that item (items in batch
        order), or None for an item whose event_id was already recorded (nothing changed for it).
        """
        async with self.engine.begin() as conn:
            inserted = await self._insert_calls(conn, batch)
            fresh = [item for item in batch if item.record.event_id in inserted]
            deltas = _rollup_deltas(fresh)
            totals = await self._bump(conn, deltas) if deltas else {}
        return _spent_after(batch, inserted, deltas, totals)

    async def _insert_calls(self, conn: AsyncConnection, batch: Sequence[PendingWrite]) -> set[str]:
        stmt = (
            self._insert(calls)
            .on_conflict_do_nothing(index_elements=["event_id"])
            .returning(calls.c.event_id)
        )
        result = await conn.execute(stmt, [_call_row(item.record) for item in batch])
        return set(result.scalars().all())

    async def _bump(
        self, conn: AsyncConnection, deltas: dict[WindowKey, dict[str, int]]
    ) -> dict[WindowKey, int]:
        stmt = self._insert(rollups)
        stmt = stmt.on_conflict_do_update(
            index_elements=["period", "window_start", "scope_key", "scope_value"],
            set_={name: rollups.c[name] + stmt.excluded[name] for name in _SUMS},
        ).returning(
            rollups.c.period,
            rollups.c.window_start,
            rollups.c.scope_key,
            rollups.c.scope_value,
            rollups.c.spent_nanousd,
        )
        rows = [
            {"period": k.period, "window_start": k.start, "scope_key": k.scope_key, "scope_value": k.scope_value}
            | sums
            for k, sums in sorted(deltas.items())
        ]
        result = await conn.execute(stmt, rows)
        return {WindowKey(r[0], r[1], r[2], r[3]): r[4] for r in result.all()}

    # -- reading ------------------------------------------------------------------------------------

    async def window_spent(self, keys: Sequence[WindowKey]) -> dict[WindowKey, tuple[int, int]]:
        """(spent, reserved) nano-USD of the given windows that have a row."""
        found: dict[WindowKey, tuple[int, int]] = {}
        async with self.engine.connect() as conn:
            for key in keys:
                row = (
                    await conn.execute(
                        select(rollups.c.spent_nanousd, rollups.c.reserved_nanousd).where(
                            rollups.c.period == key.period,
                            rollups.c.window_start == key.start,
                            rollups.c.scope_key == key.scope_key,
                            rollups.c.scope_value == key.scope_value,
                        )
                    )
                ).first()
                if row is not None:
                    found[key] = (row[0], row[1])
        return found


def _upgrade(sync_conn: Connection) -> None:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.attributes["connection"] = sync_conn
    command.upgrade(config, "head")


def _call_row(record: CallRecord) -> dict[str, Any]:
    usage = record.usage
    return {
        "event_id": record.event_id,
        "occurred_at": record.occurred_at,
        "provider": record.provider,
        "model": record.model,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_read_tokens": usage.cache_read_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
        "cache_write_1h_tokens": usage.cache_write_1h_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "cost_nanousd": record.cost_nanousd,
        "pricing_status": record.pricing_status,
        "price_source": record.price_source,
        "usage_source": record.usage_source,
        "stream": record.stream,
        "latency_ms": record.latency_ms,
        "service_tier": record.service_tier,
        "provider_response_id": record.provider_response_id,
        "request_id": record.request_id,
        "tags": dict(record.tags),
    }


def _rollup_deltas(items: Sequence[PendingWrite]) -> dict[WindowKey, dict[str, int]]:
    deltas: dict[WindowKey, dict[str, int]] = {}
    for item in items:
        record, usage = item.record, item.record.usage
        for key in item.windows:
            d = deltas.get(key)
            if d is None:
                d = deltas[key] = dict.fromkeys(_SUMS, 0)
            d["spent_nanousd"] += record.cost_nanousd or 0
            d["calls"] += 1
            d["unknown_cost_calls"] += record.cost_nanousd is None
            d["input_tokens"] += usage.input_tokens
            d["output_tokens"] += usage.output_tokens
            d["cache_read_tokens"] += usage.cache_read_tokens
            d["cache_write_tokens"] += usage.cache_write_tokens
            d["reasoning_tokens"] += usage.reasoning_tokens
        for key, amount in item.release:
            d = deltas.get(key)
            if d is None:
                d = deltas[key] = dict.fromkeys(_SUMS, 0)
            d["reserved_nanousd"] -= amount
    return deltas


def _spent_after(
    batch: Sequence[PendingWrite],
    inserted: set[str],
    deltas: dict[WindowKey, dict[str, int]],
    totals: dict[WindowKey, int],
) -> list[dict[WindowKey, int] | None]:
    """Replay the batch in order from each window's total before it, giving each item's view."""
    running = {key: totals[key] - d["spent_nanousd"] for key, d in deltas.items() if key in totals}
    results: list[dict[WindowKey, int] | None] = []
    for item in batch:
        if item.record.event_id not in inserted:
            results.append(None)
            continue
        cost = item.record.cost_nanousd or 0
        seen = {}
        for key in item.windows:
            running[key] += cost
            seen[key] = running[key]
        results.append(seen)
    return results
