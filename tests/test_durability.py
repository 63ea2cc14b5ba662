"""Never lose a call: outages, spool replay, kills, shutdown, backpressure, block mode in outages.

Failures are injected into the real databases: on SQLite a trigger that aborts ledger inserts, on
PostgreSQL the test's database refusing connections. No mocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from conftest import PG_URL
from llm_spend import Budget, BudgetExceeded, StorageError, Tracker, Usage
from llm_spend.money import to_nanousd
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


async def test_an_outage_longer_than_a_lease_never_frees_the_reservations_of_spooled_calls(
    db_url: str, tmp_path: Path
) -> None:
    """Guarded calls whose records are spooled in an outage keep their reservations until the replay
    settles them, however long the outage: the sweep waits for the replay. Before, a sweep after
    the lease freed them, other calls took their room, and the replay then took the window past its
    limit. Here the lease is 1 s and the outage 2.5 s; the budget fits five calls' estimates."""
    call = {"provider": "openai", "model": "gpt-4o-mini", "input_tokens": 1000, "max_output_tokens": 1000}
    probe = Tracker(db_url, budgets=[Budget.daily(100, mode="block")], spool_path=tmp_path / "s")
    async with probe, probe.guard(**call) as measured:  # type: ignore[arg-type]
        estimate = measured.estimate  # and released: the probe records nothing
    assert estimate is not None
    budgets = [Budget.daily(estimate * 5, mode="block")]
    tracker = Tracker(
        db_url, budgets=budgets, reservation_ttl=1, sweep_interval=0.1, spool_path=tmp_path / "calls.spool"
    )
    async with tracker:
        async with contextlib.AsyncExitStack() as open_calls:
            guarded = [await open_calls.enter_async_context(tracker.guard(**call)) for _ in range(5)]  # type: ignore[arg-type]
            async with outage(db_url):
                for one in guarded:  # the provider answered, each call billed at its estimate
                    one.record(Usage(input_tokens=1000, output_tokens=1000))
                await open_calls.aclose()  # written, the writes failing: spooled
                assert tracker.outage
                await asyncio.sleep(2.5)  # the leases end, the sweeper runs
        admitted = 0
        for _ in range(5):  # the window is full until the replay settles the five calls, then has
            # room for two: the estimates (0.00125 USD) bound the calls (0.00075) from above
            with contextlib.suppress(BudgetExceeded, StorageError):
                async with tracker.guard(**call) as one:  # type: ignore[arg-type]
                    admitted += 1
                    await one.record(Usage(input_tokens=1000, output_tokens=1000))
        state = await wait_for_rows(db_url, 5 + admitted)
    assert admitted <= 2
    assert state["spent"] == state["day_spent"] <= to_nanousd(estimate * 5)  # 10 calls' spend, before


async def test_once_an_outage_is_over_the_sweep_frees_expired_reservations_again(
    sqlite_url: str, tmp_path: Path
) -> None:
    """The sweep waits while writes are retried or spooled, and only then: once the replay is done,
    a reservation left to it (its release failed in the outage) is freed when its lease ends. A
    review found the sweep left off for good after a failed write, the budget locked until restart."""
    budgets = [Budget.daily(1, mode="block")]
    tracker = Tracker(
        sqlite_url, budgets=budgets, reservation_ttl=1, sweep_interval=0.1, spool_path=tmp_path / "s"
    )
    async with tracker:
        no_release = "llm_spend_outage_release"
        with closing(sqlite3.connect(sqlite_path(sqlite_url))) as conn:
            conn.execute(f"CREATE TRIGGER {no_release} BEFORE DELETE ON llm_spend_reservations "
                         "BEGIN SELECT RAISE(ABORT, 'injected outage'); END")  # fmt: skip
            conn.commit()
        set_sqlite_outage(sqlite_url, True)
        async with tracker.guard(
            provider="openai", model="gpt-4o", input_tokens=100_000, max_output_tokens=16_000
        ) as call:
            held = call.estimate  # left without a record: its release fails, left to the sweep
        await tracker.track(provider="openai", model="gpt-4o", input_tokens=10, output_tokens=5)  # spooled
        assert tracker.outage
        set_sqlite_outage(sqlite_url, False)
        with closing(sqlite3.connect(sqlite_path(sqlite_url))) as conn:
            conn.execute(f"DROP TRIGGER {no_release}")
            conn.commit()
        for _ in range(100):  # the probe replays the spooled call
            if not tracker.outage:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # the lease has ended; the sweeper runs every 0.1 s
        [status] = await tracker.budget_status()
    assert held is not None and held > 0
    assert status.reserved == 0 and (await ledger(sqlite_url))["day_calls"] == 1


