"""Database identity: a random id a spool file records, so it is never replayed into another database.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    meta = op.create_table(
        "llm_spend_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(300), nullable=False),
    )
    op.bulk_insert(meta, [{"key": "database_id", "value": str(uuid.uuid4())}])


def downgrade() -> None:
    op.drop_table("llm_spend_meta")
