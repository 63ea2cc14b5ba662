"""The `llm-spend` command. Each module of this package adds one family of subcommands.

Exit status: 0 on success; 1 when the command found a problem (`doctor`) or the database failed while
it ran (unreachable, refused, timed out, a query failed); 2 when the command line cannot work as given
(a bad option, a `--url` that is malformed, names a sync driver, a SQLite file that does not exist, or
a database never migrated, which `doctor` reports instead). Errors are one line on stderr, never a
traceback. Output into a pipe whose reader stopped early (`| head`) ends quietly, with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import sys
import threading
from collections.abc import Coroutine, Sequence
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from ..storage.store import driver_error
from . import db, doctor, ledger, prices, reports
from .db import UrlError

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
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except OverflowError as exc:  # an option's type that lets a number too large through
        parser.error(f"a number given is out of range ({exc})")
    try:
        result = args.handler(args)
        status = asyncio.run(_joined(result)) if inspect.iscoroutine(result) else result
        sys.stdout.flush()  # a reader gone (`| head`) shows here, not at exit
    except BrokenPipeError:
        _silence_stdout()
        return 1
    except UrlError as exc:
        print(f"llm-spend: {_cannot_use(args, exc)}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"llm-spend: {exc}", file=sys.stderr)
        return 2
    except OverflowError as exc:  # a value from the command line that a date or the database cannot hold
        print(f"llm-spend: a number given is out of range ({exc})", file=sys.stderr)
        return 2
    except (SQLAlchemyError, OSError) as exc:
        print(f"llm-spend: {_cannot_use(args, exc)}", file=sys.stderr)
        return 1
    return int(status)


async def _joined(command: Coroutine[Any, Any, int]) -> int:
    """Run `command`, then wait (a second at most) for the daemon threads it started to end while the
    loop is still open. Those are aiosqlite's workers (SQLAlchemy makes them daemons): when a SQLite
    database cannot be opened (a directory as --url), aiosqlite tells the worker to stop without
    waiting for it, and a worker that answers after `asyncio.run` closed the loop printed an "Event
    loop is closed" traceback after the error (omnilib/aiosqlite#241)."""
    started = set(threading.enumerate())
    try:
        return await command
    finally:
        for thread in set(threading.enumerate()) - started:
            if thread.daemon:
                thread.join(timeout=1.0)


def _cannot_use(args: argparse.Namespace, exc: BaseException) -> str:
    """One line naming the --url (its password hidden) and the reason, without SQLAlchemy's SQL."""
    if isinstance(exc, OSError) and exc.filename is not None:  # a local file, not the database
        return f"{exc.strerror or type(exc).__name__}: {exc.filename}"
    cause, reason = driver_error(exc)
    reason = reason or type(cause).__name__
    if isinstance(cause, TimeoutError):  # asyncpg's connect timeout says nothing more
        reason = f"no answer within {db.CONNECT_TIMEOUT:g} s"
    url = getattr(args, "url", None)
    if url is None:
        return reason
    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except SQLAlchemyError:
        shown = url
    return f"cannot use --url {shown}: {reason}"


def _silence_stdout() -> None:
    """The reader closed the pipe: send what is still buffered nowhere, so that exit says nothing
    (the recipe of Python's `signal` documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file (a test's capture)
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
