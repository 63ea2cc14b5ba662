"""`llm-spend db upgrade|current`: the ledger's schema; and how every command opens `--url`."""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from ..storage.sqlite_file import database_path
from ..storage.store import Store, parse_url

__all__ = ["UrlError", "check_url", "ledger", "register"]

CONNECT_TIMEOUT = 10.0
"""Seconds a command waits for a PostgreSQL server to accept a connection (a hung one is named, not
waited on for the driver's minute)."""


class UrlError(Exception):
    """`--url` cannot be used as given (a malformed URL, a sync driver, a SQLite file that does not
    exist, a database never migrated): `main` prints it and exits with status 2."""


def check_url(url: str, *, existing: bool) -> None:
    """Refuse a URL that is not an async SQLite or PostgreSQL one before anything connects. With
    `existing`, a SQLite file must already be there: a command that only reads must not create an
    empty database at a mistyped path."""
    try:
        parsed = parse_url(url)
    except ValueError as exc:
        raise UrlError(str(exc).removeprefix("url: ")) from None
    path = database_path(parsed) if parsed.get_backend_name() == "sqlite" else None
    if existing and path is not None and not os.path.exists(path):
        raise UrlError(f"no SQLite database at {path} (`llm-spend db upgrade` creates one)")
    folder = None if path is None else os.path.dirname(path) or "."
    if folder is not None and not os.path.isdir(folder):  # SQLite's own word: "unable to open"
        raise UrlError(f"the folder of the SQLite database file, {folder}, does not exist")


def open_store(url: str, *, existing: bool) -> Store:
    """A Store on `url`, checked as `check_url` does."""
    check_url(url, existing=existing)
    try:
        return Store(url, connect_timeout=CONNECT_TIMEOUT)
    except ImportError as exc:  # the driver is not installed
        raise UrlError(f"{exc} (PostgreSQL needs the extra: pip install 'llm-spend[postgres]')") from None


@asynccontextmanager
async def ledger(url: str, *, schema: bool = True) -> AsyncIterator[Store]:
    """The Store of an existing ledger, closed on exit. With `schema`, a database that was never
    migrated is refused with a hint, rather than failing on a missing table."""
    store = open_store(url, existing=True)
    try:
        if schema and await store.revision() is None:
            raise UrlError("the database has no llm-spend schema yet: run `llm-spend db upgrade` first")
        yield store
    finally:
        await store.close()


def register(commands: Any, add_url: Callable[[argparse.ArgumentParser], None]) -> None:
    db = commands.add_parser("db", help="manage the ledger's schema")
    sub = db.add_subparsers(dest="db_command", required=True)
    upgrade = sub.add_parser("upgrade", help="bring the schema to the newest migration")
    add_url(upgrade)
    upgrade.set_defaults(handler=lambda args: _upgrade(args.url))
    current = sub.add_parser("current", help="print the schema's migration revision")
    add_url(current)
    current.set_defaults(handler=lambda args: _current(args.url))


async def _upgrade(url: str) -> int:
    store = open_store(url, existing=False)  # creates a SQLite file that is not there yet
    try:
        await store.migrate()
        print(f"schema revision: {await store.revision() or 'none'}")
    finally:
        await store.close()
    return 0


async def _current(url: str) -> int:
    async with ledger(url, schema=False) as store:
        print(f"schema revision: {await store.revision() or 'none'}")
    return 0
