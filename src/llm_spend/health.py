"""Health: what `tracker.health()` and `llm-spend doctor` report."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from .budgets import describe
from .storage.store import HEAD_REVISION, Store, driver_error

if TYPE_CHECKING:
    from .tracker import Tracker

__all__ = ["BudgetHealth", "Health", "check_health"]


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
        """Everything is recorded and enforced: database up, schema current, nothing waiting, and
        nothing lost since this process started (`spool_dropped`: calls a full or failing spool could
        not keep, logged as LOST)."""
        return (
            self.database_ok
            and self.schema_current
            and not self.outage
            and self.spool_files == 0
            and self.spool_dropped == 0
        )

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


async def check_health(
    tracker: Tracker, *, database_timeout: float = 5.0, store: Store | None = None
) -> Health:
    """What `Tracker.health()` reports. The database checks together take at most `database_timeout`
    seconds: a server that accepts connections but never answers is reported as timed out, not waited
    on for the driver's minute. (Not named `timeout`: it bounds the database checks, not the call.)
    `store`: the database to check, when not the tracker's own (a tracker not open reads on its own)."""
    timeout = database_timeout
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"database_timeout must be a positive number of seconds, got {timeout!r}")
    files, size = await asyncio.to_thread(tracker.spool.backlog)
    outage = tracker.outage
    revision: str | None = None
    held: int | None = None
    unknown: int | None = None
    error: str | None = None
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            revision, held, unknown = await _database(tracker.store if store is None else store)
    except Exception as exc:
        expired = isinstance(exc, TimeoutError) and deadline.expired()
        cause, first = driver_error(exc)
        error = f"timed out after {timeout:g} s" if expired else f"{type(cause).__name__}: {first}"
    current = revision == HEAD_REVISION
    budgets = []
    for rule in tracker.budget_guard.rules:
        reason = None
        if error is not None:
            reason = "the database is unreachable"
        elif revision is None:
            reason = "the database has no llm-spend schema yet: run `llm-spend db upgrade`"
        elif not current:
            reason = f"schema revision {revision} is not {HEAD_REVISION}: run `llm-spend db upgrade`"
        elif outage:
            reason = "the database failed and calls are spooled: windows are not counted until replay"
        budgets.append(BudgetHealth(describe(rule.budget), rule.mode, reason is None, reason))
    return Health(
        database_ok=error is None,
        database_error=error,
        schema_revision=revision,
        schema_current=current,
        outage=outage,
        spool_path=str(tracker.spool.path),
        spool_files=files,
        spool_bytes=size,
        spool_dropped=tracker.spool.dropped,
        pending_reservations=held,
        unknown_model_calls_last_day=unknown,
        budgets=tuple(budgets),
    )


async def _database(store: Store) -> tuple[str | None, int | None, int | None]:
    """(schema revision, reservations outstanding, unknown-model calls in the last day). The counts
    need the current schema's tables: a database never migrated (or migrated by an older version) is
    reachable, and reported as such, with no counts."""
    revision = await store.revision()
    if revision != HEAD_REVISION:
        return revision, None, None
    held, unknown = await store.counts(datetime.now(UTC) - timedelta(days=1))
    return revision, held, unknown
