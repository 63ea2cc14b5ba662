"""Storage: the schema Alembic creates, the CLI that runs it, and idempotent, consistent writes."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import warnings
from contextlib import closing
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import BigInteger, Integer, text
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

import llm_spend
from conftest import FreezingProxy, pg_sessions
from llm_spend import CallRecord, Tracker, Usage
from llm_spend.budgets import window_bounds
from llm_spend.money import from_nanousd
from llm_spend.storage.store import SWEEP_CHUNK, PendingWrite, Store, WindowKey
from llm_spend.usage import new_event_id

CLI = Path(sys.executable).with_name("llm-spend")

LEDGER_COLUMNS = {
    "event_id", "occurred_at", "provider", "model", "input_tokens", "output_tokens", "cache_read_tokens",
    "cache_write_tokens", "reasoning_tokens", "cost_nanousd", "pricing_status", "price_source",
    "usage_source", "stream", "latency_ms", "service_tier", "provider_response_id", "request_id", "tags",
}  # fmt: skip
ROLLUP_COLUMNS = {
    "period", "window_start", "scope_key", "scope_value", "spent_nanousd", "reserved_nanousd", "calls",
    "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens",
}  # fmt: skip


def newest_revision() -> str:
    config = Config()
    config.set_main_option("script_location", str(Path(llm_spend.__file__).parent / "migrations"))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


async def inspect_db(url: str, fn: Any) -> Any:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(lambda sync: fn(sa_inspect(sync)))
    finally:
        await engine.dispose()


async def scalar_rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return [tuple(r) for r in (await conn.execute(text(sql))).all()]
    finally:
        await engine.dispose()


async def test_revision_is_newest_after_migrate(db_url: str) -> None:
    """After migrate(), Store.revision() is the newest Alembic revision; before, it is None."""
    store = Store(db_url)
    try:
        assert await store.revision() is None
        await store.migrate()
        assert await store.revision() == newest_revision()
        await store.migrate()
        assert await store.revision() == newest_revision()
    finally:
        await store.close()


async def test_tracker_enter_migrates_to_newest(db_url: str) -> None:
    """Entering a Tracker brings the schema to the newest revision."""
    async with Tracker(db_url) as tracker:
        assert await tracker.store.revision() == newest_revision()


async def _enter_together(*trackers: Tracker) -> list[BaseException]:
    """Enter the trackers concurrently; exit the ones that came up, return the errors of the others."""
    results = await asyncio.gather(*(t.__aenter__() for t in trackers), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    for tracker, result in zip(trackers, results, strict=True):
        if isinstance(result, BaseException):
            await tracker.store.close()
        else:
            await tracker.track(provider="openai", model="gpt-4o", input_tokens=1, output_tokens=1)
            await tracker.__aexit__(None, None, None)
    return errors


async def test_trackers_on_two_databases_can_start_at_the_same_time(tmp_path: Path) -> None:
    """Two trackers for two different databases, entered concurrently in one process, both migrate."""
    urls = [f"sqlite+aiosqlite:///{tmp_path / name}" for name in ("a.db", "b.db")]
    errors = await _enter_together(*(Tracker(url) for url in urls))
    assert errors == []
    for url in urls:
        assert await scalar_rows(url, "SELECT COUNT(*) FROM llm_calls") == [(1,)]


async def test_two_trackers_on_one_postgresql_database_can_start_at_the_same_time(pg_url: str) -> None:
    """Two trackers entering at once on one fresh PostgreSQL database both come up (one migrates)."""
    errors = await _enter_together(Tracker(pg_url), Tracker(pg_url))
    assert errors == []
    assert await scalar_rows(pg_url, "SELECT COUNT(*) FROM llm_calls") == [(2,)]


def test_cli_db_upgrade_creates_the_tables(db_url: str) -> None:
    """`llm-spend db upgrade --url URL` exits 0, reports the revision and creates the tables."""
    result = subprocess.run(
        [str(CLI), "db", "upgrade", "--url", db_url], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert newest_revision() in result.stdout
    names = asyncio.run(inspect_db(db_url, lambda insp: insp.get_table_names()))
    assert {"llm_calls", "llm_spend_rollups", "llm_spend_reservations"} <= set(names)
    current = subprocess.run(
        [str(CLI), "db", "current", "--url", db_url], capture_output=True, text=True, timeout=120, check=False
    )
    assert current.returncode == 0, current.stderr
    assert newest_revision() in current.stdout


def test_cli_reads_url_from_environment(tmp_path: Path) -> None:
    """Without --url, `llm-spend db upgrade` uses $LLM_SPEND_URL."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'env.db'}"
    result = subprocess.run(
        [str(CLI), "db", "upgrade"],
        capture_output=True, text=True, timeout=120, check=False, env={**os.environ, "LLM_SPEND_URL": url},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "llm_calls" in asyncio.run(inspect_db(url, lambda insp: insp.get_table_names()))


def test_cli_rejects_a_url_that_is_not_sqlite_or_postgresql(tmp_path: Path) -> None:
    """A URL for another database is refused with a non-zero exit and a message, no traceback."""
    result = subprocess.run(
        [str(CLI), "db", "upgrade", "--url", "mysql+aiomysql://u@h/db"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "url" in result.stderr.lower()


async def test_tables_and_columns_from_the_design_exist(db_url: str) -> None:
    """llm_calls, llm_spend_rollups and llm_spend_reservations have the columns DESIGN.md names."""
    store = Store(db_url)
    try:
        await store.migrate()
    finally:
        await store.close()

    def describe(insp: Any) -> dict[str, Any]:
        return {
            name: {c["name"]: c for c in insp.get_columns(name)}
            for name in ("llm_calls", "llm_spend_rollups", "llm_spend_reservations")
        } | {
            "indexes": insp.get_indexes("llm_calls"),
            "unique": insp.get_unique_constraints("llm_calls"),
            "rollup_pk": insp.get_pk_constraint("llm_spend_rollups"),
        }

    info = await inspect_db(db_url, describe)
    assert set(info["llm_calls"]) >= LEDGER_COLUMNS
    assert set(info["llm_spend_rollups"]) >= ROLLUP_COLUMNS
    assert any("expire" in name for name in info["llm_spend_reservations"])
    assert info["llm_calls"]["cost_nanousd"]["nullable"] is True
    assert set(info["rollup_pk"]["constrained_columns"]) == {
        "period",
        "window_start",
        "scope_key",
        "scope_value",
    }
    unique_sets = [set(u["column_names"]) for u in info["unique"]]
    unique_sets += [set(i["column_names"]) for i in info["indexes"] if i.get("unique")]
    assert {"event_id"} in unique_sets
    leading = {i["column_names"][0] for i in info["indexes"] if i["column_names"]}
    assert "occurred_at" in leading
    assert "model" in leading
    if make_url(db_url).get_backend_name() == "postgresql":
        assert type(info["llm_calls"]["tags"]["type"]).__name__ == "JSONB"
        tag_indexes = [i for i in info["indexes"] if i["column_names"] == ["tags"]]
        assert tag_indexes, "PostgreSQL needs an index for tag queries"
        assert tag_indexes[0].get("dialect_options", {}).get("postgresql_using") == "gin"


async def test_money_columns_are_integers(db_url: str) -> None:
    """Every money column is an integer (nano-USD BIGINT), never a float or decimal."""
    async with Tracker(db_url):
        pass

    def types(insp: Any) -> dict[str, Any]:
        found = {}
        for table in ("llm_calls", "llm_spend_rollups", "llm_spend_reservations"):
            for column in insp.get_columns(table):
                if column["name"].endswith("nanousd"):
                    found[f"{table}.{column['name']}"] = column["type"]
        return found

    money = await inspect_db(db_url, types)
    assert {
        "llm_calls.cost_nanousd",
        "llm_spend_rollups.spent_nanousd",
        "llm_spend_rollups.reserved_nanousd",
    } <= set(money)
    for name, column_type in money.items():
        assert isinstance(column_type, Integer), name
        if make_url(db_url).get_backend_name() == "postgresql":
            assert isinstance(column_type, BigInteger), name


def _record(cost_nanousd: int | None = 6_000_000, **tags: str) -> CallRecord:
    return CallRecord(
        event_id=new_event_id(),
        occurred_at=datetime.now(UTC),
        provider="openai",
        model="gpt-4o",
        usage=Usage(input_tokens=1200, output_tokens=300, cache_read_tokens=100, reasoning_tokens=20),
        cost=None if cost_nanousd is None else from_nanousd(cost_nanousd),
        cost_nanousd=cost_nanousd,
        pricing_status="priced" if cost_nanousd is not None else "unknown_model",
        price_source="genai-prices test",
        usage_source="manual",
        tags=tags,
    )


def _windows(record: CallRecord) -> tuple[WindowKey, ...]:
    return tuple(
        WindowKey(period, window_bounds(period, record.occurred_at, UTC)[0], "", "")  # type: ignore[arg-type]
        for period in ("day", "month")
    )


async def _snapshot(url: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    calls = await scalar_rows(
        url, "SELECT event_id, cost_nanousd, input_tokens FROM llm_calls ORDER BY event_id"
    )
    rollups = await scalar_rows(
        url,
        "SELECT period, scope_key, scope_value, spent_nanousd, reserved_nanousd, calls, input_tokens, "
        "output_tokens, cache_read_tokens, reasoning_tokens FROM llm_spend_rollups ORDER BY period",
    )
    return calls, rollups


@pytest.fixture
async def store(db_url: str) -> Any:
    store = Store(db_url)
    await store.migrate()
    yield store
    await store.close()


async def test_writes_that_open_the_writes_connection_together_hold_one(pg_url: str) -> None:
    """Two writes that find no connection kept for the writes (a new store, or a pool emptied after
    a lost connection, as when the writer and the spool's replay resume after an outage) each
    connect: one keeps its connection for the writes to come, the other's goes back to the pool
    when its write is done, not when the garbage collector finds it."""
    store = Store(pg_url)
    await store.migrate()
    try:
        await store.engine.dispose()  # an emptied pool: each of the two makes a connection
        a, b = _record(cost_nanousd=100), _record(cost_nanousd=250)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            await asyncio.gather(
                store.write([PendingWrite(a, _windows(a))]), store.write([PendingWrite(b, _windows(b))])
            )
            gc.collect()
        assert [str(warning.message) for warning in caught] == []  # "... non-checked-in connection ..."
        assert store.engine.pool.checkedout() == 1
        calls, rollups = await _snapshot(pg_url)
        assert len(calls) == 2 and {r[3] for r in rollups} == {350}
    finally:
        await store.close()
    assert store.engine.pool.checkedout() == 0


def test_a_store_kept_past_its_event_loop_ends_the_connections_it_kept_there(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A store kept from one event loop to the next (a test suite whose loops end with each test):
    the connections it kept for its writes and reservations on the loop that ended cannot be closed
    on it; the next use on a new loop ends their sessions at once and takes new ones, instead of
    leaving them checked out until the garbage collector warns and fails to terminate them."""
    store = Store(pg_url)
    a, b = _record(cost_nanousd=100), _record(cost_nanousd=250)
    day, now = _day_key(a), datetime.now(UTC)

    async def first() -> None:
        await store.migrate()
        await store.write([PendingWrite(a, _windows(a))])
        assert await store.reserve("r-1", [(day, 400, 1_000)], now=now, expires_at=now) is None

    asyncio.run(first())
    assert store.engine.pool.checkedout() == 2  # the two lanes, kept for the loop that has ended
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        async def second() -> None:
            await store.write([PendingWrite(b, _windows(b))])
            assert await store.reserve("r-2", [(day, 500, 1_000)], now=now, expires_at=now) is not None
            assert pool.checkedout() == 2  # the new loop's lanes: the ended loop's were given back
            await store.close()

        pool = store.engine.pool
        asyncio.run(second())
        assert pg_sessions(pg_url) == 0  # no session of either loop is left on the server
        gc.collect()
    assert pool.checkedout() == 0
    assert [str(w.message) for w in caught if not issubclass(w.category, ResourceWarning)] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    calls, rollups = asyncio.run(_snapshot(pg_url))
    assert len(calls) == 2 and {(r[0], r[3], r[4]) for r in rollups} == {("day", 350, 400), ("month", 350, 0)}


def test_closing_a_stores_connections_on_another_loop_leaves_them_to_their_own(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The connections a store keeps for a loop that runs in another thread cannot be closed from a
    second loop: closing there says so and leaves them to their loop, whose own close then gives
    them back, instead of forgetting them until the garbage collector warns."""
    store = Store(pg_url)
    home = asyncio.new_event_loop()
    thread = threading.Thread(target=home.run_forever, daemon=True)
    thread.start()
    try:
        a = _record(cost_nanousd=100)

        async def use() -> None:
            await store.migrate()
            await store.write([PendingWrite(a, _windows(a))])

        asyncio.run_coroutine_threadsafe(use(), home).result(timeout=30)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with caplog.at_level(logging.WARNING, logger="llm_spend"):
                # a second loop, while the first runs; the drivers' close alone, since the engine's
                # dispose would close the pool's idle connection on the wrong loop (SQLAlchemy's)
                asyncio.run(store._drivers.close())
            assert "close it on that loop" in caplog.text
            assert store.engine.pool.checkedout() == 1  # the writes' lane, still its loop's
            asyncio.run_coroutine_threadsafe(store.close(), home).result(timeout=30)
            gc.collect()
        assert [str(w.message) for w in caught if not issubclass(w.category, ResourceWarning)] == []
    finally:
        home.call_soon_threadsafe(home.stop)
        thread.join(timeout=10)
        home.close()
    assert pg_sessions(pg_url) == 0


async def test_writing_the_same_event_twice_changes_nothing(db_url: str, store: Store) -> None:
    """A PendingWrite written again (same event_id) leaves ledger rows and rollups unchanged."""
    record = _record()
    item = PendingWrite(record, _windows(record))
    first = await store.write([item])
    assert first[0] is not None
    before = await _snapshot(db_url)
    assert len(before[0]) == 1
    assert [r[3] for r in before[1]] == [6_000_000, 6_000_000]
    second = await store.write([item])
    assert second == [None]
    assert await _snapshot(db_url) == before


async def test_same_event_twice_in_one_batch_is_counted_once(db_url: str, store: Store) -> None:
    """A batch holding one event twice writes one ledger row and counts it once in the rollups."""
    record = _record()
    item = PendingWrite(record, _windows(record))
    other = _record(cost_nanousd=1_000)
    await store.write([item, PendingWrite(other, _windows(other)), item])
    calls, rollups = await _snapshot(db_url)
    assert len(calls) == 2
    assert {(r[0], r[3], r[5]) for r in rollups} == {("day", 6_001_000, 2), ("month", 6_001_000, 2)}


async def test_a_batch_settles_a_held_reservation_and_one_a_sweep_freed_each_once(
    db_url: str, store: Store
) -> None:
    """Two calls written together, one whose reservation is still held and one whose reservation the
    sweep freed while it ran (its lease ended): each is counted once, the held reservation is given
    back once, and the freed one is not given back twice (reserved ends at 0, not below). On
    PostgreSQL this is the batch whose quick statement finds a reservation gone and is undone."""
    now = datetime.now(UTC)
    held, freed = _record(), _record(cost_nanousd=1_000)
    windows = _windows(held)
    amounts = [(key, 9_000_000, 10**15) for key in windows]
    assert await store.reserve("held", amounts, now=now, expires_at=now + timedelta(minutes=10)) is None
    assert await store.reserve("freed", amounts, now=now, expires_at=now - timedelta(seconds=1)) is None
    assert await store.sweep(now) == 1
    release = tuple((key, 9_000_000) for key in windows)
    results = await store.write(
        [PendingWrite(held, windows, "held", release), PendingWrite(freed, windows, "freed", release)]
    )
    calls, rollups = await _snapshot(db_url)
    assert len(calls) == 2
    assert {r[:6] for r in rollups} == {("day", "", "", 6_001_000, 0, 2), ("month", "", "", 6_001_000, 0, 2)}
    day = windows[0]
    assert [view[day] for view in results if view is not None] == [6_000_000, 6_001_000]
    assert await store.write([PendingWrite(held, windows, "held", release)]) == [None]  # recorded once
    assert await _snapshot(db_url) == (calls, rollups)


async def test_a_batch_holds_the_reservation_of_a_call_of_unknown_cost_until_its_windows_end(
    db_url: str, store: Store
) -> None:
    """A call of unknown cost (its usage never arrived) written with `hold_until`: its row is
    inserted, its reservation is kept, expiring then, and its windows keep the money reserved; the
    call settled in the same batch is settled as ever; written again (a replay), nothing changes;
    once the windows have ended, the sweep gives the held money back."""
    now = datetime.now(UTC)
    unknown, known = _record(cost_nanousd=None), _record(cost_nanousd=1_000)
    windows = _windows(unknown)
    amounts = [(key, 9_000_000, 10**15) for key in windows]
    for reservation_id in ("unknown", "known"):
        expires = now + timedelta(minutes=10)
        assert await store.reserve(reservation_id, amounts, now=now, expires_at=expires) is None
    release = tuple((key, 9_000_000) for key in windows)
    month_end = window_bounds("month", now, UTC)[1]
    batch = [
        PendingWrite(unknown, windows, "unknown", release, hold_until=month_end),
        PendingWrite(known, windows, "known", release),
    ]
    results = await store.write(batch)
    assert [view[windows[0]] for view in results if view is not None] == [0, 1_000]
    calls, rollups = await _snapshot(db_url)
    assert sorted(c[1] is None for c in calls) == [False, True]
    assert {r[:6] for r in rollups} == {
        ("day", "", "", 1_000, 9_000_000, 2),
        ("month", "", "", 1_000, 9_000_000, 2),
    }
    held = await scalar_rows(db_url, "SELECT id, expires_at FROM llm_spend_reservations")
    assert [(i, _aware(at)) for i, at in held] == [("unknown", month_end)]
    assert await store.write(batch) == [None, None]  # a replay: recorded once, held once
    assert await _snapshot(db_url) == (calls, rollups)
    assert await store.sweep(now + timedelta(hours=1)) == 0  # its lease would have ended: still held
    assert await store.sweep(month_end + timedelta(seconds=1)) == 1
    _, rollups = await _snapshot(db_url)
    assert {r[:6] for r in rollups} == {("day", "", "", 1_000, 0, 2), ("month", "", "", 1_000, 0, 2)}


async def test_a_batch_holds_many_reservations_and_a_renewal_never_brings_one_in(db_url: str) -> None:
    """A batch of many calls of unknown cost holds every one of their reservations until the windows
    end (one transaction for all of them); a lease renewal afterwards finds each and leaves it held,
    and a renewal past the hold still pushes it out."""
    await _holds_many(db_url)


async def test_a_batch_holds_many_reservations_in_memory() -> None:
    """The same on an in-memory database (SQLAlchemy's path)."""
    await _holds_many("sqlite+aiosqlite:///:memory:")


async def _holds_many(url: str) -> None:
    store = Store(url)
    await store.migrate()
    try:
        now = datetime.now(UTC)
        records = [_record(cost_nanousd=None) for _ in range(20)]
        windows = _windows(records[0])
        amounts = [(key, 1_000, 10**15) for key in windows]
        lease = now + timedelta(minutes=10)
        for i in range(20):
            assert await store.reserve(f"r{i}", amounts, now=now, expires_at=lease) is None
        month_end = window_bounds("month", now, UTC)[1]
        release = tuple((key, 1_000) for key in windows)
        batch = [
            PendingWrite(record, windows, f"r{i}", release, hold_until=month_end)
            for i, record in enumerate(records)
        ]
        assert [view is not None for view in await store.write(batch)] == [True] * 20
        assert await store.extend("r0", lease) and await store.extend("r1", lease)  # found, not shortened
        assert await store.sweep(lease + timedelta(seconds=1)) == 0
        later = month_end + timedelta(days=3)
        assert await store.extend("r2", later)
        assert not await store.extend("gone", later)
        assert await store.sweep(month_end + timedelta(seconds=1)) == 19
        assert await store.sweep(later + timedelta(seconds=1)) == 1
        assert await store.counts(now) == (0, 20)
    finally:
        await store.close()


async def test_a_sweep_frees_any_number_of_expired_reservations_a_chunk_at_a_time(
    db_url: str, store: Store
) -> None:
    """Estimates held until their windows end all expire at the same instant: a sweep frees more
    than `SWEEP_CHUNK` of them (one transaction per chunk), gives every window back exactly what
    was reserved in it, and leaves a live reservation alone. On PostgreSQL, a reservation another
    transaction has locked (a settlement deleting it) is skipped, not waited for, and freed by the
    next sweep once the lock is gone."""
    now = datetime.now(UTC)
    month_end = window_bounds("month", now, UTC)[1]
    day, month = (window_bounds(period, now, UTC)[0] for period in ("day", "month"))

    def amounts(user: str) -> list[tuple[WindowKey, int, int]]:
        keys = [WindowKey(p, start, k, v) for p, start in (("day", day), ("month", month))
                for k, v in (("", ""), ("user_id", user))]  # fmt: skip
        return [(key, 1_000, 10**15) for key in keys]

    expired = 2 * SWEEP_CHUNK + 1
    granted = await asyncio.gather(*(
        store.reserve(f"held-{i}", amounts(f"u{i % 7}"), now=now, expires_at=month_end)
        for i in range(expired)
    ))  # fmt: skip
    assert granted == [None] * expired
    live = month_end + timedelta(days=1)
    assert await store.reserve("live", amounts("u0"), now=now, expires_at=live) is None
    after = month_end + timedelta(seconds=1)
    if db_url.startswith("postgresql"):
        settling = await _driver(db_url)
        try:
            async with settling.transaction():
                await settling.execute("SELECT 1 FROM llm_spend_reservations WHERE id = 'held-0' FOR UPDATE")
                assert await asyncio.wait_for(store.sweep(after), 30) == expired - 1
        finally:
            await settling.close()
        assert await store.sweep(after) == 1
    else:
        assert await store.sweep(after) == expired
    assert await scalar_rows(db_url, "SELECT id FROM llm_spend_reservations") == [("live",)]
    rows = await scalar_rows(
        db_url, "SELECT period, scope_value, reserved_nanousd FROM llm_spend_rollups WHERE calls = 0"
    )
    assert sorted(rows) == sorted(
        [("day", "", 1_000), ("month", "", 1_000), ("day", "u0", 1_000), ("month", "u0", 1_000)]
        + [(period, f"u{u}", 0) for period in ("day", "month") for u in range(1, 7)]
    )


async def test_a_sweep_in_memory_frees_more_than_a_chunk() -> None:
    """The same sweep on an in-memory database (SQLAlchemy's path, where SQLite has no row locks)."""
    memory = Store("sqlite+aiosqlite:///:memory:")
    await memory.migrate()
    try:
        now = datetime.now(UTC)
        key = WindowKey("month", window_bounds("month", now, UTC)[0], "", "")
        expires = now + timedelta(minutes=1)
        for i in range(SWEEP_CHUNK + 1):
            assert await memory.reserve(f"r{i}", [(key, 1_000, 10**15)], now=now, expires_at=expires) is None
        assert await memory.sweep(expires + timedelta(seconds=1)) == SWEEP_CHUNK + 1
        assert await memory.counts(now) == (0, 0)
    finally:
        await memory.close()


def _aware(value: Any) -> datetime:
    """A timestamp as read back raw: aware on PostgreSQL, naive UTC text on SQLite."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


async def _driver(url: str) -> Any:
    import asyncpg

    return await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))


async def test_a_write_settling_a_reservation_a_sweep_is_releasing_waits_and_is_exact(pg_url: str) -> None:
    """PostgreSQL: a sweep deletes an expired reservation and then gives its windows back, in one
    transaction; a write settling that reservation meanwhile must not lock the windows first (the two
    would deadlock). It waits for the sweep, finds the reservation gone, and is written exactly: the
    call counted, its reservation given back once (by the sweep)."""
    store = Store(pg_url)
    await store.migrate()
    sweep = await _driver(pg_url)
    try:
        now = datetime.now(UTC)
        record = _record()
        windows = _windows(record)
        amounts = [(key, 9_000_000, 10**15) for key in windows]
        assert await store.reserve("r", amounts, now=now, expires_at=now + timedelta(minutes=10)) is None
        async with sweep.transaction():
            await sweep.execute("DELETE FROM llm_spend_reservations WHERE id = 'r'")
            write = asyncio.ensure_future(
                store.write([PendingWrite(record, windows, "r", tuple((key, 9_000_000) for key in windows))])
            )
            await asyncio.sleep(0.5)  # the write waits for the reservation's row
            assert not write.done()
            await sweep.execute(
                "UPDATE llm_spend_rollups SET reserved_nanousd = reserved_nanousd - 9000000"
            )  # times out here if the write locked the windows
        (view,) = await asyncio.wait_for(write, 30)
        assert view is not None and view[windows[0]] == 6_000_000
        calls, rollups = await _snapshot(pg_url)
        assert len(calls) == 1
        expected = {("day", "", "", 6_000_000, 0, 1), ("month", "", "", 6_000_000, 0, 1)}
        assert {r[:6] for r in rollups} == expected
    finally:
        await sweep.close()
        await store.close()


async def test_a_guarded_call_under_a_per_call_budget_alone_is_written_at_once(pg_url: str) -> None:
    """PostgreSQL: a call guarded by a per-call budget alone has a reservation id but no reservation
    row (no window holds anything); its write is made by the quick statement, not undone and made
    again (which cost a second round trip and an error line in the server's log per call)."""
    from llm_spend.storage import pg_write

    store = Store(pg_url)
    await store.migrate()
    conn = await _driver(pg_url)
    try:
        record = _record()
        item = PendingWrite(record, _windows(record), "r", ())  # as such a guard's record is
        inserted, totals = await pg_write._write_fresh(conn, [item])
        assert inserted == {record.event_id}
        assert sorted(totals.values()) == [6_000_000, 6_000_000]
    finally:
        await conn.close()
        await store.close()


async def test_a_batch_whose_totals_pass_64_bits_is_refused_as_data_and_keeps_the_connection(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL: calls whose costs fit a bigint each but not summed in a window are the data's fault
    (a data error, which the writer sets aside), not a lost connection: the writes' connection is
    kept, nothing is written, and no "connection was lost" is logged."""
    store = Store(pg_url)
    await store.migrate()
    try:
        records = [_record(cost_nanousd=2**63 - 1) for _ in range(3)]
        await store.write([PendingWrite(_record(), _windows(_record()))])  # the writes' lane is made
        lane = store._drivers._lanes["writes"].driver
        with pytest.raises(OverflowError) as raised:
            await store.write([PendingWrite(record, _windows(record)) for record in records])
        from llm_spend.storage.writer import _data_error

        assert _data_error(raised.value)  # so the writer sets the batch aside, not spools it forever
        assert store._drivers._lanes["writes"].driver is lane and not lane.is_closed()
        assert "connection was lost" not in caplog.text
        assert len((await _snapshot(pg_url))[0]) == 1
    finally:
        await store.close()


async def test_the_lanes_plan_each_statement_once_and_give_their_connections_back_as_lent(
    pg_url: str,
) -> None:
    """PostgreSQL: left to choose, the server plans a prepared statement anew at each of its first
    five executions, and at every later one when it estimates the generic plan dearer than those
    were, as it often does for the ledger write. The lanes' connections plan each hot statement
    once; given back to the pool, a connection plans as the server's settings say again."""
    store = Store(pg_url)
    await store.migrate()
    try:
        for n in range(1, 9):  # eight writes of different sizes, eight reservations
            records = [_record(cost_nanousd=100 * (i + 1)) for i in range(n)]
            await store.write([PendingWrite(record, _windows(record)) for record in records])
            now = datetime.now(UTC)
            key = WindowKey("day", window_bounds("day", now, UTC)[0], "", "")
            reserving = store.reserve(
                new_event_id(), [(key, 1_000, 10**15)], now=now, expires_at=now + timedelta(minutes=5)
            )
            assert await reserving is None
        for lane, statement in (("writes", "%INSERT INTO llm_calls%"), ("reservations", "%FOR UPDATE OF r%")):
            driver = store._drivers._lanes[lane].driver
            plans = await driver.fetch(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement LIKE $1",
                statement,
            )
            assert [row["custom_plans"] for row in plans] == [0] * len(plans), lane
            assert max(row["generic_plans"] for row in plans) >= 8, lane
        lanes = {held.driver.get_server_pid() for held in store._drivers._lanes.values()}
        await store._drivers.close()  # the lanes' connections go back to the pool, which lends them
        idle = store.engine.pool.checkedin()
        connections = [await store.engine.connect() for _ in range(idle)]
        try:
            sql = "SELECT pg_backend_pid(), current_setting('plan_cache_mode')"
            lent = dict([(await conn.exec_driver_sql(sql)).one() for conn in connections])
        finally:
            for conn in connections:
                await conn.close()
        assert len(lanes) == 2 and lanes <= set(lent)  # reset and lent again, not replaced
        assert set(lent.values()) == {"auto"}
    finally:
        await store.close()


async def test_writes_made_at_once_after_the_server_ended_every_session_all_land(pg_url: str) -> None:
    """PostgreSQL: the server ends every session (a restart) while the pool holds idle connections,
    and three writes come at once: each finds a dead connection, the lane's first statement on it
    (its plan setting, then its write) fails as lost, and each is made again on a new connection."""
    store = Store(pg_url)
    await store.migrate()
    try:
        connections = [await store.engine.connect() for _ in range(4)]
        for conn in connections:
            await conn.exec_driver_sql("SELECT 1")
            await conn.close()  # four idle connections in the pool
        admin = await _driver(pg_url)
        try:
            name = make_url(pg_url).database
            sessions = "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()"
            await admin.execute(f"SELECT pg_terminate_backend(pid) FROM ({sessions}) s", name)
        finally:
            await admin.close()
        await asyncio.sleep(0.3)  # the loop sees the sessions end
        records = [_record(cost_nanousd=100) for _ in range(3)]
        await asyncio.gather(*(store.write([PendingWrite(record, _windows(record))]) for record in records))
        assert len((await _snapshot(pg_url))[0]) == 3
    finally:
        await store.close()


async def test_a_lane_given_back_while_the_server_stops_answering_is_ended_not_waited_for(
    pg_url: str,
) -> None:
    """PostgreSQL: giving the lanes' connections back resets their plan setting; a server that stops
    answering (its connections left open) does not hold that up: the connection is ended instead,
    and not lent again."""
    proxy = FreezingProxy()
    url = make_url(pg_url)
    relayed = url.set(port=await proxy.start(url.port or 5432)).render_as_string(hide_password=False)
    store = Store(relayed)
    try:
        await store.migrate()
        record = _record()
        await store.write([PendingWrite(record, _windows(record))])  # the writes' lane, planned once
        proxy.frozen.set()
        closing = asyncio.ensure_future(store._drivers.close())
        done, _ = await asyncio.wait({closing}, timeout=60)  # a guard against a hang only
        assert done, "giving the lanes back waited for the server"
        closing.result()
        assert store.engine.pool.checkedout() == 0
    finally:
        await proxy.close()
        await store.engine.dispose(close=False)
    assert len((await _snapshot(pg_url))[0]) == 1


async def test_write_returns_each_items_running_spend(db_url: str, store: Store) -> None:
    """write() returns, per item in batch order, each window's spent total right after that item."""
    a, b = _record(cost_nanousd=100), _record(cost_nanousd=250)
    results = await store.write([PendingWrite(a, _windows(a)), PendingWrite(b, _windows(b))])
    day = next(k for k in _windows(a) if k.period == "day")
    assert results[0] is not None and results[1] is not None
    assert results[0][day] == 100
    assert results[1][day] == 350
    c = _record(cost_nanousd=None)
    (result,) = await store.write([PendingWrite(c, _windows(c))])
    assert result is not None and result[day] == 350


async def test_an_empty_batch_writes_nothing_on_every_backend(db_url: str, store: Store) -> None:
    """An empty batch is no write: no row, no error, on a file, on PostgreSQL and in memory (where
    SQLite's executemany of no rows raised)."""
    assert await store.write([]) == []
    assert await _snapshot(db_url) == ([], [])
    memory = Store("sqlite+aiosqlite:///:memory:")
    await memory.migrate()
    try:
        assert await memory.write([]) == []
        record = _record(cost_nanousd=100)
        (result,) = await memory.write([PendingWrite(record, _windows(record))])
        assert result is not None and result[_day_key(record)] == 100
    finally:
        await memory.close()


async def test_stored_times_come_back_as_aware_utc(db_url: str, store: Store) -> None:
    """occurred_at and window_start are aware UTC datetimes when read back, on every backend."""
    from llm_spend.storage.schema import calls, rollups

    record = _record()
    await store.write([PendingWrite(record, _windows(record))])
    engine = create_async_engine(db_url)
    try:
        async with engine.connect() as conn:
            occurred = (await conn.execute(calls.select())).mappings().one()["occurred_at"]
            starts = [r["window_start"] for r in (await conn.execute(rollups.select())).mappings().all()]
    finally:
        await engine.dispose()
    assert occurred == record.occurred_at
    assert occurred.utcoffset().total_seconds() == 0
    assert set(starts) == {k.start for k in _windows(record)}


async def test_ledger_cost_is_exact_nano_usd(db_url: str, store: Store) -> None:
    """A cost with nine decimals survives the database exactly."""
    record = _record(cost_nanousd=123_456_789_012)
    await store.write([PendingWrite(record, _windows(record))])
    rows = await scalar_rows(db_url, "SELECT cost_nanousd FROM llm_calls")
    assert rows == [(123_456_789_012,)]
    assert from_nanousd(rows[0][0]) == Decimal("123.456789012")


def test_sqlite_uses_wal(sqlite_url: str) -> None:
    """A SQLite ledger is in WAL journal mode once the tracker has run."""

    async def run() -> None:
        async with Tracker(sqlite_url) as tracker:
            await tracker.track(provider="openai", model="gpt-4o", input_tokens=1, output_tokens=1)

    asyncio.run(run())
    path = make_url(sqlite_url).database
    assert path is not None
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"


async def test_a_sqlite_read_left_open_blocks_no_writer(sqlite_url: str) -> None:
    """A read transaction (a report, a dashboard export a slow client streams) takes no write lock:
    another process's writer and the tracker's own writes and reservations go on meanwhile."""
    from llm_spend import Budget

    async with Tracker(sqlite_url, budgets=[Budget.daily(100, mode="block")]) as tracker:
        await tracker.track(provider="openai", model="gpt-4o", input_tokens=1, output_tokens=1)
        async with tracker.store.engine.connect() as reading:
            assert (await reading.execute(text("SELECT count(*) FROM llm_calls"))).scalar_one() == 1
            path = make_url(sqlite_url).database
            assert path is not None
            with closing(sqlite3.connect(path, timeout=0, isolation_level=None)) as other:
                other.execute("BEGIN IMMEDIATE")  # raised "database is locked" when reads began IMMEDIATE
                other.execute("ROLLBACK")
            # a hang guard, not a timing assertion: blocked, these waited 30 s for the busy timeout
            async with asyncio.timeout(20):
                await tracker.track(provider="openai", model="gpt-4o", input_tokens=1, output_tokens=1)
                async with tracker.guard(
                    provider="openai", model="gpt-4o", input_tokens=10, max_output_tokens=10
                ) as call:
                    await call.record(Usage(input_tokens=10, output_tokens=10))
            assert (
                await reading.execute(text("SELECT count(*) FROM llm_calls"))
            ).scalar_one() == 1  # its snapshot
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM llm_calls").fetchone()[0] == 3


async def test_sqlite_uri_filenames_are_the_files_they_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLAlchemy's URI filenames (`?uri=true`): a shared in-memory database records in memory, with
    nothing written to the working directory; `file:/abs/path` writes that file (its WAL checkpointed,
    its spool beside it)."""
    monkeypatch.chdir(tmp_path)
    call = {"provider": "openai", "model": "gpt-4o-mini", "input_tokens": 10, "output_tokens": 5}
    async with Tracker("sqlite+aiosqlite:///file::memory:?cache=shared&uri=true") as memory:
        await memory.track(**call)
        rows = await memory.report(start=datetime(2000, 1, 1, tzinfo=UTC))
        assert not memory.outage and [row.calls for row in rows] == [1]
    assert os.listdir(tmp_path) == []

    ledger = tmp_path / "data" / "ledger.db"
    ledger.parent.mkdir()
    async with Tracker(f"sqlite+aiosqlite:///file:{ledger}?uri=true") as on_file:
        await on_file.track(**call)
        assert on_file.spool.path == ledger.with_name("ledger.db.spool")
    with closing(sqlite3.connect(ledger)) as conn:
        assert conn.execute("SELECT count(*) FROM llm_calls").fetchone()[0] == 1
    assert sorted(os.listdir(tmp_path)) == ["data"]


# -- SQLite files: the write thread and the loop's own connection -------------------------------------


def _day_key(record: CallRecord) -> WindowKey:
    return next(key for key in _windows(record) if key.period == "day")


async def test_writes_waiting_for_a_lock_commit_together_and_each_alone(sqlite_url: str) -> None:
    """While another process holds the write lock, writes queue on the thread; once it lets go they
    commit in one transaction, each in its own savepoint: a ledger write the database refuses (a
    trigger) and a refused reservation change nothing, while the others around them all commit."""
    store = Store(sqlite_url)
    await store.migrate()
    path = str(make_url(sqlite_url).database)
    with closing(sqlite3.connect(path)) as conn:
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON llm_calls WHEN NEW.model = 'refused-model' "
            "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        )
        conn.commit()
    good, bad, later = _record(), _record(), _record(cost_nanousd=1_000)
    bad = CallRecord(**{**{f: getattr(bad, f) for f in bad.__slots__}, "model": "refused-model"})
    day = _day_key(good)
    now = datetime.now(UTC)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        pending = [
            asyncio.ensure_future(store.write([PendingWrite(good, _windows(good))])),
            store.reserve("r-fits", [(day, 400, 1_000)], now=now, expires_at=now),
            asyncio.ensure_future(store.write([PendingWrite(bad, _windows(bad))])),
            store.reserve("r-too-big", [(day, 700, 1_000)], now=now, expires_at=now),
            asyncio.ensure_future(store.write([PendingWrite(later, _windows(later))])),
        ]
        await asyncio.sleep(0.2)
        assert not any(item.done() for item in pending)  # all wait for the lock
        holder.execute("COMMIT")
        results = await asyncio.gather(*pending, return_exceptions=True)
    finally:
        holder.close()
        await store.close()
    assert results[0] == [{day: 6_000_000, _windows(good)[1]: 6_000_000}]
    assert results[1] is None
    assert isinstance(results[2], sqlite3.IntegrityError)
    assert results[3] is not None and results[3].key == day and results[3].reserved == 400
    assert results[4] is not None and results[4][0] is not None
    calls, rollups = await _snapshot(sqlite_url)
    assert sorted(r[0] for r in calls) == sorted([good.event_id, later.event_id])
    assert {(r[0], r[3], r[4], r[5]) for r in rollups} == {
        ("day", 6_001_000, 400, 2),
        ("month", 6_001_000, 0, 2),
    }
    assert await scalar_rows(sqlite_url, "SELECT id FROM llm_spend_reservations") == [("r-fits",)]


async def test_the_wal_is_checkpointed_and_restarted_while_writes_go_on(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small writes commit on the loop's connection, which never checkpoints; the thread does, and
    past the WAL cap it restarts the WAL, so the file stops growing however long writes go on."""
    from llm_spend.storage import sqlite_file

    monkeypatch.setattr(sqlite_file, "_WAL_CAP", 256 << 10)
    store = Store(sqlite_url)
    await store.migrate()
    wal = str(make_url(sqlite_url).database) + "-wal"
    sizes = []
    try:
        for n in range(1_500):
            record = _record()
            await store.write([PendingWrite(record, _windows(record))])
            if n % 100 == 99:
                await asyncio.sleep(0.05)  # the thread's checkpoint runs beside the writes
                sizes.append(await asyncio.to_thread(os.path.getsize, wal))
    finally:
        await store.close()
    assert max(sizes) < 6 << 20, sizes  # 1,500 writes of ~6 pages each: ~36 MB unchecked
    assert await scalar_rows(sqlite_url, "SELECT COUNT(*) FROM llm_calls") == [(1_500,)]


def test_a_start_on_the_newest_schema_does_not_load_alembic(sqlite_url: str) -> None:
    """Entering a tracker whose database is already at the newest revision reads the revision and
    leaves Alembic unimported (half a second and ~20,000 objects saved at every start)."""
    script = (
        "import asyncio, sys\n"
        "from llm_spend import Tracker\n"
        "async def main():\n"
        f"    async with Tracker({sqlite_url!r}) as tracker:\n"
        "        await tracker.track(provider='openai', model='gpt-4o', input_tokens=1, output_tokens=1)\n"
        "asyncio.run(main())\n"
        "print('alembic' in sys.modules)\n"
    )
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert first.stdout.strip() == "True"  # the first start migrated
    assert second.stdout.strip() == "False"


async def test_a_postgresql_write_returns_only_the_totals_a_budget_judges(pg_url: str) -> None:
    """PostgreSQL: a tracker's writes bring back a window's total only once it reached the smallest
    limit of a budget on such windows (below it no budget judges it, and reading it back cost each
    write's lane its answer's rows); a window no budget watches never comes back. The budgets judge
    as before: a user's crossing raises and marks the user's block window exhausted, and the global
    crossing notifies."""
    crossings: list[Any] = []
    budgets = [
        llm_spend.Budget.daily(Decimal("0.1"), mode="notify"),
        llm_spend.Budget.daily(Decimal("0.05"), per="user_id", mode="raise"),
        llm_spend.Budget.daily(Decimal("0.06"), per="user_id", mode="block"),
    ]
    async with Tracker(pg_url, budgets=budgets, on_exceeded=crossings.append) as tracker:
        assert tracker.store.watch == {("day", ""): 100_000_000, ("day", "user_id"): 50_000_000}

        async def write(user: str, input_tokens: int, output_tokens: int) -> Any:
            usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
            record = tracker._recorder.build(
                provider="openai", model="gpt-4o", usage=usage, usage_source="manual", tags={"user_id": user}
            )
            windows = tracker.budget_guard.windows(record.tags, record.occurred_at)
            assert len(windows) == 3  # the global day and month, the user's day
            [view] = await tracker.store.write([PendingWrite(record, windows)])
            return windows, view

        assert (await write("ann", 4_000, 50))[1] == {}  # $0.0105: under every limit
        with pytest.raises(llm_spend.BudgetExceeded) as raised:  # $0.0525 more for ann
            await tracker.track(provider="openai", model="gpt-4o", input_tokens=20_000, output_tokens=250,
                                tags={"user_id": "ann"})  # fmt: skip
        assert raised.value.scope_value == "ann" and raised.value.spent == Decimal("0.063")
        assert tracker.preflight({"user_id": "ann"}) is not None  # $0.063 >= $0.06: exhausted
        assert crossings == []
        await tracker.track(provider="openai", model="gpt-4o", input_tokens=16_000, output_tokens=200,
                            tags={"user_id": "bob"})  # fmt: skip  # $0.042: the global day to $0.105
        assert [(c.scope_value, c.spent) for c in crossings] == [(None, Decimal("0.105"))]
        windows, view = await write("bob", 100, 1)  # $0.00026
        assert view == {windows[0]: 105_260_000}  # the global day alone: bob's is under $0.05
