"""Alembic environment: runs on the connection llm-spend hands it (see storage/store.py)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from llm_spend.storage.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - llm-spend always passes its own connection
    raise RuntimeError("run llm-spend migrations through `llm-spend db upgrade` or Tracker.migrate()")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    version_table="llm_spend_alembic_version",
)
with context.begin_transaction():
    if connection.dialect.name == "postgresql":
        # Processes starting together take turns; the loser sees the schema already current.
        connection.execute(text("SELECT pg_advisory_xact_lock(7140815313)"))
    context.run_migrations()
