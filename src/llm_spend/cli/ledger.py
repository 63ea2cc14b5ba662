"""`llm-spend export` (stream ledger rows as CSV or JSON lines) and `llm-spend prune` (drop old rows)."""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import delete, func, select

from ..money import format_usd, from_nanousd
from ..storage.schema import calls
from .db import ledger
from .reports import safe_cell

_COLUMNS = [c.name for c in calls.columns if c.name != "id"]
_PRUNE_BATCH = 5_000
_MAX_AGE_DAYS = 36_500  # 100 years: a cutoff far older than that is before year 1, an OverflowError


def register(commands: Any, add_url: Callable[[argparse.ArgumentParser], None]) -> None:
    export = commands.add_parser("export", help="stream ledger rows as CSV or JSON lines (constant memory)")
    add_url(export)
    export.add_argument("--since", type=_day, required=True, help="YYYY-MM-DD (UTC)")
    export.add_argument("--until", type=_day, help="YYYY-MM-DD (UTC, exclusive; default: now)")
    export.add_argument("--format", choices=("csv", "jsonl"), default="csv")
    export.set_defaults(handler=_export)
    prune = commands.add_parser("prune", help="delete ledger rows older than an age; rollups keep totals")
    add_url(prune)
    prune.add_argument("--older-than", type=_age, required=True, metavar="AGE", help="e.g. 90d, 12w")
    prune.set_defaults(handler=_prune)


def _day(text: str) -> datetime:
    try:
        return datetime.combine(date.fromisoformat(text), time(), tzinfo=UTC)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _age(text: str) -> timedelta:
    found = re.fullmatch(r"(\d+)([dw])", text.strip())
    if found is None or int(found.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"not an age such as 90d or 12w: {text!r}")
    days = int(found.group(1)) * (7 if found.group(2) == "w" else 1)
    if days > _MAX_AGE_DAYS:
        raise argparse.ArgumentTypeError(f"must be at most {_MAX_AGE_DAYS}d (100 years), got {text!r}")
    return timedelta(days=days)


def until(args: argparse.Namespace) -> datetime:
    """The end of the range --since..--until: --until (exclusive), after --since; else now."""
    if args.until is not None and args.until <= args.since:
        raise ValueError(f"--until {args.until:%Y-%m-%d} must be after --since {args.since:%Y-%m-%d}")
    end = args.until or datetime.now(UTC)
    if end <= args.since:  # --until left to its default, now
        raise ValueError(f"--since {args.since:%Y-%m-%d} is after now: give a past day, or --until")
    return end


def _cells(row: Any) -> dict[str, Any]:
    cells = {name: row[name] for name in _COLUMNS}
    cells["occurred_at"] = row["occurred_at"].isoformat()
    cost = row["cost_nanousd"]
    cells["cost_usd"] = None if cost is None else format_usd(from_nanousd(cost))
    return cells


async def _export(args: argparse.Namespace) -> int:
    query = (
        select(calls)
        .where(calls.c.occurred_at >= args.since, calls.c.occurred_at < until(args))
        .order_by(calls.c.occurred_at, calls.c.id)
        .execution_options(yield_per=1_000)
    )
    progress = sys.stderr.isatty()
    count = 0
    async with ledger(args.url) as store, store.engine.connect() as conn:
        writer = csv.writer(sys.stdout) if args.format == "csv" else None
        if writer is not None:
            writer.writerow([*_COLUMNS, "cost_usd"])
        result = await conn.stream(query)
        async for row in result.mappings():
            cells = _cells(row)
            if writer is not None:
                tags = json.dumps(cells["tags"], separators=(",", ":"))
                line = [*(cells[c] for c in _COLUMNS[:-1]), tags, cells["cost_usd"]]
                writer.writerow(["" if v is None else safe_cell(str(v)) for v in line])
            else:
                sys.stdout.write(json.dumps(cells, separators=(",", ":")) + "\n")
            count += 1
            if progress and count % 10_000 == 0:
                print(f"\r{count:,} rows", end="", file=sys.stderr, flush=True)
    if progress:
        print(f"\r{count:,} rows exported", file=sys.stderr)
    return 0


async def _prune(args: argparse.Namespace) -> int:
    """Delete ledger rows in batches of 5,000 (short transactions). Rollups keep their totals."""
    cutoff = datetime.now(UTC) - args.older_than
    deleted = 0
    async with ledger(args.url) as store:
        while True:
            async with store.transaction() as conn:  # BEGIN IMMEDIATE on SQLite
                ids = (
                    select(calls.c.id)
                    .where(calls.c.occurred_at < cutoff)
                    .limit(_PRUNE_BATCH)
                    .scalar_subquery()
                )
                gone = (await conn.execute(delete(calls).where(calls.c.id.in_(ids)))).rowcount
            deleted += gone
            if gone < _PRUNE_BATCH:
                break
        async with store.engine.connect() as conn:
            left = (await conn.execute(select(func.count()).select_from(calls))).scalar_one()
    print(f"deleted {deleted:,} ledger rows older than {cutoff:%Y-%m-%d %H:%M} UTC; {left:,} remain")
    print("rollups keep their totals: budgets and day/month reports still count the deleted calls")
    return 0
