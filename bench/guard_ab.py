"""Guarded calls on PostgreSQL, this checkout against another, in interleaved rounds (issue 8, target 4).

Each round runs `bench/guard.py`'s load (16 calls in flight, a provider call of 10-30 ms, 1,600
calls, a global and a per-user daily block-mode budget) once with each source tree, in an order that
alternates, each in a fresh process and a fresh database, after a first wave that warms the process.
It prints, per tree, the medians over the rounds of: the p50 of what the guard adds (reservation
plus settlement), the p50 of each phase, and the CPU time per call of the process. A change to the
PostgreSQL lanes moves p50 by tenths of a millisecond, less than the hour-to-hour noise of
`make bench`; interleaved rounds are what tell such a change apart.

With `--ledger N`, each fresh database first gets N calls recorded by `track()` (in waves of 2,000,
users spread over 500 tags) and `ANALYZE`d, as a database in use holds them: what the server's
planner decides depends on the tables' statistics (docs/performance.md, twenty-sixth session).

Run: .venv/bin/python bench/guard_ab.py OTHER_SRC [rounds] [--ledger N]
     (OTHER_SRC: a `src` folder, e.g. of `git worktree add /tmp/old <commit>`: /tmp/old/src)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import asyncio, json, random, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import guard
from llm_spend import Tracker


async def fill(url, calls):
    import asyncpg
    from sqlalchemy.engine import make_url

    async with Tracker(url) as tracker:
        for _ in range(0, calls, 2000):
            await asyncio.gather(*(
                tracker.track(provider="openai", model="gpt-4o-mini", input_tokens=300, output_tokens=100,
                              tags={"user_id": f"u{i % 500}"})
                for i in range(2000)
            ))
    parsed = make_url(url)
    conn = await asyncpg.connect(host=parsed.host, port=parsed.port or 5432, user=parsed.username,
                                 database=parsed.database)
    await conn.execute("ANALYZE")
    await conn.close()


async def run(url):
    reserve, settle = [], []
    rng = random.Random(7)
    async with Tracker(url, budgets=guard.budgets()) as tracker:

        async def worker(n):
            for i in range(guard.CALLS // guard.CONCURRENCY):
                took = await guard.guarded_call(tracker, n, i, rng.uniform(0.010, 0.030))
                reserve.append(took[0])
                settle.append(took[1])

        await asyncio.gather(*(worker(n) for n in range(guard.CONCURRENCY)))  # warms the process
        reserve.clear(), settle.clear()
        cpu = time.process_time()
        await asyncio.gather(*(worker(n) for n in range(guard.CONCURRENCY)))
        cpu = (time.process_time() - cpu) / guard.CALLS
    both = [a + b for a, b in zip(reserve, settle)]
    return [statistics.median(v) * 1e3 for v in (both, reserve, settle)] + [cpu * 1e6]


pg = asyncio.run(guard.pg_database())
if pg is None:
    raise SystemExit("no PostgreSQL server answers")
try:
    if int(sys.argv[2]):
        asyncio.run(fill(pg[0], int(sys.argv[2])))
    print(json.dumps(asyncio.run(run(pg[0]))))
finally:
    asyncio.run(guard.drop(pg[1]))
"""


def main(other: str, rounds: int, ledger: int) -> None:
    trees = {"this checkout": str(HERE.parent / "src"), "other": other}
    figures: dict[str, list[list[float]]] = {name: [] for name in trees}
    held = f", a ledger of {ledger:,} calls before each" if ledger else ""
    print(f"guarded calls on PostgreSQL, 16 in flight, provider 10-30 ms{held}; other = {other}")
    print(f"  {'round':<7}" + "".join(f"{name + ' p50 ms':>22}" for name in trees))
    for n in range(rounds):
        for name in list(trees) if n % 2 == 0 else list(trees)[::-1]:
            env = {**os.environ, "PYTHONPATH": trees[name]}
            done = subprocess.run(
                [sys.executable, "-c", CHILD, str(HERE), str(ledger)],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode:
                raise SystemExit(done.stderr[-3000:])
            figures[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  {n + 1:<7}" + "".join(f"{figures[name][-1][0]:>22.2f}" for name in trees), flush=True)
    print("  medians of the rounds:")
    print(f"  {'tree':<16}{'p50 ms':>8}{'reserve':>9}{'settle':>8}{'CPU µs/call':>13}")
    for name, rows in figures.items():
        total, reserve, settle, cpu = (statistics.median(column) for column in zip(*rows, strict=True))
        print(f"  {name:<16}{total:>8.2f}{reserve:>9.2f}{settle:>8.2f}{cpu:>13.0f}")


if __name__ == "__main__":
    args = sys.argv[1:]
    ledger = 0
    if "--ledger" in args:
        at = args.index("--ledger")
        ledger = int(args[at + 1])
        del args[at : at + 2]
    if not args:
        raise SystemExit(__doc__)
    main(args[0], int(args[1]) if len(args) > 1 else 6, ledger)
