"""The sweep of many expired reservations at once: estimates of calls of unknown cost are held until
their windows end, so a month's worth of them expire together (docs/decisions.md §15).

Reserves N reservations through `Store.reserve` (a global and a per-user window, day and month, 1,000
users), all expiring at the end of the month, then times `Store.sweep` just after, with the RSS and the
process's peak RSS (`ru_maxrss`) before and after, on a SQLite file and on PostgreSQL.

Run: .venv/bin/python bench/sweep.py [N]   (default 100,000; about 30 s here)
"""

from __future__ import annotations

import asyncio
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from guard import drop, pg_database

from llm_spend.budgets import window_bounds
from llm_spend.storage.store import SWEEP_CHUNK, Store, WindowKey

USERS = 1_000


def rss_mb() -> tuple[float, float]:
    with open("/proc/self/statm") as statm:
        rss = int(statm.read().split()[1]) * resource.getpagesize() / 2**20
    return rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def run(url: str, n: int) -> str:
    store = Store(url)
    await store.migrate()
    try:
        now = datetime.now(UTC)
        month_end = window_bounds("month", now, UTC)[1]
        starts = {period: window_bounds(period, now, UTC)[0] for period in ("day", "month")}
        for base in range(0, n, 1_000):
            reserving = []
            for i in range(base, min(n, base + 1_000)):
                keys = [
                    WindowKey(period, start, scope_key, scope_value)
                    for period, start in starts.items()
                    for scope_key, scope_value in (("", ""), ("user_id", f"u{i % USERS}"))
                ]
                amounts = [(key, 9_000_000, 10**18) for key in keys]
                reserving.append(store.reserve(f"r{i}", amounts, now=now, expires_at=month_end))
            assert all(refusal is None for refusal in await asyncio.gather(*reserving))
        before = rss_mb()
        started = time.perf_counter()
        released = await store.sweep(month_end + timedelta(seconds=1))
        took = time.perf_counter() - started
        after = rss_mb()
        assert released == n
    finally:
        await store.close()
    return (
        f"{released:,} in {took:.2f} s; RSS {before[0]:.0f} -> {after[0]:.0f} MB, "
        f"peak {before[1]:.0f} -> {after[1]:.0f} MB"
    )


def main(n: int) -> None:
    print(f"sweeping {n:,} expired reservations, {SWEEP_CHUNK} to a transaction")
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite+aiosqlite:///{Path(tmp) / 'sweep.db'}"
        print(f"  SQLite file   {asyncio.run(run(url, n))}")
    pg = asyncio.run(pg_database())
    if pg is None:
        print("  PostgreSQL: no server answers, skipped")
        return
    try:
        print(f"  PostgreSQL    {asyncio.run(run(pg[0], n))}")
    finally:
        asyncio.run(drop(pg[1]))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
