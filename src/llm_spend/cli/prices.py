"""`llm-spend prices explain|check` and `llm-spend reprice`."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from ..exceptions import PricesFileError
from ..money import format_usd, from_nanousd
from ..pricing import Pricer
from ..storage.repricing import reprice, unpriced_models
from ..usage import Usage
from .db import ledger
from .ledger import until


def register(commands: Any, add_url: Callable[[argparse.ArgumentParser], None]) -> None:
    prices = commands.add_parser("prices", help="how calls are priced, and which models are not")
    sub = prices.add_subparsers(dest="prices_command", required=True)
    explain = sub.add_parser("explain", help="the layer, the matched model, the rates and the cost of a call")
    explain.add_argument("--provider", type=_name, required=True)
    explain.add_argument("--model", type=_name, required=True)
    for name in ("input", "output", "cache-read", "cache-write", "cache-write-1h", "reasoning"):
        explain.add_argument(f"--{name}", type=int, default=0, metavar="TOKENS")
    explain.add_argument("--service-tier")
    explain.add_argument("--batch", action="store_true")
    explain.add_argument("--prices-file")
    explain.add_argument("--at", type=_day, help="the call's date (default: now)")
    explain.set_defaults(handler=_explain)
    check = sub.add_parser("check", help="models in the ledger without a price, or priced by a fallback")
    add_url(check)
    check.add_argument("--days", type=int, default=7, help="the last N days, 1 to 3660 (default 7)")
    check.set_defaults(handler=_check)
    again = commands.add_parser(
        "reprice", help="recompute costs of recorded calls, and the rollups with them"
    )
    add_url(again)
    again.add_argument("--since", type=_day, required=True, help="YYYY-MM-DD (UTC)")
    again.add_argument("--until", type=_day, help="YYYY-MM-DD (UTC, exclusive; default: now)")
    again.add_argument("--prices-file", help="the prices file your Tracker uses (prices_file=)")
    again.add_argument(
        "--fallback-price",
        type=_rates,
        metavar="INPUT,OUTPUT",
        help="the fallback_price your Tracker uses: USD per 1M input and output tokens",
    )
    again.add_argument("--dry-run", action="store_true", help="print the differences, change nothing")
    again.set_defaults(handler=_reprice)


def _day(text: str) -> datetime:
    try:
        return datetime.combine(date.fromisoformat(text), time(), tzinfo=UTC)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _rates(text: str) -> dict[str, str]:
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != 2 or not all(parts):
        raise argparse.ArgumentTypeError(f"not INPUT,OUTPUT (USD per 1M tokens): {text!r}")
    return {"input": parts[0], "output": parts[1]}


def _pricer(args: argparse.Namespace) -> Pricer:
    """The Pricer of --prices-file and --fallback-price; a bad one is one line naming the option."""
    try:
        return Pricer(prices_file=args.prices_file, fallback_price=getattr(args, "fallback_price", None))
    except PricesFileError as exc:
        if exc.origin == "fallback_price":
            raise ValueError(f"--fallback-price: {exc.problem}") from None
        raise ValueError(f"--prices-file {exc}") from None


def _explain(args: argparse.Namespace) -> int:
    try:
        usage = Usage(
            input_tokens=args.input,
            output_tokens=args.output,
            cache_read_tokens=args.cache_read,
            cache_write_tokens=args.cache_write,
            cache_write_1h_tokens=args.cache_write_1h,
            reasoning_tokens=args.reasoning,
        )
    except ValueError as exc:  # it names Usage's fields (cache_read_tokens): name the options instead
        flags = re.sub(r"\b(\w+)_tokens\b", lambda m: f"--{m[1].replace('_', '-')}", str(exc))
        raise ValueError(flags) from None
    if args.batch and args.service_tier not in (None, "batch"):  # as track(batch=True) refuses it
        raise ValueError(f"--batch contradicts --service-tier {args.service_tier}")
    pricer = _pricer(args)
    at = args.at or datetime.now(UTC)
    found = pricer.explain(
        args.provider, args.model, usage, at=at, service_tier=args.service_tier, batch=args.batch
    )
    print(f"model:   {args.provider}/{args.model}")
    print(f"layer:   {found.source or 'none: no price is known'}")
    print(f"matched: {found.matched or '-'}")
    for bucket, rate in found.rates.items():
        print(f"  {bucket:<15} ${rate} per 1M tokens")
    amount = found.cost.amount
    print(f"cost:    {'unknown (' + found.cost.status + ')' if amount is None else '$' + format_usd(amount)}")
    return 0 if amount is not None else 1


async def _check(args: argparse.Namespace) -> int:
    if not 1 <= args.days <= 3660:
        raise ValueError(f"--days must be from 1 to 3660, got {args.days}")
    async with ledger(args.url) as store:
        found = await unpriced_models(store, datetime.now(UTC) - timedelta(days=args.days))
    if not found:
        print(f"every model of the last {args.days} days has a price")
        return 0
    print(f"{'provider':<14}{'model':<40}{'calls':>8}{'input tok':>12}{'output tok':>12}  priced by")
    for m in found:
        source = m.price_source or "nothing (cost unknown)"
        print(
            f"{m.provider:<14}{m.model:<40}{m.calls:>8}{m.input_tokens:>12,}{m.output_tokens:>12,}  {source}"
        )
    return 0


async def _reprice(args: argparse.Namespace) -> int:
    end = until(args)
    pricer = _pricer(args)
    async with ledger(args.url) as store:
        found = await reprice(store, pricer, since=args.since, until=end, dry_run=args.dry_run)
    changes = [c for c in found if c.calls]
    if not changes:
        print("no call's cost changes")
    else:
        print(f"{'provider':<14}{'model':<40}{'calls':>8}{'before USD':>14}{'after USD':>14}{'unknown':>10}")
        for c in changes:
            before, after = (
                format_usd(from_nanousd(c.before_nanousd)),
                format_usd(from_nanousd(c.after_nanousd)),
            )
            unknown = f"{c.unknown_before}->{c.unknown_after}"
            print(f"{c.provider:<14}{c.model:<40}{c.calls:>8}{before:>14}{after:>14}{unknown:>10}")
        print(f"{'would change' if args.dry_run else 'changed'} {sum(c.calls for c in changes)} calls")
    relabelled = sum(c.relabelled for c in found)
    if relabelled:
        verb = "would name" if args.dry_run else "named"
        print(f"{verb} the new price source of {relabelled} calls whose cost stays the same")
    kept = [c for c in found if c.kept]
    for c in kept:
        print(f"kept {c.kept} priced calls of {c.provider}/{c.model}: these prices have none for it")
    if kept:
        print("(pass the --prices-file and --fallback-price your Tracker uses to reprice them)")
    return 0
