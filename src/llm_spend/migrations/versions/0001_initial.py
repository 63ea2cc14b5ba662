"""Initial schema: ledger, rollups, reservations.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from llm_spend.storage.schema import RowId, UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Tags = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "llm_calls",
        sa.Column("id", RowId, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(64), nullable=False, unique=True),
        sa.Column("occurred_at", UTCDateTime(), nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        *(
            sa.Column(name, sa.BigInteger, nullable=False, server_default="0")
            for name in (
                "input_tokens",
                "output_tokens",
                "cache_read_tokens",
                "cache_write_tokens",
                "cache_write_1h_tokens",
                "reasoning_tokens",
            )
        ),
        sa.Column("cost_nanousd", sa.BigInteger, nullable=True),
        sa.Column("pricing_status", sa.String(32), nullable=False),
        sa.Column("price_source", sa.String(300), nullable=True),
        sa.Column("usage_source", sa.String(32), nullable=False),
        sa.Column("stream", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("latency_ms", sa.Integer, nullable=True),
        sa.Column("service_tier", sa.String(64), nullable=True),
        sa.Column("provider_response_id", sa.String(200), nullable=True),
        sa.Column("request_id", sa.String(200), nullable=True),
        sa.Column("tags", Tags, nullable=False),
    )
    op.create_index("ix_llm_calls_occurred_at", "llm_calls", ["occurred_at"])
    op.create_index("ix_llm_calls_model_occurred_at", "llm_calls", ["model", "occurred_at"])
    op.create_index("ix_llm_calls_provider_occurred_at", "llm_calls", ["provider", "occurred_at"])
    if op.get_context().dialect.name == "postgresql":
        op.create_index("ix_llm_calls_tags_gin", "llm_calls", ["tags"], postgresql_using="gin")

    op.create_table(
        "llm_spend_rollups",
        sa.Column("period", sa.String(8), primary_key=True),
        sa.Column("window_start", UTCDateTime(), primary_key=True),
        sa.Column("scope_key", sa.String(64), primary_key=True),
        sa.Column("scope_value", sa.String(300), primary_key=True),
        *(
            sa.Column(name, sa.BigInteger, nullable=False, server_default="0")
            for name in (
                "spent_nanousd",
                "reserved_nanousd",
                "calls",
                "unknown_cost_calls",
                "input_tokens",
                "output_tokens",
                "cache_read_tokens",
                "cache_write_tokens",
                "reasoning_tokens",
            )
        ),
    )

    op.create_table(
        "llm_spend_reservations",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("amount_nanousd", sa.BigInteger, nullable=False),
        sa.Column("windows", sa.JSON, nullable=False),
    )
    op.create_index("ix_llm_spend_reservations_expires_at", "llm_spend_reservations", ["expires_at"])


def downgrade() -> None:
    op.drop_table("llm_spend_reservations")
    op.drop_table("llm_spend_rollups")
    op.drop_table("llm_calls")
