"""What a block-mode guard adds to a call: reserve + settle, p50 and p99, 16 calls in flight.

Each guarded call reserves its estimate (one transaction of conditional updates), then records its
usage (settled in the group-committed ledger write). The "call" itself is an `asyncio.sleep(0)`,
so the figures are the guard's own cost. Run: .venv/bin/python bench/guard.py [--pg URL]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url

from llm_spend import Budget, Tracker, Usage

CONCURRENCY, CALLS = 16, 1_600
PG_URL = os.environ.get("LLM_SPEND_TEST_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")


async def guarded_latencies(url: str) -> list[float]:
    """Seconds per guarded call (reserve, call, record) with CONCURRENCY calls in flight."""
    budgets = [Budget.daily(1_000_000, mode="block"), Budget.daily(1_000, per="user_id", mode="block")]
    latencies: list[float] = []
    async with Tracker(url, budgets=budgets) as tracker:

        async def worker(n: int) -> None:
            for i in range(CALLS // CONCURRENCY):
                started = time.perf_counter()
                async with tracker.guard(
                    provider="openai",
                    model="gpt-4o-mini",
                    input_tokens=400,
                    max_output_tokens=200,
                    tags={"user_id": f"u{(n * 7 + i) % 50}"},
                ) as call:
                    await asyncio.sleep(0)
                    await call.record(Usage(input_tokens=300, output_tokens=100))
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker(n) for n in range(CONCURRENCY)))
    return latencies


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


async def run() -> list[tuple[str, float, float]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lat = await guarded_latencies(f"sqlite+aiosqlite:///{Path(tmp) / 'guard.db'}")
        rows.append(("SQLite file (WAL)", statistics.median(lat), percentile(lat, 0.99)))
    pg = await pg_database()
    if pg is not None:
        try:
            lat = await guarded_latencies(pg[0])
            rows.append(("PostgreSQL", statistics.median(lat), percentile(lat, 0.99)))
        finally:
            await drop(pg[1])
    return rows


def report() -> None:
    print(f"guarded call: reserve + settle, {CONCURRENCY} in flight, {CALLS} calls")
    print(f"  {'database':<22}{'p50 ms':>10}{'p99 ms':>10}")
    for name, p50, p99 in asyncio.run(run()):
        print(f"  {name:<22}{p50 * 1e3:>10.2f}{p99 * 1e3:>10.2f}")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__).parse_args()
    report()
