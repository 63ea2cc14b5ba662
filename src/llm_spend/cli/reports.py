"""`llm-spend report`: cost, calls and tokens grouped by day, month, model, provider or tags."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from ..money import format_usd
from ..reports import ReportRow, current_windows, report
from ..storage.store import Store

_FORMULA = ("=", "+", "-", "@", "\t", "\r")
_SUMS = ("cost_usd", "calls", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
         "reasoning_tokens", "unknown_cost_calls")  # fmt: skip


def register(commands: Any, add_url: Callable[[argparse.ArgumentParser], None]) -> None:
    cmd = commands.add_parser("report", help="cost, calls and tokens by day, month, model, provider or tag")
    add_url(cmd)
    cmd.add_argument("--days", type=int, default=30, help="the last N days (default 30)")
    cmd.add_argument("--by", action="append", default=[], help="day, month, model, provider or a tag key")
    cmd.add_argument(
        "--where", action="append", default=[], metavar="KEY=VALUE", help="model=, provider= or tag"
    )
    cmd.add_argument("--format", choices=("table", "csv", "json"), default="table")
    cmd.add_argument("--timezone", default="UTC", help="days and months in this IANA zone (the tracker's)")
    cmd.set_defaults(handler=_report)
    budgets = commands.add_parser(
        "budgets", help="today's and this month's spend per window (global and per tag)"
    )
    add_url(budgets)
    budgets.add_argument(
        "--timezone", default="UTC", help="the tracker's IANA zone (its day and month windows)"
    )
    budgets.add_argument("--top", type=int, default=20, help="per-tag windows shown per tag key")
    budgets.set_defaults(handler=_budgets)


def safe_cell(value: str) -> str:
    """A CSV cell a spreadsheet will not run as a formula (OWASP: prefix a quote)."""
    return "'" + value if value.startswith(_FORMULA) else value


def _where(pairs: Sequence[str]) -> dict[str, str]:
    where = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--where {pair!r} must be KEY=VALUE")
        where[key] = value
    return where


async def _report(args: argparse.Namespace) -> int:
    if args.days < 1:
        raise ValueError(f"--days must be at least 1, got {args.days}")
    end = datetime.now(UTC)
    store = Store(args.url)
    try:
        rows = await report(
            store, ZoneInfo(args.timezone), start=end - timedelta(days=args.days), end=end,
            group_by=args.by, where=_where(args.where),
        )  # fmt: skip
    finally:
        await store.close()
    table = [[*(v if v is not None else "(none)" for v in row.key), *_sums(row)] for row in rows]
    header = [*args.by, *_SUMS]
    if args.format == "json":
        print(json.dumps([dict(zip(header, line, strict=True)) for line in table], indent=2))
    elif args.format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(header)
        writer.writerows([safe_cell(str(cell)) for cell in line] for line in table)
    else:
        _print_table(header, table)
    return 0


def _sums(row: ReportRow) -> list[Any]:
    return [format_usd(row.cost), row.calls, row.input_tokens, row.output_tokens, row.cache_read_tokens,
            row.cache_write_tokens, row.reasoning_tokens, row.unknown_cost_calls]  # fmt: skip


def _print_table(header: list[str], table: list[list[Any]], keys: int | None = None) -> None:
    """Left-aligned key columns, right-aligned numbers, a rule under the header."""
    cells = [[str(c) for c in line] for line in [header, *table]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    keys = len(header) - len(_SUMS) if keys is None else keys
    for n, line in enumerate(cells):
        print(
            "  ".join(
                c.ljust(w) if i < keys else c.rjust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            )
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))


async def _budgets(args: argparse.Namespace) -> int:
    """The rollup windows in force now. Limits live in the app's Tracker configuration, not in the
    database, so this shows what each window has spent and holds; `tracker.budget_status()` adds limits."""
    store = Store(args.url)
    try:
        windows = await current_windows(store, ZoneInfo(args.timezone), now=datetime.now(UTC), top=args.top)
    finally:
        await store.close()
    if not windows:
        print("nothing recorded in the current day or month windows")
        return 0
    header = ["period", "window", "scope", "spent_usd", "reserved_usd", "calls"]
    table = [
        [w.period, w.window_start.astimezone(ZoneInfo(args.timezone)).date().isoformat(),
         "all" if not w.scope_key else f"{w.scope_key}={w.scope_value}", format_usd(w.spent),
         format_usd(w.reserved), w.calls]
        for w in windows
    ]  # fmt: skip
    _print_table(header, table, keys=3)
    return 0
