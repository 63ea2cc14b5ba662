"""Alembic migrations of the llm-spend schema (shipped inside the package, so installs can migrate)."""
