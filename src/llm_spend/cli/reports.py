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

from ..budgets import Budget, resolve_rules, window_bounds
from ..money import format_usd
from ..reports import (
    MAX_TOP,
    ReportRow,
    budget_status,
    check_where,
    current_windows,
    group_keys,
    report,
    safe_cell,
)
from .db import ledger

__all__ = ["positive_int", "register", "safe_cell"]

_SUMS = ("cost_usd", "calls", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
         "reasoning_tokens", "unknown_cost_calls")  # fmt: skip
_MAX_DAYS_BY_DAY = 2_000  # the most day rows a report has


def register(commands: Any, add_url: Callable[[argparse.ArgumentParser], None]) -> None:
    cmd = commands.add_parser("report", help="cost, calls and tokens by day, month, model, provider or tag")
    add_url(cmd)
    cmd.add_argument("--days", type=int, default=30, help="today and the N-1 days before (default 30)")
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
    budgets.add_argument(
        "--top", type=positive_int, default=20, metavar="N", help="per-tag windows shown per key (default 20)"
    )
    budgets.add_argument("--daily", metavar="USD", help="a global daily limit: show spend against it")
    budgets.add_argument("--monthly", metavar="USD", help="a global monthly limit: show spend against it")
    budgets.set_defaults(handler=_budgets)


def positive_int(text: str) -> int:
    """An argparse type: a whole number from 1 to 1,000,000 (a database integer holds no more than
    2**63 - 1: a larger one was an OverflowError)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_TOP:
        raise argparse.ArgumentTypeError(f"must be a positive whole number up to {MAX_TOP}, got {text!r}")
    return value


def _where(pairs: Sequence[str]) -> dict[str, str]:
    where = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--where {pair!r} must be KEY=VALUE")
        if key in where:  # all must match: two values of one key match nothing
            raise ValueError(f"--where names {key!r} twice")
        where[key] = value
    check_where(where, "--where")
    return where


async def _report(args: argparse.Namespace) -> int:
    if not 1 <= args.days <= 3660:
        raise ValueError(f"--days must be from 1 to 3660, got {args.days}")
    if "day" in args.by and args.days > _MAX_DAYS_BY_DAY:
        raise ValueError(f"--days must be from 1 to {_MAX_DAYS_BY_DAY} with --by day, got {args.days}")
    group_by, where = group_keys(args.by, "--by"), _where(args.where)
    tz = _zone(args.timezone)
    today_start, end = window_bounds("day", datetime.now(UTC), tz)
    noon = today_start + timedelta(hours=12) - timedelta(days=args.days - 1)  # DST-proof: any hour that day
    start = window_bounds("day", noon, tz)[0]
    async with ledger(args.url) as store:
        rows = await report(store, tz, start=start, end=end, group_by=group_by, where=where)
    if args.format == "json":  # a missing tag is null here, "(none)" in a table or CSV
        print(json.dumps([{"group": row.group, **dict(zip(_SUMS, _sums(row), strict=True))} for row in rows],
                         indent=2))  # fmt: skip
        return 0
    header = [*_group_columns(args.by), *_SUMS]
    table = [[*(v if v is not None else "(none)" for v in row.key), *_sums(row)] for row in rows]
    if args.format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(header)
        writer.writerows([safe_cell(str(cell)) for cell in line] for line in table)
    else:
        _print_table(header, table)
    return 0


def _group_columns(keys: Sequence[str]) -> list[str]:
    """Column names of the group keys: the key itself, or `group.KEY` when a tag key is also the name
    of a column (`--by calls`), so that no two columns share a name."""
    taken = set(_SUMS)
    names = []
    for key in keys:
        name = key
        while name in taken:
            name = f"group.{name}"
        taken.add(name)
        names.append(name)
    return names


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


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ValueError, KeyError):
        raise ValueError(f"--timezone must be an IANA time zone such as Europe/Paris, got {name!r}") from None


async def _budgets(args: argparse.Namespace) -> int:
    """The rollup windows in force now. Limits live in the app's Tracker configuration, not in the
    database, so this shows what each window has spent and holds; with --daily / --monthly it shows
    those global limits' status instead (what `tracker.budget_status()` gives in code)."""
    tz = _zone(args.timezone)
    if args.daily is not None or args.monthly is not None:
        return await _limits(args, tz)
    async with ledger(args.url) as store:
        windows = await current_windows(store, tz, now=datetime.now(UTC), top=args.top)
    if not windows:  # windows start at the tracker's midnight: another zone's are other rows
        print(
            f"nothing recorded in the current day or month windows of {tz.key}"
            + ("" if args.timezone != "UTC" else " (give --timezone if the tracker's zone is another)")
        )
        return 0
    header = ["period", "window", "scope", "spent_usd", "reserved_usd", "calls"]
    table = [
        [w.period, w.window_start.astimezone(tz).date().isoformat(),
         "all" if not w.scope_key else f"{w.scope_key}={w.scope_value}", format_usd(w.spent),
         format_usd(w.reserved), w.calls]
        for w in windows
    ]  # fmt: skip
    _print_table(header, table, keys=3)
    return 0


async def _limits(args: argparse.Namespace, tz: ZoneInfo) -> int:
    budgets = []
    for flag, limit, budget in (
        ("--daily", args.daily, Budget.daily),
        ("--monthly", args.monthly, Budget.monthly),
    ):
        try:
            budgets += [budget(limit)] if limit is not None else []
        except ValueError as exc:  # it names the argument (limit): name the option too
            raise ValueError(f"{flag}: {exc}") from None
    async with ledger(args.url) as store:
        statuses = await budget_status(
            store, resolve_rules(budgets, "notify"), lambda period, at: window_bounds(period, at, tz),
            now=datetime.now(UTC),
        )  # fmt: skip
    header = ["budget", "window", "spent_usd", "reserved_usd", "remaining_usd", "percent", "projected_usd"]
    table = [
        [s.description, s.window_start.astimezone(tz).date().isoformat(), format_usd(s.spent),
         format_usd(s.reserved), format_usd(s.remaining), f"{s.percent}%", format_usd(s.projected)]
        for s in statuses
    ]  # fmt: skip
    _print_table(header, table, keys=2)
    return 0
