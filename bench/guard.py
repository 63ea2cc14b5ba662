"""What a block-mode guard adds to a call: reserve + settle, p50 and p99, 16 calls in flight.

Each guarded call reserves its estimate (`tracker.guard()`), makes the "provider call" (a sleep),
and records its usage (`await call.record(...)`, settled in the group-committed ledger write, and
awaited until it committed). What the guard adds to the call is measured inside each call: the
time to enter the guard (the reservation) plus the time from the record to leaving the guard (the
settlement), so the provider's own time is left out exactly. Two loads, on each database:

- "provider 10-30 ms": 16 calls in flight, each provider call sleeping a random 10-30 ms (real LLM
  calls take 0.3-30 s, so this is a denser load than any real one: about 800 calls/s);
- "back to back": 16 workers with no provider time at all. The guard's time is then the whole
  call, and with 16 of them queued on one process it measures throughput more than latency
  (latency = 16 x the time each call holds the event loop and the database).

Next to them, in the same run, the floor the database sets: one committed write transaction by the
raw driver (sqlite3 on its thread with the same pragmas; asyncpg autocommit), p50 of 400, one at a
time. A reservation and a settlement are two commits, so 2 x that floor is what no guard can beat
one call at a time. On PostgreSQL, under each load, also the same two commits per call made by raw
asyncpg with no tracker at all ("raw 2 commits"): 16 calls in flight, each on its own connection,
each locking the same rows (the global and the user's day window) as the guard does, in the same
order, with two hand-written statements (reserve: lock, check, add, insert the reservation; settle:
insert the ledger row, upsert the four rollups, delete the reservation). That is the floor under
load: the row locks every call shares, held through each commit's flush. Under the first load, also
"raw 2 lanes": the tracker's own shape (each stream of statements group-committed on one connection)
made by raw asyncpg, as `bench/pg_cycles.py` makes it; that is the floor the tracker is held to
(docs/performance.md, nineteenth session). That load (target 4's) runs in ROUNDS rounds on
PostgreSQL, each the tracker's then the raw lanes', and the medians of the rounds are printed with
each round's p50 and the median ratio: a single load's p50 moves by tenths of a millisecond from
one minute to the next on a shared machine.
Run: .venv/bin/python bench/guard.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sqlite3
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from llm_spend import Budget, Tracker, Usage

CONCURRENCY, CALLS = 16, 1_600
ROUNDS = 3
"""Rounds of target 4's PostgreSQL load, interleaved with its raw floor (`pg_rounds`)."""
PG_URL = os.environ.get("LLM_SPEND_TEST_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
LOADS = {"provider 10-30 ms": (0.010, 0.030), "back to back": (0.0, 0.0)}


def budgets() -> list[Budget]:
    """The load's block-mode budgets: a global and a per-user daily one, neither ever reached."""
    return [Budget.daily(1_000_000, mode="block"), Budget.daily(1_000, per="user_id", mode="block")]


async def guarded_call(tracker: Tracker, n: int, i: int, wait: float) -> tuple[float, float]:
    """Worker n's i-th guarded call, its provider call a sleep of `wait` seconds: the seconds the
    guard took to enter (the reservation) and from the record to leaving it (the settlement)."""
    started = time.perf_counter()
    async with tracker.guard(
        provider="openai",
        model="gpt-4o-mini",
        input_tokens=400,
        max_output_tokens=200,
        tags={"user_id": f"u{(n * 7 + i) % 50}"},
    ) as call:
        reserved = time.perf_counter()
        await asyncio.sleep(wait)
        answered = time.perf_counter()
        await call.record(Usage(input_tokens=300, output_tokens=100))
    return reserved - started, time.perf_counter() - answered


async def guard_times(
    url: str, provider: tuple[float, float], concurrency: int = CONCURRENCY, calls: int = CALLS
) -> tuple[list[float], float]:
    """Seconds the guard added to each call, and calls/s, with `concurrency` calls in flight."""
    added: list[float] = []
    rng = random.Random(7)
    async with Tracker(url, budgets=budgets()) as tracker:

        async def worker(n: int) -> None:
            for i in range(calls // concurrency):
                added.append(sum(await guarded_call(tracker, n, i, rng.uniform(*provider))))

        began = time.perf_counter()
        await asyncio.gather(*(worker(n) for n in range(concurrency)))
        rate = calls / (time.perf_counter() - began)
    return added, rate


def sqlite_commit_floor(path: Path) -> float:
    """p50 seconds of one committed single-row transaction on a sqlite3 thread, awaited."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL"):
        conn.execute(f"PRAGMA {pragma}")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")

    def one() -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t (v) VALUES ('x')")
        conn.execute("COMMIT")

    async def run() -> float:
        times = []
        for _ in range(400):
            started = time.perf_counter()
            await asyncio.to_thread(one)
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    try:
        return asyncio.run(run())
    finally:
        conn.close()


async def pg_commit_floor(url: str) -> float:
    """p50 seconds of one autocommitted single-row insert by raw asyncpg."""
    parsed = make_url(url)
    conn = await asyncpg.connect(
        host=parsed.host, port=parsed.port or 5432, user=parsed.username, database=parsed.database
    )
    try:
        await conn.execute("CREATE TABLE bench_floor (id bigserial PRIMARY KEY, v text)")
        times = []
        for _ in range(400):
            started = time.perf_counter()
            await conn.execute("INSERT INTO bench_floor (v) VALUES ('x')")
            times.append(time.perf_counter() - started)
        return statistics.median(times)
    finally:
        await conn.close()


_RAW_RESERVE = """
WITH locked AS (
    SELECT k, spent + reserved + $1 <= lim AS ok FROM floor_windows
    WHERE k = ANY($2::text[]) ORDER BY k COLLATE "C" FOR UPDATE
),
granted AS (
    UPDATE floor_windows w SET reserved = w.reserved + $1 FROM locked l
    WHERE w.k = l.k AND (SELECT bool_and(ok) FROM locked) RETURNING 1
),
kept AS (
    INSERT INTO floor_reservations (id, amount) SELECT $3, $1
    WHERE (SELECT count(*) FROM granted) = cardinality($2::text[]) RETURNING 1
)
SELECT count(*) FROM kept
"""
_RAW_SETTLE = """
WITH ledger AS (INSERT INTO floor_ledger (event_id, cost) VALUES ($1, $2) RETURNING 1),
released AS (DELETE FROM floor_reservations WHERE id = $1 RETURNING amount),
rollups AS (
    INSERT INTO floor_windows (k, spent, reserved, lim)
    SELECT k, $2, 0, 9223372036854775807 FROM unnest($3::text[]) AS k
    ON CONFLICT (k) DO UPDATE SET spent = floor_windows.spent + excluded.spent,
        reserved = floor_windows.reserved
            - CASE WHEN floor_windows.k LIKE 'day:%' THEN (SELECT amount FROM released) ELSE 0 END
    RETURNING 1
)
SELECT count(*) FROM rollups
"""


FLOOR_USERS = 50


async def floor_tables(conn: Any) -> None:
    """(Re)make the raw floors' tables: windows (one a period, global and per user), reservations and
    the ledger."""
    await conn.execute(
        "DROP TABLE IF EXISTS floor_windows, floor_reservations, floor_ledger;"
        " CREATE TABLE floor_windows (k text PRIMARY KEY, spent bigint NOT NULL DEFAULT 0,"
        " reserved bigint NOT NULL DEFAULT 0, lim bigint NOT NULL);"
        " CREATE TABLE floor_reservations (id text PRIMARY KEY, amount bigint NOT NULL);"
        " CREATE TABLE floor_ledger (id bigserial PRIMARY KEY, event_id text UNIQUE, cost bigint)"
    )
    users = ["", *(f"u{u}" for u in range(FLOOR_USERS))]
    await conn.execute(
        "INSERT INTO floor_windows (k, lim) SELECT k, 1000000000000000000 FROM unnest($1::text[]) AS k",
        [f"{period}:{user}" for period in ("day", "month") for user in users],
    )


async def pg_raw_floor(url: str, provider: tuple[float, float]) -> list[float]:
    """Seconds the two commits of a guarded call take by raw asyncpg, with no tracker: the same load,
    the same rows locked in the same order (see the module docstring)."""
    parsed = make_url(url)
    pool = await asyncpg.create_pool(
        host=parsed.host, port=parsed.port or 5432, user=parsed.username, database=parsed.database,
        min_size=CONCURRENCY, max_size=CONCURRENCY,
    )  # fmt: skip
    try:
        async with pool.acquire() as conn:
            await floor_tables(conn)
        added: list[float] = []
        rng = random.Random(7)

        async def worker(n: int) -> None:
            for i in range(CALLS // CONCURRENCY):
                wait, user = rng.uniform(*provider), f"u{(n * 7 + i) % FLOOR_USERS}"
                day, month = sorted(["day:", f"day:{user}"]), sorted(["month:", f"month:{user}"])
                event = uuid.uuid4().hex
                started = time.perf_counter()
                async with pool.acquire() as conn:
                    await conn.fetchval(_RAW_RESERVE, 1_000_000, day, event)
                reserved = time.perf_counter()
                await asyncio.sleep(wait)
                answered = time.perf_counter()
                async with pool.acquire() as conn:
                    await conn.fetchval(_RAW_SETTLE, event, 900_000, sorted(day + month))
                added.append((reserved - started) + (time.perf_counter() - answered))

        async def warm(n: int) -> None:  # each connection parses and plans both statements before the
            # load, as the tracker's lanes do (`warm`), on a window of its own that no call counts in
            async with pool.acquire() as conn:
                await conn.fetchval(_RAW_RESERVE, 0, [f"warm:{n}"], f"warm-{n}")
                await conn.fetchval(_RAW_SETTLE, f"warm-{n}", 0, [f"warm:{n}"])
                await asyncio.sleep(0.05)  # held, so that the 16 warm 16 different connections

        await asyncio.gather(*(warm(n) for n in range(CONCURRENCY)))
        await asyncio.gather(*(worker(n) for n in range(CONCURRENCY)))
        return added
    finally:
        await pool.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def pg_database() -> tuple[str, str] | None:
    """A fresh database on the PostgreSQL server, or None when no server answers."""
    url = make_url(PG_URL)
    name = f"llm_spend_bench_{uuid.uuid4().hex[:8]}"
    try:
        conn = await asyncpg.connect(
            host=url.host, port=url.port or 5432, user=url.username, database=url.database, timeout=5
        )
    except (OSError, asyncpg.PostgresError):
        return None
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    return url.set(database=name).render_as_string(hide_password=False), name


async def drop(name: str) -> None:
    url = make_url(PG_URL)
    conn = await asyncpg.connect(
        host=url.host, port=url.port or 5432, user=url.username, database=url.database
    )
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await conn.close()


def line(database: str, load: str, added: list[float], rate: float) -> str:
    p50, p99 = statistics.median(added) * 1e3, percentile(added, 0.99) * 1e3
    return f"  {database:<12}{load:<20}{p50:>9.2f}{p99:>9.2f}{rate:>10,.0f}"


def pg_rounds(url: str, load: str, provider: tuple[float, float]) -> None:
    """Target 4's load on PostgreSQL: ROUNDS rounds, each the tracker's load and then the same load
    by raw asyncpg in the tracker's own shape (`bench/pg_cycles.py`'s two lanes, the floor it is
    held to); the medians of the rounds' p50, p99 and calls/s, each round's p50 and the median of
    the rounds' ratios. One load's p50 moves by a few tenths of a millisecond from one minute to the
    next on a shared machine; interleaved rounds let both sides meet the same moments."""
    from pg_cycles import cycle_times

    tracker: list[tuple[float, float, float]] = []
    lanes: list[tuple[float, float]] = []
    for _ in range(ROUNDS):
        added, rate = asyncio.run(guard_times(url, provider))
        tracker.append((statistics.median(added), percentile(added, 0.99), rate))
        raw = asyncio.run(cycle_times(url, "2 lanes"))
        lanes.append((statistics.median(raw), percentile(raw, 0.99)))
    p50, p99, rate = (statistics.median(column) for column in zip(*tracker, strict=True))
    print(f"  {'PostgreSQL':<12}{load:<20}{p50 * 1e3:>9.2f}{p99 * 1e3:>9.2f}{rate:>10,.0f}")
    p50, p99 = (statistics.median(column) for column in zip(*lanes, strict=True))
    print(f"  {'PostgreSQL':<12}{'  raw 2 lanes':<20}{p50 * 1e3:>9.2f}{p99 * 1e3:>9.2f}")
    each = ", ".join(f"{t[0] * 1e3:.2f}/{r[0] * 1e3:.2f}" for t, r in zip(tracker, lanes, strict=True))
    ratio = statistics.median(t[0] / r[0] for t, r in zip(tracker, lanes, strict=True))
    print(f"  {'':<12}medians of {ROUNDS} interleaved rounds (p50 ms, tracker/raw 2 lanes: {each})")
    print(f"  {'':<12}tracker / raw 2 lanes, p50, median of the rounds' ratios: {ratio:.2f}x")


def report() -> None:
    print(f"guarded call: what reserve + settle add, {CONCURRENCY} calls in flight, {CALLS:,} calls a load")
    print(f"  {'database':<12}{'load':<20}{'p50 ms':>9}{'p99 ms':>9}{'calls/s':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for n, (load, provider) in enumerate(LOADS.items()):
            added, rate = asyncio.run(guard_times(f"sqlite+aiosqlite:///{Path(tmp) / f'g{n}.db'}", provider))
            print(line("SQLite", load, added, rate))
        floor = sqlite_commit_floor(Path(tmp) / "floor.db")
        print(f"  {'SQLite':<12}{'floor: one commit':<20}{floor * 1e3:>9.2f}")
    for load, provider in LOADS.items():
        pg = asyncio.run(pg_database())
        if pg is None:
            print("  PostgreSQL: no server answers, skipped")
            return
        try:
            if load == "provider 10-30 ms":
                pg_rounds(pg[0], load, provider)
            else:
                added, rate = asyncio.run(guard_times(pg[0], provider))
                print(line("PostgreSQL", load, added, rate))
            floor_times = asyncio.run(pg_raw_floor(pg[0], provider))
            p50, p99 = statistics.median(floor_times) * 1e3, percentile(floor_times, 0.99) * 1e3
            print(f"  {'PostgreSQL':<12}{'  raw 2 commits':<20}{p50:>9.2f}{p99:>9.2f}")
            if load == "back to back":
                floor = asyncio.run(pg_commit_floor(pg[0]))
                print(f"  {'PostgreSQL':<12}{'floor: one commit':<20}{floor * 1e3:>9.2f}")
        finally:
            asyncio.run(drop(pg[1]))


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__).parse_args()
    report()
