"""Spool: calls that could not be written wait here for replay (JSON lines, fsync'd).

A spool belongs to one database: every line carries the database's id, and replay skips (and keeps)
lines of another database. A line written before the id could ever be read (the database was
unreachable since start-up) carries none; it carries a hash of the URL it was meant for instead, and
only a database reached through that URL takes it.
Replay first renames the file aside, so appends made meanwhile (by this process or another sharing
the spool) go to a fresh file and nothing is read twice or lost: an append holds an exclusive lock on
the file while it writes, and so does the rename, so no line lands in a file already claimed.
Replaying a line twice changes nothing: the ledger insert is idempotent on event_id.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import stat
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from ..money import from_nanousd
from ..usage import CallRecord, Usage
from .rows import PendingWrite, WindowKey, call_row
from .sqlite_file import database_path
from .store import Store

__all__ = ["Spool", "default_spool_path", "url_key"]

logger = logging.getLogger("llm_spend")

_REPLAY_MARK = ".replay-"


def default_spool_path(store: Store) -> Path:
    """Beside a SQLite file (`<file>.spool`), else `./.llm_spend_spool/<hash of the URL>`."""
    path = database_path(make_url(store.url)) if store.dialect == "sqlite" else None
    if path is not None:
        database = Path(path).resolve()
        return database.with_name(database.name + ".spool")
    return Path(".llm_spend_spool") / url_key(store.url)


def url_key(url: str) -> str:
    """A short hash naming a database URL (password left out; a SQLite file by its absolute path)."""
    parsed = make_url(url)
    path = database_path(parsed) if parsed.get_backend_name() == "sqlite" else None
    if path is not None:
        parsed = parsed.set(database=str(Path(path).resolve()))
    return hashlib.sha256(parsed.render_as_string(hide_password=True).encode()).hexdigest()[:16]


class Spool:
    """A bounded, append-only JSON-lines file of PendingWrites for one database."""

    def __init__(
        self, path: str | os.PathLike[str], *, url_key: str | None = None, max_bytes: int = 256 * 2**20
    ) -> None:
        self.path = Path(path)
        self.url_key = url_key
        """Written on lines spooled before the database's id is known; only they replay by it."""
        self.max_bytes = max_bytes
        self.dropped = 0
        """Calls lost because the spool was full (each one logged as an error)."""

    def append_or_drop(self, items: Sequence[PendingWrite], database_id: str | None) -> int:
        """`append`, or, when the spool cannot be written (a full disk, a directory that is a file),
        log the calls as LOST and count them in `dropped`: they cannot be kept anywhere, and
        recording goes on. Returns how many were kept."""
        try:
            return self.append(items, database_id)
        except Exception as exc:
            self.dropped += len(items)
            logger.error(
                "llm-spend: writing the spool %s failed (%s): %d calls could not be kept and are LOST",
                self.path, exc, len(items),
            )  # fmt: skip
            return 0

    def append(self, items: Sequence[PendingWrite], database_id: str | None) -> int:
        """Write items durably (fsync); returns how many fit under `max_bytes`."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        url = None if database_id is not None else self.url_key
        lines = [json.dumps(_encode(item, database_id, url), separators=(",", ":")) + "\n" for item in items]
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
            fd = self._open_locked()
            try:
                data = "".join(kept).encode()
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    data = b"\n" + data  # a crash tore the last line: keep ours off it
                _write_all(fd, data)
            finally:
                os.close(fd)  # and the lock with it
        return len(kept)

    def _open_locked(self) -> int:
        """The live file, opened for appending and locked; never a file that replay already claimed."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)  # claimed (renamed) between our open and our lock: open the new one

    def backlog(self) -> tuple[int, int]:
        """(files, bytes) waiting for replay."""
        sizes = [size for size in map(_size, self._files()) if size is not None]
        return len(sizes), sum(sizes)

    def claim(self) -> list[Path]:
        """Move the live file aside for replay; returns every file awaiting replay, oldest first."""
        with contextlib.suppress(FileNotFoundError):  # none, or another process claimed it first
            fd = os.open(self.path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # wait for an append in progress to finish
                found = os.fstat(fd)  # a file: a directory there is never moved
                if stat.S_ISREG(found.st_mode) and found.st_ino == os.stat(self.path).st_ino:
                    target = self.path.with_name(f"{self.path.name}{_REPLAY_MARK}{uuid.uuid4().hex}")
                    os.replace(self.path, target)
            finally:
                os.close(fd)
        claimed = [(p, _mtime(p)) for p in self._files() if p != self.path]
        return [p for p, mtime in sorted(claimed, key=lambda c: c[1]) if mtime >= 0]

    def hold(self, path: Path) -> int | None:
        """Lock claimed file `path` for this replay (close the returned descriptor when done), or
        None when another process replays it now or has replayed it already."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:  # not deleted or replaced meanwhile
                return fd
        except (BlockingIOError, FileNotFoundError):
            pass
        os.close(fd)
        return None

    def read(self, path: Path, database_id: str) -> tuple[list[PendingWrite], list[str]]:
        """The items of `path` for this database, in order, and the lines that belong elsewhere."""
        items: list[PendingWrite] = []
        foreign: list[str] = []
        for line in path.read_bytes().decode(errors="replace").splitlines():  # ASCII, unless damaged
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                if not self._ours(data, database_id):
                    foreign.append(line)
                    continue
                items.append(_decode(data))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                logger.error("llm-spend: skipping a damaged spool line in %s: %s", path, exc)
        return items, foreign

    def reject(self, items: Sequence[PendingWrite]) -> Path:
        """Set aside items the database refuses, in `<spool>.rejected` (never replayed)."""
        path = self.path.with_name(self.path.name + ".rejected")
        lines = "".join(json.dumps(_encode(item, None, None), separators=(",", ":")) + "\n" for item in items)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            _write_all(fd, lines.encode())
        finally:
            os.close(fd)
        return path

    def keep(self, path: Path, lines: Sequence[str]) -> None:
        """Replace claimed file `path` by just `lines` (another database's), atomically and durably."""
        temporary = path.with_name(f".{path.name}.tmp")  # outside the glob of files to replay
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, "".join(line + "\n" for line in lines).encode())
        finally:
            os.close(fd)
        os.replace(temporary, path)

    def _ours(self, data: dict[str, Any], database_id: str) -> bool:
        owner = data["db"]
        if owner is None:  # spooled before the id was known: ours if it was meant for our URL
            return self.url_key is not None and data.get("url") == self.url_key
        return bool(owner == database_id)

    def _files(self) -> Iterator[Path]:
        if self.path.exists():
            yield self.path
        if self.path.parent.exists():
            yield from self.path.parent.glob(f"{self.path.name}{_REPLAY_MARK}*")


def _write_all(fd: int, data: bytes) -> None:
    """Write all of `data` (os.write may write part of it) and fsync."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # replayed and removed meanwhile
        return None


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:  # another process replayed it meanwhile
        return -1


def _encode(item: PendingWrite, database_id: str | None, url: str | None) -> dict[str, Any]:
    row = call_row(item.record)
    row["occurred_at"] = item.record.occurred_at.isoformat()
    return {
        "db": database_id,
        "url": url,
        "call": row,
        "windows": [_key(k) for k in item.windows],
        "reservation_id": item.reservation_id,
        "release": [[*_key(k), amount] for k, amount in item.release],
        "hold_until": None if item.hold_until is None else item.hold_until.isoformat(),
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
        None if (until := data.get("hold_until")) is None else datetime.fromisoformat(until),
    )
