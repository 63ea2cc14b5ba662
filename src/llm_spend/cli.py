"""The `llm-spend` command."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from .storage.store import Store

__all__ = ["main"]

DEFAULT_URL = "sqlite+aiosqlite:///llm_spend.db"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-spend", description="LLM cost ledger and budget guard.")
    commands = parser.add_subparsers(dest="command", required=True)
    db = commands.add_parser("db", help="manage the ledger's schema")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    for name, text in (
        ("upgrade", "bring the schema to the newest migration"),
        ("current", "print the revision"),
    ):
        sub = db_commands.add_parser(name, help=text)
        sub.add_argument(
            "--url",
            default=os.environ.get("LLM_SPEND_URL", DEFAULT_URL),
            help="SQLAlchemy async URL (default: $LLM_SPEND_URL or %(default)s)",
        )
    return parser


async def _db(command: str, url: str) -> int:
    store = Store(url)
    try:
        if command == "upgrade":
            await store.migrate()
        revision = await store.revision()
        print(f"schema revision: {revision or 'none'}")
    finally:
        await store.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_db(args.db_command, args.url))
    except ValueError as exc:
        print(f"llm-spend: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
