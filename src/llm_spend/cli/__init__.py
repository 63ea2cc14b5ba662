"""The `llm-spend` command. Each module of this package adds one family of subcommands."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import sys
from collections.abc import Sequence

from . import db, doctor, ledger, prices, reports

__all__ = ["main"]

DEFAULT_URL = "sqlite+aiosqlite:///llm_spend.db"
FAMILIES = (db, doctor, prices, reports, ledger)


def add_url(parser: argparse.ArgumentParser) -> None:
    """The --url option every command that opens the ledger takes."""
    parser.add_argument(
        "--url",
        default=os.environ.get("LLM_SPEND_URL", DEFAULT_URL),
        help="SQLAlchemy async URL of the ledger (default: $LLM_SPEND_URL or %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-spend", description="LLM cost ledger and budget guard.")
    commands = parser.add_subparsers(dest="command", required=True)
    for family in FAMILIES:
        family.register(commands, add_url)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; each sets `handler` (sync or async, returning the exit status)."""
    args = build_parser().parse_args(argv)
    try:
        result = args.handler(args)
        status = asyncio.run(result) if inspect.iscoroutine(result) else result
    except ValueError as exc:
        print(f"llm-spend: {exc}", file=sys.stderr)
        return 2
    return int(status)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
