"""Target 4's PostgreSQL guarded call at calmer densities than `bench/guard.py`'s, and one at a time.

`bench/guard.py` measures target 4 with provider calls of 10-30 ms: 16 calls in flight make about
700 guarded calls a second on one process. Real LLM calls take 0.3-30 s, so 16 of them in flight
make 0.5-50 calls a second. This runs the same load with slower providers (16 in flight), and then
100 calls one at a time, each load in `rounds` rounds interleaved with the raw two lanes
(`bench/pg_cycles.py`, the tracker's shape by raw asyncpg), in an order that alternates; it prints
the medians of the rounds' p50 and p99, calls a second, and each round's p50.

Last, what a round trip to the server costs after the process sat idle: `SELECT 1` and a one-row
autocommitted insert, each after a pause of 0, 2, 20 and 200 ms (p50). On a virtual machine whose
idle vCPUs halt at once (no halt polling), a wake-up from idle is far dearer than a busy loop's.

Not part of `make bench` (about six minutes with 3 rounds).
Run: .venv/bin/python bench/guard_density.py [rounds]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Callable

import asyncpg
from guard import CONCURRENCY, drop, guard_times, percentile, pg_database
from pg_cycles import cycle_times
from sqlalchemy.engine import make_url

LOADS: dict[str, tuple[tuple[float, float], int, int]] = {
    # name: (provider seconds, calls in flight, calls)
    "10-30 ms": ((0.010, 0.030), CONCURRENCY, 1_600),
    "30-90 ms": ((0.030, 0.090), CONCURRENCY, 1_600),
    "100-300 ms": ((0.100, 0.300), CONCURRENCY, 1_600),
    "one at a time, 150-250 ms": ((0.150, 0.250), 1, 100),
}
PAUSES = (0.0, 0.002, 0.020, 0.200)
_INSERT = "INSERT INTO density_trips (v) VALUES ('x')"


def load_rounds(url: str, provider: tuple[float, float], concurrency: int, calls: int, rounds: int) -> str:
    tracker: list[tuple[float, float, float]] = []
    lanes: list[tuple[float, float]] = []
    for n in range(rounds):

        def ours() -> None:
            added, rate = asyncio.run(guard_times(url, provider, concurrency, calls))
            tracker.append((statistics.median(added), percentile(added, 0.99), rate))

        def raw() -> None:
            times = asyncio.run(cycle_times(url, "2 lanes", provider, concurrency, calls))
            lanes.append((statistics.median(times), percentile(times, 0.99)))

        steps: list[Callable[[], None]] = [ours, raw] if n % 2 == 0 else [raw, ours]
        for step in steps:
            step()
    p50, p99, rate = (statistics.median(column) for column in zip(*tracker, strict=True))
    raw50, raw99 = (statistics.median(column) for column in zip(*lanes, strict=True))
    each = ", ".join(f"{t[0] * 1e3:.2f}/{r[0] * 1e3:.2f}" for t, r in zip(tracker, lanes, strict=True))
    return f"{rate:>9,.0f}{p50 * 1e3:>9.2f}{p99 * 1e3:>9.2f}{raw50 * 1e3:>9.2f}{raw99 * 1e3:>9.2f}  {each}"


async def round_trips(url: str) -> list[str]:
    """p50 µs of `SELECT 1` and of a one-row autocommitted insert, after each pause."""
    parsed = make_url(url)
    conn = await asyncpg.connect(host=parsed.host, port=parsed.port or 5432, user=parsed.username,
                                 database=parsed.database)  # fmt: skip
    lines = []
    try:
        await conn.execute("CREATE TABLE density_trips (id bigserial PRIMARY KEY, v text)")
        for pause in PAUSES:
            select, insert = [], []
            for _ in range(60 if pause >= 0.2 else 300):
                for times, sql in ((select, "SELECT 1"), (insert, _INSERT)):
                    if pause:
                        await asyncio.sleep(pause)
                    started = time.perf_counter()
                    await conn.execute(sql)
                    times.append(time.perf_counter() - started)
            select_us, insert_us = statistics.median(select) * 1e6, statistics.median(insert) * 1e6
            lines.append(f"  after {pause * 1e3:>3.0f} ms idle: SELECT 1 {select_us:>5.0f} µs, "
                         f"insert + commit {insert_us:>5.0f} µs")  # fmt: skip
    finally:
        await conn.close()
    return lines


def main(rounds: int) -> None:
    pg = asyncio.run(pg_database())
    if pg is None:
        print("guard_density: no PostgreSQL server answers, skipped")
        return
    print(f"guarded calls on PostgreSQL by density, medians of {rounds} rounds (tracker / raw two lanes)")
    heads = "".join(f"{head:>9}" for head in ("calls/s", "p50 ms", "p99 ms", "raw p50", "raw p99"))
    print(f"  {'provider':<27}{heads}  rounds' p50")
    try:
        for name, (provider, concurrency, calls) in LOADS.items():
            print(f"  {name:<27}{load_rounds(pg[0], provider, concurrency, calls, rounds)}", flush=True)
        print("a round trip to the server after the process sat idle (p50)")
        for line in asyncio.run(round_trips(pg[0])):
            print(line)
    finally:
        asyncio.run(drop(pg[1]))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
