"""The rows of the ledger in Python: window keys, pending writes, the rollup arithmetic, and the
future a reservation answers with.

Shared by both write paths (SQLAlchemy, and the one-hop SQLite-file path), so they agree exactly.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from ..usage import CallRecord
from .schema import calls

__all__ = [
    "CALL_COLUMNS",
    "SUMS",
    "WINDOW_COLUMNS",
    "Outcome",
    "PendingWrite",
    "Refusal",
    "WindowKey",
    "call_row",
    "rollup_deltas",
    "spent_after",
    "sqlite_call_rows",
    "text_time",
    "window_json",
]

TOKEN_COLUMNS = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)
SUMS = ("spent_nanousd", "reserved_nanousd", "calls", "unknown_cost_calls", *TOKEN_COLUMNS)
CALL_COLUMNS = tuple(column.name for column in calls.columns if column.name != "id")
WINDOW_COLUMNS = "period, window_start, scope_key, scope_value"
"""A rollup row's key columns, in the order of `WindowKey`, as SQL."""


class WindowKey(NamedTuple):
    """The key of one rollup row: a calendar window of one scope value ("" and "" when global)."""

    period: str
    start: datetime
    scope_key: str
    scope_value: str


class PendingWrite(NamedTuple):
    """A call to record: its ledger row, the rollup windows it counts in, and what it releases."""

    record: CallRecord
    windows: tuple[WindowKey, ...]
    reservation_id: str | None = None
    release: tuple[tuple[WindowKey, int], ...] = ()
    hold_until: datetime | None = None
    """Instead of settling `reservation_id`, keep it, and its money reserved in its windows, until
    then (the end of its windows): a billed call whose cost is unknown, at most what it reserved."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """A window that refused a reservation, with its totals (nano-USD) before the attempt."""

    key: WindowKey
    spent: int
    reserved: int


class Outcome(asyncio.Future["Refusal | None"]):
    """The answer of a reservation under way, which cancelling the task that awaits it does not
    cancel: the task is woken with CancelledError once the statement ended, and reads from here
    whether it holds money to give back. `asyncio.shield` would do the same with a second future
    and a loop turn more per reservation. `drop` cancels it (when nothing will answer)."""

    def cancel(self, msg: Any = None) -> bool:
        return False

    def drop(self) -> None:
        asyncio.Future.cancel(self)


def text_time(value: datetime) -> str:
    """An aware datetime as SQLAlchemy stores it in SQLite (naive UTC text, microseconds)."""
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat(" ", "microseconds")


def sqlite_call_rows(batch: Sequence[PendingWrite]) -> list[tuple[Any, ...]]:
    """Ledger rows as SQLite stores them through SQLAlchemy (UTC text datetimes, JSON text tags).

    Calls made in one scope share its tags mapping (it is never mutated), so consecutive rows with
    the same mapping share its JSON too.
    """
    rows = []
    tags: object = None
    tags_json = ""
    for item in batch:
        record, usage = item.record, item.record.usage
        if record.tags is not tags:
            tags, tags_json = record.tags, json.dumps(dict(record.tags))
        rows.append((
            record.event_id, text_time(record.occurred_at), record.provider, record.model,
            usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.cache_write_tokens,
            usage.cache_write_1h_tokens, usage.reasoning_tokens, record.cost_nanousd, record.pricing_status,
            record.price_source, record.usage_source, int(record.stream), record.latency_ms,
            record.service_tier, record.provider_response_id, record.request_id, tags_json,
        ))  # fmt: skip
    return rows


def call_row(record: CallRecord) -> dict[str, Any]:
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


def rollup_deltas(
    batch: Sequence[PendingWrite], inserted: set[str], settled: set[str]
) -> dict[WindowKey, dict[str, int]]:
    deltas: dict[WindowKey, dict[str, int]] = {}
    counted: set[str] = set()
    released: set[str] = set()
    for item in batch:
        record, usage = item.record, item.record.usage
        if item.reservation_id in settled and item.reservation_id not in released:
            released.add(item.reservation_id)  # a call in the batch twice (a spool replay) gives it back once
            for key, amount in item.release:
                deltas.setdefault(key, dict.fromkeys(SUMS, 0))["reserved_nanousd"] -= amount
        if record.event_id not in inserted or record.event_id in counted:
            continue
        counted.add(record.event_id)
        for key in item.windows:
            d = deltas.get(key)
            if d is None:
                d = deltas[key] = dict.fromkeys(SUMS, 0)
            d["spent_nanousd"] += record.cost_nanousd or 0
            d["calls"] += 1
            d["unknown_cost_calls"] += record.cost_nanousd is None
            d["input_tokens"] += usage.input_tokens
            d["output_tokens"] += usage.output_tokens
            d["cache_read_tokens"] += usage.cache_read_tokens
            d["cache_write_tokens"] += usage.cache_write_tokens
            d["reasoning_tokens"] += usage.reasoning_tokens
    return deltas


def spent_after(
    batch: Sequence[PendingWrite], inserted: set[str], totals: dict[WindowKey, int]
) -> list[dict[WindowKey, int] | None]:
    """Replay the batch in order from each window's total before it, giving each item's view.

    `totals`: each window's spent right after the batch (a window left out is left out of the views:
    its total is below what any budget judges). A call counts once (its first copy in the batch, and
    only if `inserted`), as `rollup_deltas` counts it."""
    running = dict(totals)
    seen: set[str] = set()
    for item in batch:  # back to the totals before the batch
        event_id = item.record.event_id
        if event_id in inserted and event_id not in seen:
            seen.add(event_id)
            cost = item.record.cost_nanousd or 0
            for key in item.windows:
                if key in running:
                    running[key] -= cost
    results: list[dict[WindowKey, int] | None] = []
    seen.clear()
    for item in batch:
        event_id = item.record.event_id
        if event_id not in inserted or event_id in seen:  # a second copy in one batch is a duplicate
            results.append(None)
            continue
        seen.add(event_id)
        cost = item.record.cost_nanousd or 0
        view = {}
        for key in item.windows:
            if key in running:
                running[key] += cost
                view[key] = running[key]
        results.append(view)
    return results


def window_json(key: WindowKey) -> list[str]:
    """A window as a reservation row stores it (JSON), on every backend."""
    return [key.period, key.start.isoformat(), key.scope_key, key.scope_value]
