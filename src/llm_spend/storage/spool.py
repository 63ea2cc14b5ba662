"""Spool: calls that could not be written wait here for replay (JSON lines, fsync'd).

A spool belongs to one database: every line carries the database's id, and replay skips (and keeps)
lines of another database. A line written before the id could ever be read (the database was
unreachable since start-up) carries none and belongs to the database the spool's URL names.
Replay first renames the file aside, so appends made meanwhile (by this process or another sharing
the spool) go to a fresh file and nothing is read twice or lost. Replaying a line twice changes
nothing: the ledger insert is idempotent on event_id.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from ..money import from_nanousd
from ..usage import CallRecord, Usage
from .rows import PendingWrite, WindowKey, call_row
from .store import Store

__all__ = ["Spool", "default_spool_path"]

logger = logging.getLogger("llm_spend")

_REPLAY_MARK = ".replay-"


def default_spool_path(store: Store) -> Path:
    """Beside a SQLite file (`<file>.spool`), else `./.llm_spend_spool/<hash of the URL>`."""
    url = make_url(store.url)
    if store.dialect == "sqlite" and url.database not in (None, "", ":memory:"):
        database = Path(str(url.database)).resolve()
        return database.with_name(database.name + ".spool")
    digest = hashlib.sha256(url.render_as_string(hide_password=True).encode()).hexdigest()[:16]
    return Path(".llm_spend_spool") / digest


class Spool:
    """A bounded, append-only JSON-lines file of PendingWrites for one database."""

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = 256 * 2**20) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.dropped = 0
        """Calls lost because the spool was full (each one logged as an error)."""

    def append(self, items: Sequence[PendingWrite], database_id: str | None) -> int:
        """Write items durably (fsync); returns how many fit under `max_bytes`."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(_encode(item, database_id), separators=(",", ":")) + "\n" for item in items]
        room = self.max_bytes - self.backlog()[1]
        kept: list[str] = []
        for line in lines:
            if len(line) > room:
                break
            room -= len(line)
            kept.append(line)
        if len(kept) < len(lines):
            self.dropped += len(lines) - len(kept)
            logger.error(
                "llm-spend: spool %s is full (max_bytes=%d): %d calls could not be kept and are LOST",
                self.path, self.max_bytes, len(lines) - len(kept),
            )  # fmt: skip
        if kept:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, "".join(kept).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        return len(kept)

    def backlog(self) -> tuple[int, int]:
        """(files, bytes) waiting for replay."""
        files = [p for p in self._files() if p.exists()]
        return len(files), sum(p.stat().st_size for p in files)

    def claim(self) -> list[Path]:
        """Move the live file aside for replay; returns every file awaiting replay, oldest first."""
        if self.path.exists():
            target = self.path.with_name(f"{self.path.name}{_REPLAY_MARK}{uuid.uuid4().hex}")
            with contextlib.suppress(FileNotFoundError):  # another process claimed it first
                os.replace(self.path, target)
        claimed = [p for p in self._files() if p != self.path]
        return sorted(claimed, key=lambda p: p.stat().st_mtime_ns)

    def read(self, path: Path, database_id: str) -> tuple[list[PendingWrite], list[str]]:
        """The items of `path` for this database, in order, and the lines that belong elsewhere."""
        items: list[PendingWrite] = []
        foreign: list[str] = []
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                if data.get("db") not in (database_id, None):
                    foreign.append(line)
                    continue
                items.append(_decode(data))
            except (ValueError, KeyError, TypeError) as exc:
                logger.error("llm-spend: skipping a damaged spool line in %s: %s", path, exc)
        return items, foreign

    def _files(self) -> Iterator[Path]:
        if self.path.exists():
            yield self.path
        if self.path.parent.exists():
            yield from self.path.parent.glob(f"{self.path.name}{_REPLAY_MARK}*")


def _encode(item: PendingWrite, database_id: str | None) -> dict[str, Any]:
    row = call_row(item.record)
    row["occurred_at"] = item.record.occurred_at.isoformat()
    return {
        "db": database_id,
        "call": row,
        "windows": [_key(k) for k in item.windows],
        "reservation_id": item.reservation_id,
        "release": [[*_key(k), amount] for k, amount in item.release],
    }


def _key(key: WindowKey) -> list[str]:
    return [key.period, key.start.isoformat(), key.scope_key, key.scope_value]


def _window(data: Sequence[str]) -> WindowKey:
    return WindowKey(data[0], datetime.fromisoformat(data[1]), data[2], data[3])


def _decode(data: dict[str, Any]) -> PendingWrite:
    row = data["call"]
    usage = Usage(**{name: row[name] for name in Usage.__slots__})
    nanousd = row["cost_nanousd"]
    record = CallRecord(
        event_id=row["event_id"],
        occurred_at=datetime.fromisoformat(row["occurred_at"]),
        provider=row["provider"],
        model=row["model"],
        usage=usage,
        cost=None if nanousd is None else from_nanousd(nanousd),
        cost_nanousd=nanousd,
        pricing_status=row["pricing_status"],
        price_source=row["price_source"],
        usage_source=row["usage_source"],
        stream=row["stream"],
        latency_ms=row["latency_ms"],
        service_tier=row["service_tier"],
        provider_response_id=row["provider_response_id"],
        request_id=row["request_id"],
        tags=row["tags"],
    )
    return PendingWrite(
        record,
        tuple(_window(k) for k in data["windows"]),
        data["reservation_id"],
        tuple((_window(k[:4]), int(k[4])) for k in data["release"]),
    )
