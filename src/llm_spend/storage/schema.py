"""The ledger's tables, as SQLAlchemy Core metadata. Alembic migrations create them.

Money columns are BIGINT nano-USD (1e-9 USD). Times are aware UTC datetimes (timestamptz on
PostgreSQL; ISO text normalized to UTC on SQLite). Tags are JSON (JSONB with a GIN index on
PostgreSQL).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    TypeDecorator,
)
from sqlalchemy.dialects.postgresql import JSONB

__all__ = ["calls", "meta", "metadata", "reservations", "rollups"]


class UTCDateTime(TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC datetimes out, on every backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: llm-spend stores aware UTC datetimes only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        result: datetime = value
        return result.replace(tzinfo=UTC) if result.tzinfo is None else result.astimezone(UTC)


Tags = JSON().with_variant(JSONB(), "postgresql")
RowId = BigInteger().with_variant(Integer(), "sqlite")  # INTEGER PRIMARY KEY is SQLite's rowid

metadata = MetaData()

calls = Table(
    "llm_calls",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("event_id", String(64), nullable=False, unique=True),
    Column("occurred_at", UTCDateTime(), nullable=False),
    Column("provider", String(64), nullable=False),
    Column("model", String(200), nullable=False),
    Column("input_tokens", BigInteger, nullable=False, default=0),
    Column("output_tokens", BigInteger, nullable=False, default=0),
    Column("cache_read_tokens", BigInteger, nullable=False, default=0),
    Column("cache_write_tokens", BigInteger, nullable=False, default=0),
    Column("cache_write_1h_tokens", BigInteger, nullable=False, default=0),
    Column("reasoning_tokens", BigInteger, nullable=False, default=0),
    Column("cost_nanousd", BigInteger, nullable=True),
    Column("pricing_status", String(32), nullable=False),
    Column("price_source", String(300), nullable=True),
    Column("usage_source", String(32), nullable=False),
    Column("stream", Boolean, nullable=False, default=False),
    Column("latency_ms", Integer, nullable=True),
    Column("service_tier", String(64), nullable=True),
    Column("provider_response_id", String(200), nullable=True),
    Column("request_id", String(200), nullable=True),
    Column("tags", Tags, nullable=False),
    Index("ix_llm_calls_occurred_at", "occurred_at"),
    Index("ix_llm_calls_model_occurred_at", "model", "occurred_at"),
    Index("ix_llm_calls_provider_occurred_at", "provider", "occurred_at"),
)

Index("ix_llm_calls_tags_gin", calls.c.tags, postgresql_using="gin").ddl_if(dialect="postgresql")

rollups = Table(
    "llm_spend_rollups",
    metadata,
    Column("period", String(8), primary_key=True),
    Column("window_start", UTCDateTime(), primary_key=True),
    Column("scope_key", String(64), primary_key=True),
    Column("scope_value", String(300), primary_key=True),
    Column("spent_nanousd", BigInteger, nullable=False, default=0),
    Column("reserved_nanousd", BigInteger, nullable=False, default=0),
    Column("calls", BigInteger, nullable=False, default=0),
    Column("unknown_cost_calls", BigInteger, nullable=False, default=0),
    Column("input_tokens", BigInteger, nullable=False, default=0),
    Column("output_tokens", BigInteger, nullable=False, default=0),
    Column("cache_read_tokens", BigInteger, nullable=False, default=0),
    Column("cache_write_tokens", BigInteger, nullable=False, default=0),
    Column("reasoning_tokens", BigInteger, nullable=False, default=0),
)

reservations = Table(
    "llm_spend_reservations",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("amount_nanousd", BigInteger, nullable=False),
    Column("windows", JSON, nullable=False),
    Index("ix_llm_spend_reservations_expires_at", "expires_at"),
)

meta = Table(
    "llm_spend_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(300), nullable=False),
)
