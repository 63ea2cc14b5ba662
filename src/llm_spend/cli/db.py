"""`llm-spend db upgrade|current`: the ledger's schema."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ..storage.store import Store


def register(commands: Any, add_url: Callable[[argparse.ArgumentParser], None]) -> None:
    db = commands.add_parser("db", help="manage the ledger's schema")
    sub = db.add_subparsers(dest="db_command", required=True)
    upgrade = sub.add_parser("upgrade", help="bring the schema to the newest migration")
    add_url(upgrade)
    upgrade.set_defaults(handler=lambda args: _run(args.url, migrate=True))
    current = sub.add_parser("current", help="print the schema's migration revision")
    add_url(current)
    current.set_defaults(handler=lambda args: _run(args.url, migrate=False))


async def _run(url: str, *, migrate: bool) -> int:
    store = Store(url)
    try:
        if migrate:
            await store.migrate()
        print(f"schema revision: {await store.revision() or 'none'}")
    finally:
        await store.close()
    return 0
