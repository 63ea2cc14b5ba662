"""Where the event loop's time goes during target 4's PostgreSQL load: the tracker against the raw lanes.

A diagnostic, not a target figure (not in `make bench`). It runs `bench/guard.py`'s PostgreSQL load
(16 guarded calls in flight, provider calls of 10-30 ms, 1,600 calls after a warm-up wave) with the
tracker, then `bench/pg_cycles.py`'s raw two lanes, with every callback the event loop runs timed and
named by what it steps (a task's coroutine, else the callback), and every `transport.write` timed (a
statement's send). It prints, per call, the loop's busy time by callback and how many callbacks ran,
and the sends' p50, p90 and mean. The timing adds about 0.3 µs per callback.

Run: .venv/bin/python bench/loop_time.py [low high]  (the provider calls' range in ms; 10 30 if not given)
"""

from __future__ import annotations

import asyncio
import asyncio.events
import collections
import random
import statistics
import sys
import time
from asyncio import selector_events
from collections.abc import Callable, Coroutine
from typing import Any

import guard
import pg_cycles

from llm_spend import Tracker

busy: collections.Counter[str] = collections.Counter()
runs: collections.Counter[str] = collections.Counter()
sends: list[int] = []
_run = asyncio.events.Handle._run
_write = selector_events._SelectorSocketTransport.write
PROVIDER = (0.010, 0.030)


def _name(callback: Any) -> str:
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        return f"task {owner.get_coro().__qualname__}"  # type: ignore[union-attr]
    return getattr(callback, "__qualname__", type(callback).__name__)


def timed_run(handle: asyncio.events.Handle) -> None:
    started = time.perf_counter_ns()
    try:
        _run(handle)
    finally:
        name = _name(handle._callback)  # type: ignore[attr-defined]
        busy[name] += time.perf_counter_ns() - started
        runs[name] += 1


def timed_write(transport: Any, data: Any) -> None:
    started = time.perf_counter_ns()
    try:
        _write(transport, data)
    finally:
        sends.append(time.perf_counter_ns() - started)


async def tracker_load(url: str) -> None:
    rng = random.Random(7)
    async with Tracker(url, budgets=guard.budgets()) as tracker:

        async def worker(n: int, calls: int) -> None:
            for i in range(calls):
                await guard.guarded_call(tracker, n, i, rng.uniform(*PROVIDER))

        await asyncio.gather(*(worker(n, 50) for n in range(guard.CONCURRENCY)))  # warm-up
        each = guard.CALLS // guard.CONCURRENCY
        await measured(asyncio.gather(*(worker(n, each) for n in range(guard.CONCURRENCY))))


async def raw_load(url: str) -> None:
    await pg_cycles.cycle_times(url, "2 lanes", PROVIDER)  # warm-up
    await measured(pg_cycles.cycle_times(url, "2 lanes", PROVIDER))


async def measured(load: Any) -> None:
    busy.clear(), runs.clear(), sends.clear()
    asyncio.events.Handle._run = timed_run  # type: ignore[method-assign]
    selector_events._SelectorSocketTransport.write = timed_write  # type: ignore[method-assign]
    try:
        await load
    finally:
        asyncio.events.Handle._run = _run  # type: ignore[method-assign]
        selector_events._SelectorSocketTransport.write = _write  # type: ignore[method-assign]


def report(title: str) -> None:
    calls = guard.CALLS
    print(f"  {title}: loop busy {sum(busy.values()) / calls / 1e3:.0f} µs a call, "
          f"{sum(runs.values()) / calls:.1f} callbacks a call")  # fmt: skip
    for name, ns in busy.most_common(8):
        print(f"    {ns / calls / 1e3:7.1f} µs a call  {runs[name] / calls:5.2f} runs a call  "
              f"{ns / runs[name] / 1e3:6.1f} µs a run  {name}")  # fmt: skip
    sends.sort()
    p50, p90, mean = sends[len(sends) // 2], sends[len(sends) * 9 // 10], statistics.mean(sends)
    print(f"    sends: {len(sends) / calls:.2f} a call, p50 {p50 / 1e3:.1f} µs, p90 {p90 / 1e3:.1f} µs, "
          f"mean {mean / 1e3:.1f} µs")  # fmt: skip


def main() -> None:
    global PROVIDER
    if len(sys.argv) == 3:
        PROVIDER = (float(sys.argv[1]) / 1e3, float(sys.argv[2]) / 1e3)
    loads: tuple[tuple[str, Callable[[str], Coroutine[Any, Any, None]]], ...] = (
        ("tracker", tracker_load),
        ("raw two lanes", raw_load),
    )
    low, high = (round(s * 1e3) for s in PROVIDER)
    print(f"the event loop's time during target 4's PostgreSQL load (16 in flight, provider {low}-{high} ms)")
    for title, load in loads:
        pg = asyncio.run(guard.pg_database())
        if pg is None:
            print("loop_time: no PostgreSQL server answers, skipped")
            return
        try:
            asyncio.run(load(pg[0]))
        finally:
            asyncio.run(guard.drop(pg[1]))
        report(title)


if __name__ == "__main__":
    main()
