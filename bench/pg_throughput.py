"""track() on PostgreSQL against raw asyncpg executemany of the same rows (issue 8, target 2).

20,000 calls in waves of 2,000 concurrent track() calls, next to raw asyncpg writing the same ledger
rows and the same day/month rollup upserts in batches of 500, one transaction per batch, each on a
fresh database with llm-spend's schema. Skips (and says so) without a server.
Run: .venv/bin/python bench/pg_throughput.py
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from datetime import UTC, datetime

import asyncpg
from guard import drop, pg_database
from run import BATCH, CALL_COLUMNS, CALLS, SUMS, bench_track, sample_row
from sqlalchemy.engine import make_url

from llm_spend.storage.store import Store
from llm_spend.usage import CallRecord

RUNS = 3
_INSERT = f"INSERT INTO llm_calls ({CALL_COLUMNS}) VALUES ({', '.join(f'${i}' for i in range(1, 21))})"
_UPSERT = (
    f"INSERT INTO llm_spend_rollups (period, window_start, scope_key, scope_value, {', '.join(SUMS)}) "
    f"VALUES ($1, $2, '', '', {', '.join(f'${i}' for i in range(3, 3 + len(SUMS)))}) "
    "ON CONFLICT (period, window_start, scope_key, scope_value) DO UPDATE SET "
    + ", ".join(f"{name} = llm_spend_rollups.{name} + excluded.{name}" for name in SUMS)
)


async def raw_asyncpg(url: str, sample: CallRecord) -> float:
    """calls/s of asyncpg executemany writing the rows track() writes: ledger + day/month rollups."""
    store = Store(url)
    await store.migrate()
    await store.close()
    parsed = make_url(url)
    conn = await asyncpg.connect(
        host=parsed.host, port=parsed.port or 5432, user=parsed.username, database=parsed.database
    )
    same, tags, sums = sample_row(sample)
    started = time.perf_counter()
    for _ in range(CALLS // BATCH):
        day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        rows = [(str(uuid.uuid4()), datetime.now(UTC), *same, tags) for _ in range(BATCH)]
        async with conn.transaction():
            await conn.executemany(_INSERT, rows)
            await conn.executemany(_UPSERT, [("day", day, *sums), ("month", day.replace(day=1), *sums)])
    elapsed = time.perf_counter() - started
    count = await conn.fetchval("SELECT count(*) FROM llm_calls")
    await conn.close()
    if count != CALLS:
        raise RuntimeError(f"raw asyncpg wrote {count} rows, expected {CALLS}")
    return CALLS / elapsed


async def main() -> None:
    tracked, raw = [], []
    for _ in range(RUNS):
        for which in ("track", "raw"):
            database = await pg_database()
            if database is None:
                print("no PostgreSQL server answers: skipped")
                return
            url, name = database
            try:
                if which == "track":
                    calls_per_s, sample = await bench_track(url)
                    tracked.append(calls_per_s)
                else:
                    raw.append(await raw_asyncpg(url, sample))
            finally:
                await drop(name)
    t, r = statistics.median(tracked), statistics.median(raw)
    print(f"track() throughput on PostgreSQL: {CALLS:,} calls in waves of 2,000, median of {RUNS} runs")
    print(f"  {'llm-spend tracker.track()':<50}{t:11,.0f} calls/s")
    print(f"  {f'raw asyncpg executemany, batches of {BATCH}':<50}{r:11,.0f} calls/s")
    print(f"  {'track() / raw asyncpg':<50}{t / r:11.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
