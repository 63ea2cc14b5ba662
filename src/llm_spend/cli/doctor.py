"""`llm-spend doctor`: is the ledger healthy? Exit status 0 when it is, 1 when not."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from ..health import check_health
from ..tracker import Tracker
from .db import check_url


def register(commands: Any, add_url: Callable[[argparse.ArgumentParser], None]) -> None:
    doctor = commands.add_parser("doctor", help="check the database, schema, spool and reservations")
    add_url(doctor)
    doctor.add_argument("--spool", help="the spool path (default: the tracker's default for the URL)")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument(
        "--timeout", type=_seconds, default=5.0, metavar="SECONDS",
        help="give up on the database after this long (default 5)",
    )  # fmt: skip
    doctor.set_defaults(handler=_doctor)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < 86_400:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    return value


async def _doctor(args: argparse.Namespace) -> int:
    check_url(args.url, existing=True)  # a mistyped SQLite path is refused, not created empty
    tracker = Tracker(args.url, auto_migrate=False, spool_path=args.spool)
    try:
        health = await check_health(tracker, database_timeout=args.timeout)
    finally:
        await tracker.store.close()
    if args.json:
        print(json.dumps(health.to_dict(), indent=2))
        return 0 if health.ok else 1
    mark = {True: "ok  ", False: "FAIL"}
    error = f": {health.database_error}" if health.database_error else ""
    print(f"{mark[health.database_ok]} database reachable{error}")
    upgrade = ": run `llm-spend db upgrade`" if health.database_ok and not health.schema_current else ""
    print(f"{mark[health.schema_current]} schema revision {health.schema_revision or 'none'}{upgrade}")
    backlog = f"{health.spool_files} files, {health.spool_bytes} bytes"
    print(f"{mark[health.spool_files == 0]} spool {health.spool_path}: {backlog}")
    for label, count in (
        ("reservations outstanding", health.pending_reservations),
        ("calls with an unknown model in the last day", health.unknown_model_calls_last_day),
    ):
        print(f"     {label}: {'unknown' if count is None else count}")
    return 0 if health.ok else 1
