"""`llm-spend doctor`: is the ledger healthy? Exit status 0 when it is, 1 when not."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from ..tracker import Tracker


def register(commands: Any, add_url: Callable[[argparse.ArgumentParser], None]) -> None:
    doctor = commands.add_parser("doctor", help="check the database, schema, spool and reservations")
    add_url(doctor)
    doctor.add_argument("--spool", help="the spool path (default: the tracker's default for the URL)")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.set_defaults(handler=_doctor)


async def _doctor(args: argparse.Namespace) -> int:
    tracker = Tracker(args.url, auto_migrate=False, spool_path=args.spool)
    try:
        health = await tracker.health()
    finally:
        await tracker.store.close()
    if args.json:
        print(json.dumps(health.to_dict(), indent=2))
        return 0 if health.ok else 1
    mark = {True: "ok  ", False: "FAIL"}
    error = f": {health.database_error}" if health.database_error else ""
    print(f"{mark[health.database_ok]} database reachable{error}")
    print(f"{mark[health.schema_current]} schema revision {health.schema_revision or 'none'}")
    backlog = f"{health.spool_files} files, {health.spool_bytes} bytes"
    print(f"{mark[health.spool_files == 0]} spool {health.spool_path}: {backlog}")
    print(f"     reservations outstanding: {health.pending_reservations}")
    print(f"     calls with an unknown model in the last day: {health.unknown_model_calls_last_day}")
    return 0 if health.ok else 1
