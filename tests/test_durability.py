"""Never lose a call: outages, spool replay, kills, shutdown, backpressure, block mode in outages.

Failures are injected into the real databases: on SQLite a trigger that aborts ledger inserts, on
PostgreSQL the test's database refusing connections. No mocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from conftest import PG_URL
from llm_spend import Budget, StorageError, Tracker, Usage
from llm_spend.storage.schema import calls, rollups
from llm_spend.storage.spool import Spool
from llm_spend.storage.store import PendingWrite
from llm_spend.usage import CallRecord, new_event_id

WORKER = Path(__file__).with_name("durability_worker.py")


def sqlite_path(url: str) -> str:
    return str(make_url(url).database)


def set_sqlite_outage(url: str, on: bool, table: str = "llm_calls") -> None:
    conn = sqlite3.connect(sqlite_path(url), timeout=30)
    name = f"llm_spend_outage_{table}"
    if on:
        fail = "SELECT RAISE(ABORT, 'injected outage')"
        conn.execute(f"CREATE TRIGGER {name} BEFORE INSERT ON {table} BEGIN {fail}; END")
    else:
        conn.execute(f"DROP TRIGGER IF EXISTS {name}")
    conn.commit()
    conn.close()


async def set_pg_outage(url: str, on: bool) -> None:
    name = make_url(url).database
    admin = make_url(PG_URL)
    conn = await asyncpg.connect(
        host=admin.host, port=admin.port or 5432, user=admin.username, database=admin.database
    )
    try:
        await conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {"false" if on else "true"}')
        if on:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid()",
                name,
            )
    finally:
        await conn.close()


@asynccontextmanager
async def outage(url: str) -> AsyncIterator[None]:
    """The database fails every ledger write while inside."""
    if url.startswith("sqlite"):
        set_sqlite_outage(url, True)
    else:
        await set_pg_outage(url, True)
    try:
        yield
    finally:
        if url.startswith("sqlite"):
            set_sqlite_outage(url, False)
        else:
            await set_pg_outage(url, False)


async def ledger(url: str) -> dict[str, Any]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            ids = (await conn.execute(select(calls.c.event_id))).scalars().all()
            spent = (
                await conn.execute(select(func.coalesce(func.sum(calls.c.cost_nanousd), 0)))
            ).scalar_one()
            day = (
                await conn.execute(
                    select(func.sum(rollups.c.spent_nanousd), func.sum(rollups.c.calls)).where(
                        rollups.c.period == "day", rollups.c.scope_key == ""
                    )
                )
            ).one()
    finally:
        await engine.dispose()
    return {
        "ids": list(ids),
        "spent": int(spent),
        "day_spent": int(day[0] or 0),
        "day_calls": int(day[1] or 0),
    }


async def track_wave(tracker: Tracker, n: int, start: int = 0) -> list[CallRecord]:
    return await asyncio.gather(
        *(
            tracker.track(
                provider="openai", model="gpt-4o-mini", input_tokens=100 + i, output_tokens=10,
                tags={"user_id": f"u{i % 7}"},
            )
            for i in range(start, start + n)
        )
    )  # fmt: skip


async def wait_for_rows(url: str, count: int, seconds: float = 40) -> dict[str, Any]:
    for _ in range(int(seconds * 4)):
        state = await ledger(url)
        if len(state["ids"]) >= count:
            return state
        await asyncio.sleep(0.25)
    return await ledger(url)


async def test_outage_mid_run_loses_nothing(db_url: str) -> None:
    """5,000 calls with the database failing for part of the run: each recorded exactly once."""
    async with Tracker(db_url) as tracker:
        records = await track_wave(tracker, 1500)
        async with outage(db_url):
            records += await track_wave(tracker, 1500, 1500)
            assert tracker.spool.backlog()[0] >= 1
        records += await track_wave(tracker, 2000, 3000)
        state = await wait_for_rows(db_url, 5000)
    assert sorted(state["ids"]) == sorted(r.event_id for r in records)
    assert len(set(state["ids"])) == 5000
    assert state["day_calls"] == 5000 and state["day_spent"] == state["spent"]
    assert tracker.spool.backlog() == (0, 0)


async def test_killed_process_spool_is_replayed_at_next_start(sqlite_url: str) -> None:
    """A process SIGKILLed with calls in its spool: the next start writes them, exactly once."""
    async with Tracker(sqlite_url):
        pass
    set_sqlite_outage(sqlite_url, True)
    proc = subprocess.Popen(  # noqa: ASYNC220 - one child, read below
        [sys.executable, str(WORKER), sqlite_url, "200"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        spooled = json.loads(line)
        assert spooled["spooled"] == 200
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    set_sqlite_outage(sqlite_url, False)
    assert (await ledger(sqlite_url))["ids"] == []
    async with Tracker(sqlite_url) as tracker:
        assert tracker.spool.backlog() == (0, 0)
    state = await ledger(sqlite_url)
    assert sorted(state["ids"]) == sorted(spooled["event_ids"])
    assert state["day_calls"] == 200 and state["day_spent"] == state["spent"]


async def test_replaying_the_same_spool_twice_changes_nothing(sqlite_url: str, tmp_path: Path) -> None:
    """The same spool replayed twice: the second replay inserts nothing and bumps no rollup."""
    async with Tracker(sqlite_url) as tracker:
        set_sqlite_outage(sqlite_url, True)
        await track_wave(tracker, 50)
        set_sqlite_outage(sqlite_url, False)
        spool = tracker.spool.path
    copies = tmp_path / "copies"
    copies.mkdir()
    for path in spool.parent.glob(spool.name + "*"):
        shutil.copy(path, copies / path.name)
    async with Tracker(sqlite_url):
        pass
    first = await ledger(sqlite_url)
    for path in copies.iterdir():
        shutil.copy(path, spool.parent / path.name)
    async with Tracker(sqlite_url):
        pass
    second = await ledger(sqlite_url)
    assert len(first["ids"]) == 50
    assert second == first


async def test_a_spool_is_never_replayed_into_another_database(tmp_path: Path) -> None:
    """Spool lines of database A are kept, not written, when a tracker of database B finds them."""
    url_a = f"sqlite+aiosqlite:///{tmp_path / 'a.db'}"
    url_b = f"sqlite+aiosqlite:///{tmp_path / 'b.db'}"
    spool = tmp_path / "shared.spool"
    async with Tracker(url_a, spool_path=spool) as tracker:
        set_sqlite_outage(url_a, True)
        await track_wave(tracker, 20)
        set_sqlite_outage(url_a, False)
    async with Tracker(url_b, spool_path=spool):
        pass
    assert (await ledger(url_b))["ids"] == []
    assert Spool(spool).backlog()[0] == 1
    async with Tracker(url_a, spool_path=spool):
        pass
    assert len((await ledger(url_a))["ids"]) == 20
    assert Spool(spool).backlog() == (0, 0)


async def test_shutdown_deadline_sends_pending_calls_to_the_spool(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Exiting while the database fails: within shutdown_timeout, what is left goes to the spool, logged."""
    caplog.set_level(logging.WARNING, "llm_spend")
    tracker = Tracker(sqlite_url, shutdown_timeout=0.1)
    async with tracker:
        set_sqlite_outage(sqlite_url, True)
        tasks = [asyncio.create_task(tracker.track(provider="openai", model="gpt-4o-mini", input_tokens=1,
                                                   output_tokens=1)) for _ in range(30)]  # fmt: skip
        await asyncio.sleep(0.02)
    records = await asyncio.gather(*tasks)
    assert any("went to the spool" in r.getMessage() for r in caplog.records)
    assert tracker.spool.backlog()[0] >= 1
    set_sqlite_outage(sqlite_url, False)
    async with Tracker(sqlite_url):
        pass
    assert sorted((await ledger(sqlite_url))["ids"]) == sorted(r.event_id for r in records)


