"""Health: what `tracker.health()` and `llm-spend doctor` report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["BudgetHealth", "Health"]


@dataclass(frozen=True, slots=True)
class BudgetHealth:
    """One configured budget, and whether it is being enforced right now."""

    description: str
    mode: str
    active: bool
    reason: str | None = None
    """Why it is not active (None when it is)."""


@dataclass(frozen=True, slots=True)
class Health:
    """A snapshot of the tracker's state, for dashboards, probes and `llm-spend doctor`."""

    database_ok: bool
    database_error: str | None
    schema_revision: str | None
    schema_current: bool
    outage: bool
    """The writer is spooling because the database failed."""
    spool_path: str
    spool_files: int
    spool_bytes: int
    spool_dropped: int
    pending_reservations: int | None
    unknown_model_calls_last_day: int | None
    budgets: tuple[BudgetHealth, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """Everything is recorded and enforced: database up, schema current, nothing waiting."""
        return self.database_ok and self.schema_current and not self.outage and self.spool_files == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "database_ok": self.database_ok,
            "database_error": self.database_error,
            "schema_revision": self.schema_revision,
            "schema_current": self.schema_current,
            "outage": self.outage,
            "spool": {
                "path": self.spool_path,
                "files": self.spool_files,
                "bytes": self.spool_bytes,
                "dropped": self.spool_dropped,
            },
            "pending_reservations": self.pending_reservations,
            "unknown_model_calls_last_day": self.unknown_model_calls_last_day,
            "budgets": [
                {"budget": b.description, "mode": b.mode, "active": b.active, "reason": b.reason}
                for b in self.budgets
            ],
        }