async def test_a_damaged_spool_file_is_skipped_not_an_endless_outage(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bytes that are not UTF-8 in a spool file (a torn write, a disk error) are a damaged line,
    skipped and logged, as any damaged line is; they failed the whole replay at every try, and the
    tracker stayed in outage."""
    spool = tmp_path / "calls.spool"
    async with Tracker(sqlite_url, spool_path=spool) as tracker:
        pass
    (tmp_path / "calls.spool.replay-damaged").write_bytes(b"\xff\xfe{not json\n")
    async with Tracker(sqlite_url, spool_path=spool) as tracker:
        assert not tracker.outage
        await tracker.track(provider="openai", model="gpt-4o-mini", input_tokens=1, output_tokens=1)
    assert "skipping a damaged spool line" in caplog.text
    assert len((await ledger(sqlite_url))["ids"]) == 1


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


def a_record(**fields: Any) -> CallRecord:
    return CallRecord(
        event_id=new_event_id(), occurred_at=datetime.now(UTC), provider="openai", model="gpt-4o-mini",
        usage=Usage(input_tokens=1, output_tokens=1), cost=None, cost_nanousd=None,
        pricing_status="unknown_model", price_source=None, usage_source="manual", **fields,
    )  # fmt: skip


@pytest.mark.timeout(120)
async def test_calls_spooled_before_the_database_was_known_go_only_to_its_url(
    pg_url: str, tmp_path: Path
) -> None:
    """A tracker that never reached its database spools lines without a database id; another
    database sharing the spool keeps them, and only a tracker of the same URL replays them."""
    async with Tracker(pg_url):
        pass  # the schema
    spool = tmp_path / "shared.spool"
    await set_pg_outage(pg_url, True)
    try:
        async with Tracker(pg_url, spool_path=spool, auto_migrate=False) as tracker:
            records = await track_wave(tracker, 12)
            assert tracker.outage
        lines = [json.loads(line) for path in spool.parent.glob("shared.spool*") for line in path.open()]
        assert len(lines) == 12 and {line["db"] for line in lines} == {None}
        other = f"sqlite+aiosqlite:///{tmp_path / 'other.db'}"
        async with Tracker(other, spool_path=spool) as tracker:
            assert not tracker.outage
        assert (await ledger(other))["ids"] == []
        assert Spool(spool).backlog()[0] == 1
    finally:
        await set_pg_outage(pg_url, False)
    async with Tracker(pg_url, spool_path=spool):
        pass
    state = await ledger(pg_url)
    assert sorted(state["ids"]) == sorted(r.event_id for r in records)
    assert Spool(spool).backlog() == (0, 0)


async def out_of_outage(tracker: Tracker) -> None:
    """Wait for the probe to find the database answering again and replay (its first retries come
    within a few seconds); fail if it does not within 20 s."""
    for _ in range(200):
        if not tracker.outage:
            return
        await asyncio.sleep(0.1)
    assert not tracker.outage


@pytest.mark.timeout(120)
async def test_another_databases_spool_lines_do_not_keep_a_tracker_in_outage(tmp_path: Path) -> None:
    """After an outage, the probe replays this database's calls and leaves outage, though the shared
    spool still holds another database's lines (kept for it, never written here)."""
    url_a = f"sqlite+aiosqlite:///{tmp_path / 'a.db'}"
    url_b = f"sqlite+aiosqlite:///{tmp_path / 'b.db'}"
    spool = tmp_path / "shared.spool"
    async with Tracker(url_a, spool_path=spool) as tracker:
        set_sqlite_outage(url_a, True)
        foreign = await track_wave(tracker, 5)
        set_sqlite_outage(url_a, False)
    async with Tracker(url_b, spool_path=spool) as tracker:
        set_sqlite_outage(url_b, True)
        ours = await track_wave(tracker, 7)
        assert tracker.outage
        set_sqlite_outage(url_b, False)
        await out_of_outage(tracker)
        assert sorted((await ledger(url_b))["ids"]) == sorted(r.event_id for r in ours)
    assert Spool(spool).backlog()[0] == 1
    async with Tracker(url_a, spool_path=spool):
        pass
    assert sorted((await ledger(url_a))["ids"]) == sorted(r.event_id for r in foreign)


def spooled_lines(spool: Path) -> list[dict[str, Any]]:
    """Every line of a spool, in its files (the one appended to, those claimed for a replay)."""
    return [json.loads(line) for path in spool.parent.glob(f"{spool.name}*") for line in path.open()]


@pytest.mark.timeout(120)
async def test_a_database_replaced_at_the_same_url_gets_none_of_the_old_ones_spooled_calls(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Calls spooled during an outage belong to the database the tracker started with. If another
    takes its place at the same URL meanwhile (dropped and created again: a new id), the running
    tracker's replay keeps them for the old one instead of writing them into the new one."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'a.db'}"
    async with Tracker(url) as tracker:
        set_sqlite_outage(url, True)
        spooled = await track_wave(tracker, 5)
        assert tracker.outage
        with sqlite3.connect(sqlite_path(url)) as conn:  # the new database's id
            conn.execute("UPDATE llm_spend_meta SET value = 'replaced' WHERE key = 'database_id'")
        set_sqlite_outage(url, False)
        await out_of_outage(tracker)
        after = await tracker.track(provider="openai", model="gpt-4o-mini", input_tokens=1, output_tokens=1)
    assert (await ledger(url))["ids"] == [after.event_id]
    assert any("its id changed" in r.getMessage() for r in caplog.records)
    lines = spooled_lines(tracker.spool.path)
    assert sorted(line["call"]["event_id"] for line in lines) == sorted(r.event_id for r in spooled)
    assert {line["db"] for line in lines} != {"replaced"}


def test_a_torn_last_line_does_not_swallow_the_next_call(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A crash mid-append leaves half a line; the next append starts on a line of its own, so only
    the torn call is lost (and logged), never the one after it."""
    spool = Spool(tmp_path / "s.spool")
    first, torn, after = a_record(), a_record(), a_record()
    spool.append([PendingWrite(first, ()), PendingWrite(torn, ())], "db-1")
    whole = spool.path.read_bytes()
    spool.path.write_bytes(whole[: len(whole) - 40])  # the second line, cut short
    spool.append([PendingWrite(after, ())], "db-1")
    (path,) = spool.claim()
    items, foreign = spool.read(path, "db-1")
    assert [item.record.event_id for item in items] == [first.event_id, after.event_id]
    assert foreign == []
    assert any("damaged spool line" in r.getMessage() for r in caplog.records)


def test_appends_racing_replay_claims_lose_nothing(tmp_path: Path) -> None:
    """Four threads append while another claims and reads the spool over and over: every call
    appended is read exactly once (no line lands in a file already claimed and read)."""
    spool = Spool(tmp_path / "s.spool")
    written: list[str] = []
    read: list[str] = []
    done = threading.Event()

    def append() -> None:
        for _ in range(150):
            record = a_record()
            written.append(record.event_id)
            spool.append([PendingWrite(record, ())], "db-1")

    def replay() -> None:
        while True:
            stop = done.is_set()
            for path in spool.claim():
                items, _ = spool.read(path, "db-1")
                read.extend(item.record.event_id for item in items)
                path.unlink()
            if stop:
                return

    appenders = [threading.Thread(target=append) for _ in range(4)]
    replayer = threading.Thread(target=replay)
    replayer.start()
    for thread in appenders:
        thread.start()
    for thread in appenders:
        thread.join()
    done.set()
    replayer.join()
    assert len(written) == 600
    assert sorted(read) == sorted(written)


@asynccontextmanager
async def write_lock_held(url: str) -> AsyncIterator[None]:
    """Another session holds the ledger's write lock while inside."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(sqlite_path(url), isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    parsed = make_url(url)
    pg = await asyncpg.connect(
        host=parsed.host, port=parsed.port or 5432, user=parsed.username, database=parsed.database
    )
    try:
        async with pg.transaction():
            await pg.execute("LOCK TABLE llm_calls IN ACCESS EXCLUSIVE MODE")
            yield
    finally:
        await pg.close()


@pytest.mark.timeout(120)
async def test_shutdown_deadline_holds_while_another_session_holds_the_write_lock(db_url: str) -> None:
    """The lock is held until after the tracker has exited, with a write stuck on it and more calls
    queued and waiting for room: the exit keeps its deadline, every call is in the spool, and the
    next start writes each once."""
    tracker = Tracker(db_url, shutdown_timeout=0.5, max_queue=5, max_batch=5)
    async with tracker:
        lock = write_lock_held(db_url)
        await lock.__aenter__()
        tasks = [asyncio.create_task(tracker.track(provider="openai", model="gpt-4o-mini",
                                                   input_tokens=1, output_tokens=1))
                 for _ in range(40)]  # fmt: skip
        await asyncio.sleep(0.2)
        assert tracker.backpressure_waits > 0
    try:
        records = await asyncio.gather(*tasks)  # each resolved: spooled, not lost, not hanging
        lines = [line for path in tracker.spool._files() for line in path.read_text().splitlines()]
        assert len(lines) == 40
    finally:
        await lock.__aexit__(None, None, None)
    async with Tracker(db_url) as replayed:
        assert replayed.spool.backlog() == (0, 0)
    state = await ledger(db_url)
    assert sorted(state["ids"]) == sorted(r.event_id for r in records)
    assert state["day_calls"] == 40


async def test_calls_whose_callers_were_cancelled_are_spooled_when_the_deadline_passes(
    db_url: str, tmp_path: Path
) -> None:
    """At the shutdown deadline the batch stuck on a lock goes to the spool whole: the calls of
    callers who stopped waiting (a client that disconnected) are billed calls too."""
    spool = tmp_path / "calls.spool"
    tracker = Tracker(db_url, shutdown_timeout=0.5, spool_path=spool)
    async with tracker:
        lock = write_lock_held(db_url)
        await lock.__aenter__()
        tasks = [asyncio.create_task(tracker.track(provider="openai", model="gpt-4o-mini",
                                                   input_tokens=1, output_tokens=1))
                 for _ in range(10)]  # fmt: skip
        await asyncio.sleep(0.2)  # the writer holds them as one batch, waiting for the lock
        for task in tasks[:4]:
            task.cancel()
        await asyncio.sleep(0.05)
    try:
        await asyncio.gather(*tasks, return_exceptions=True)
        lines = [line for path in tracker.spool._files() for line in path.read_text().splitlines()]
        assert len(lines) == 10
    finally:
        await lock.__aexit__(None, None, None)
    async with Tracker(db_url, spool_path=spool):
        pass
    state = await ledger(db_url)
    assert len(state["ids"]) == 10 and state["day_calls"] == 10


async def test_a_spool_file_another_process_replays_is_left_to_it(sqlite_url: str) -> None:
    """Processes sharing a spool start together: a file that another one is replaying (it holds its
    lock) is skipped, not failed on, and the start is not an outage; once that process is done with
    it (here: it let go without replaying), the next start replays it."""
    async with Tracker(sqlite_url):
        pass
    async with outage(sqlite_url), Tracker(sqlite_url) as spooling:
        await track_wave(spooling, 20)
    spool = Spool(f"{sqlite_path(sqlite_url)}.spool")
    (claimed,) = spool.claim()
    other = os.open(claimed, os.O_RDONLY)
    fcntl.flock(other, fcntl.LOCK_EX)  # another process's replay holds it
    try:
        async with Tracker(sqlite_url) as starting:
            assert not starting.outage
        assert (await ledger(sqlite_url))["ids"] == [] and claimed.exists()
    finally:
        os.close(other)
    async with Tracker(sqlite_url):
        pass
    state = await ledger(sqlite_url)
    assert len(state["ids"]) == 20 and state["day_calls"] == 20 and not claimed.exists()


def _open_files() -> list[str]:
    names = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own, closed by now
            names.append(os.readlink(f"/proc/self/fd/{fd}"))
    return names


async def test_no_replay_probe_outlives_the_tracker(tmp_path: Path) -> None:
    """Closing while an outage just ended (the drain's batch succeeds): no replay probe is left to
    open the closed store's SQLite file again (an open file left behind); the spooled call is written
    at the next start. Five rounds: the probe's timing varies."""
    for round_ in range(5):
        url = f"sqlite+aiosqlite:///{tmp_path / f'ledger{round_}.db'}"
        tracker = Tracker(url)
        await tracker.__aenter__()
        set_sqlite_outage(url, True)
        await tracker.track(provider="openai", model="gpt-4o-mini", input_tokens=1, output_tokens=1)
        await asyncio.sleep(0.1)  # spooled; the probe failed once and sleeps
        set_sqlite_outage(url, False)
        tasks = [asyncio.create_task(tracker.track(provider="openai", model="gpt-4o-mini",
                                                   input_tokens=1, output_tokens=1))
                 for _ in range(100)]  # fmt: skip
        await asyncio.sleep(0)
        await tracker.__aexit__(None, None, None)
        await asyncio.gather(*tasks)
        await asyncio.sleep(0.5)
        assert [t for t in asyncio.all_tasks() if t.get_name() == "llm-spend-replay"] == []
        path = sqlite_path(url)
        assert not [name for name in _open_files() if name.startswith(path)], round_
        async with Tracker(url):
            pass
        assert len((await ledger(url))["ids"]) == 101


@pytest.mark.timeout(120)
async def test_a_spool_that_cannot_be_written_loses_calls_loudly_but_never_stops_recording(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The database fails and the spool cannot be written either (its directory is a file): the
    calls are logged as LOST and track() still returns; once the database answers, recording goes on."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    async with Tracker(sqlite_url, spool_path=blocker / "spool") as tracker:
        set_sqlite_outage(sqlite_url, True)
        lost = await asyncio.wait_for(track_wave(tracker, 5), 30)
        set_sqlite_outage(sqlite_url, False)
        kept = await asyncio.wait_for(track_wave(tracker, 5, 5), 30)
    assert any("LOST" in r.getMessage() for r in caplog.records)
    assert tracker.spool.dropped == 5 and len(lost) == 5
    assert sorted((await ledger(sqlite_url))["ids"]) == sorted(r.event_id for r in kept)


async def test_a_spooled_call_the_database_refuses_is_set_aside_not_blocking_the_rest(
    db_url: str, tmp_path: Path
) -> None:
    """One spooled line the database cannot store (a lone surrogate, as no validation lets in now)
    among good ones: the good ones are written, the bad one goes to `<spool>.rejected`, logged."""
    async with Tracker(db_url) as tracker:
        database_id = await tracker.store.identity()
    spool = Spool(tmp_path / "s.spool")
    good = [a_record() for _ in range(5)]
    bad = replace(a_record(), provider="open\ud800ai")
    spool.append([PendingWrite(r, ()) for r in [*good[:2], bad, *good[2:]]], database_id)
    async with Tracker(db_url, spool_path=spool.path) as tracker:
        assert not tracker.outage
    assert sorted((await ledger(db_url))["ids"]) == sorted(r.event_id for r in good)
    assert spool.backlog() == (0, 0)
    rejected = tmp_path / "s.spool.rejected"
    assert [json.loads(line)["call"]["event_id"] for line in rejected.open()] == [bad.event_id]


@pytest.mark.timeout(120)
async def test_a_spool_whose_start_up_replay_failed_is_replayed_once_the_database_answers(
    sqlite_url: str,
) -> None:
    """Started while the database refused writes: the spool waits, and the probe replays it as soon
    as the database answers, without a restart."""
    async with Tracker(sqlite_url) as tracker:
        set_sqlite_outage(sqlite_url, True)
        spooled = await track_wave(tracker, 10)
    async with Tracker(sqlite_url) as tracker:
        assert tracker.outage and tracker.spool.backlog()[0] == 1
        set_sqlite_outage(sqlite_url, False)
        state = await wait_for_rows(sqlite_url, 10, seconds=30)
        assert sorted(state["ids"]) == sorted(r.event_id for r in spooled)
        for _ in range(100):
            if not tracker.outage:
                break
            await asyncio.sleep(0.1)
        assert not tracker.outage and tracker.spool.backlog() == (0, 0)


async def test_text_no_database_can_store_is_refused_or_replaced_at_the_door(db_url: str) -> None:
    """A NUL or a lone surrogate in provider/model is a ValueError naming the field; in a tag value it
    is replaced, and the call is recorded on both databases."""
    async with Tracker(db_url) as tracker:
        for bad in ("open\x00ai", "open\ud800ai"):
            with pytest.raises(ValueError, match="provider must not hold NUL"):
                await tracker.track(provider=bad, model="gpt-4o-mini", input_tokens=1, output_tokens=1)
            with pytest.raises(ValueError, match="model must not hold NUL"):
                await tracker.track(provider="openai", model=bad, input_tokens=1, output_tokens=1)
        record = await tracker.track(
            provider="openai", model="gpt-4o-mini", input_tokens=1, output_tokens=1,
            tags={"user_id": "a\x00b", "note": "x\ud800y"},
        )  # fmt: skip
    assert record.tags == {"user_id": "a\ufffdb", "note": "x?y"}
    assert (await ledger(db_url))["ids"] == [record.event_id]