async def test_full_queue_makes_track_wait_and_loses_nothing(sqlite_url: str) -> None:
    """A bounded queue: 500 concurrent track() with room for 10 wait their turn; all are recorded."""
    async with Tracker(sqlite_url, max_queue=10, max_batch=10) as tracker:
        await track_wave(tracker, 500)
        assert tracker.backpressure_waits > 0
    assert len((await ledger(sqlite_url))["ids"]) == 500


async def test_block_mode_in_an_outage_fails_closed_by_default(sqlite_url: str) -> None:
    """fail_closed: no reservation can be made, so the guarded call is refused with StorageError."""
    async with Tracker(sqlite_url, budgets=[Budget.daily(10, mode="block")]) as tracker:
        set_sqlite_outage(sqlite_url, True, table="llm_spend_reservations")
        try:
            ran = False
            with pytest.raises(StorageError, match="fail_closed"):
                async with tracker.guard(
                    provider="openai", model="gpt-4o-mini", input_tokens=10, max_output_tokens=10
                ):
                    ran = True
            assert not ran
        finally:
            set_sqlite_outage(sqlite_url, False, table="llm_spend_reservations")


async def test_block_mode_in_an_outage_can_fail_open(sqlite_url: str) -> None:
    """fail_open: the guarded call runs unreserved and is still recorded."""
    tracker = Tracker(sqlite_url, budgets=[Budget.daily(10, mode="block")], on_storage_error="fail_open")
    async with tracker:
        set_sqlite_outage(sqlite_url, True, table="llm_spend_reservations")
        try:
            async with tracker.guard(
                provider="openai", model="gpt-4o-mini", input_tokens=10, max_output_tokens=10
            ) as c:
                assert c.reservation is None
                record = await c.record(Usage(input_tokens=10, output_tokens=10))
        finally:
            set_sqlite_outage(sqlite_url, False, table="llm_spend_reservations")
    assert (await ledger(sqlite_url))["ids"] == [record.event_id]


def test_a_full_spool_logs_how_many_calls_are_lost(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The spool is bounded: what does not fit is counted and logged as LOST, never silently."""
    spool = Spool(tmp_path / "s.spool", max_bytes=2_000)
    record = CallRecord(
        event_id=new_event_id(), occurred_at=datetime.now(UTC), provider="openai", model="gpt-4o-mini",
        usage=Usage(input_tokens=1, output_tokens=1), cost=None, cost_nanousd=None,
        pricing_status="unknown_model", price_source=None, usage_source="manual",
    )  # fmt: skip
    items = [PendingWrite(record, ()) for _ in range(20)]
    kept = spool.append(items, "db-1")
    assert 0 < kept < 20
    assert spool.dropped == 20 - kept
    assert spool.backlog()[1] <= 2_000
    assert any("LOST" in r.getMessage() and str(20 - kept) in r.getMessage() for r in caplog.records)
