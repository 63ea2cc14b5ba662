"""Where target 4's PostgreSQL gap sits: the callers' Python, or the tracker's lanes and statements.

A diagnostic, not a target figure (not in `make bench`). It runs `bench/guard.py`'s PostgreSQL load
(16 calls in flight, provider calls of 10-30 ms, 1,600 calls) in three shapes, in interleaved
rounds whose order rotates:

- "tracker": `tracker.guard()` and `call.record()`, as `bench/guard.py` measures them;
- "lanes only": the tracker's own store and writer, with every call's reservation amounts, record
  (priced) and write built before the load starts, so that a call's timed phases run no Python of
  the caller's: `store.reserve(...)`, awaited, then `writer.submit(...)`, awaited. What it adds
  over the raw lanes is the tracker's lanes and statements alone; what the tracker adds over it is
  the callers' Python (and the loop time it takes from everything else);
- "raw lanes": the same load by raw asyncpg in the tracker's shape (`bench/pg_cycles.py`).

It prints each round's p50 and the medians, and the CPU time per call of this process and of the
local PostgreSQL server's processes (those that ended count once the server reaped them; Linux only).
With `--statements`, also each statement's time in the last round (p50), split in three: from
asyncpg's `_execute` to the statement's send on the socket (building and encoding it), from the send
to the last read of its answer (the server's work, its commit and the loop's delay to read), and from
that read to the lane running again (the wake-up).
"lanes only" reaches inside the tracker (its recorder and guard) for the parts a call is made of.

Run: .venv/bin/python bench/guard_split.py [rounds] [--statements]
"""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import collections
import os
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg.connection
from guard import CALLS, CONCURRENCY, budgets, drop, guard_times, pg_database
from pg_cycles import cycle_times

from llm_spend import Tracker, Usage
from llm_spend.storage.rows import PendingWrite, WindowKey
from llm_spend.usage import new_event_id

LEASE = timedelta(minutes=10)
statements: dict[str, list[tuple[float, float, float]]] = collections.defaultdict(list)


async def lanes_only(url: str) -> list[float]:
    """Seconds the tracker's reservation and write add to each call, the calls built beforehand."""
    async with Tracker(url, budgets=budgets()) as tracker:
        store, guard, recorder = tracker.store, tracker.budget_guard, tracker._recorder
        writer = recorder.writer
        assert writer is not None

        def built(n: int, i: int) -> tuple[str, list[tuple[WindowKey, int, int]], datetime, PendingWrite]:
            tags, at, reservation_id = {"user_id": f"u{(n * 7 + i) % 50}"}, datetime.now(UTC), new_event_id()
            amounts = []
            for rule in guard.rules:  # the load's budgets: all daily, in block mode
                value = rule.scope_value(tags)
                assert value is not None
                start = guard.bounds(rule.budget.period, at)[0]
                amounts.append(
                    (WindowKey(rule.budget.period, start, rule.scope_key, value), 200_000, rule.limit_nanousd)
                )
            amounts.sort()
            usage = Usage(input_tokens=300, output_tokens=100)
            record = recorder.build(provider="openai", model="gpt-4o-mini", usage=usage,
                                    usage_source="manual", tags=tags, occurred_at=at,
                                    event_id=reservation_id)  # fmt: skip
            release = tuple((key, amount) for key, amount, _ in amounts)
            return (
                reservation_id,
                amounts,
                at,
                PendingWrite(record, guard.windows(tags, at), reservation_id, release),
            )

        each = CALLS // CONCURRENCY
        calls = {(n, i): built(n, i) for n in range(CONCURRENCY) for i in range(each)}
        rng = random.Random(7)
        added: list[float] = []

        async def worker(n: int) -> None:
            for i in range(each):
                reservation_id, amounts, at, item = calls[n, i]
                wait = rng.uniform(0.010, 0.030)
                started = time.perf_counter()
                outcome = store.reserve(reservation_id, amounts, now=at, expires_at=at + LEASE)
                refusal = outcome.result() if outcome.done() else await outcome
                assert refusal is None, refusal
                reserved = time.perf_counter()
                await asyncio.sleep(wait)
                answered = time.perf_counter()
                await writer.submit(item)
                added.append((reserved - started) + (time.perf_counter() - answered))

        await asyncio.gather(*(worker(n) for n in range(CONCURRENCY)))
    return added


_execute = asyncpg.connection.Connection._execute
_Socket = asyncio.selector_events._SelectorSocketTransport
_write = _Socket.write
_reads = _Socket._read_ready__get_buffer, _Socket._read_ready__data_received
sent: dict[int, float] = {}
read: dict[int, float] = {}
"""The last send and the last read on each socket (by the transport's id), while statements are timed."""


def _timed_write(self: Any, data: Any) -> None:
    sent[id(self)] = time.perf_counter()
    _write(self, data)


def _timed_reads() -> tuple[Callable[[Any], None], ...]:
    """asyncio's two ways of reading a socket (into a buffer the protocol gives, or a new one),
    each noting when it read."""

    def timed(reading: Callable[[Any], None]) -> Callable[[Any], None]:
        def timed_read(self: Any) -> None:
            read[id(self)] = time.perf_counter()
            reading(self)

        return timed_read

    return tuple(timed(reading) for reading in _reads)


async def _timed_execute(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
    started = time.perf_counter()
    try:
        return await _execute(self, query, *args, **kwargs)
    finally:
        ended, socket = time.perf_counter(), id(self._transport)
        send, answer = sent.get(socket, started), read.get(socket, ended)
        statements[" ".join(query.split())[:48]].append((send - started, answer - send, ended - answer))


def _timing(on: bool) -> None:
    """Time every statement (`_timed_execute`) from now on (their times so far forgotten), or none."""
    if on:
        statements.clear()
        sent.clear()
        read.clear()
    asyncpg.connection.Connection._execute = _timed_execute if on else _execute  # type: ignore[method-assign]
    _Socket.write = _timed_write if on else _write  # type: ignore[method-assign]
    reads = _timed_reads() if on else _reads
    _Socket._read_ready__get_buffer, _Socket._read_ready__data_received = reads  # type: ignore[method-assign]


def server_cpu() -> float | None:
    """Seconds of CPU of the local PostgreSQL server's processes, those reaped included; None where
    /proc cannot tell (not Linux)."""
    total = 0
    try:
        stats = list(Path("/proc").glob("[0-9]*/stat"))
    except OSError:
        return None
    for stat in stats:
        try:
            text = stat.read_text()
        except OSError:  # ended meanwhile
            continue
        if text[text.index("(") + 1 : text.rindex(")")].startswith("postgres"):
            fields = text[text.rindex(")") + 2 :].split()
            total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return total / os.sysconf("SC_CLK_TCK") if stats else None


def own_cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime


def main(rounds: int, timed: bool) -> None:
    pg = asyncio.run(pg_database())
    if pg is None:
        print("guard_split: no PostgreSQL server answers, skipped")
        return
    url = pg[0]
    shapes: list[tuple[str, Callable[[], Coroutine[Any, Any, list[float]]]]] = [
        ("tracker", lambda: _first(guard_times(url, (0.010, 0.030)))),
        ("lanes only", lambda: lanes_only(url)),
        ("raw lanes", lambda: cycle_times(url, "2 lanes")),
    ]
    p50s: dict[str, list[float]] = {name: [] for name, _ in shapes}
    cpu: dict[str, list[tuple[float, float | None]]] = {name: [] for name, _ in shapes}
    print(f"target 4's PostgreSQL load ({CONCURRENCY} in flight, provider 10-30 ms), p50 ms by round")
    try:
        for n in range(rounds):
            last = timed and n == rounds - 1
            order = shapes[n % 3 :] + shapes[: n % 3]
            cells = {}
            for name, load in order:
                _timing(last)
                server, own = server_cpu(), own_cpu()
                try:
                    added = asyncio.run(load())
                finally:
                    _timing(False)
                server_after = server_cpu()
                spent = None if server is None or server_after is None else server_after - server
                cpu[name].append((own_cpu() - own, spent))
                p50s[name].append(statistics.median(added) * 1e3)
                cells[name] = p50s[name][-1]
                if last:
                    _print_statements(name)
            print(f"  {n + 1:<3}" + "".join(f"{name} {cells[name]:.2f}   " for name, _ in shapes), flush=True)
    finally:
        asyncio.run(drop(pg[1]))
    print("  medians: " + ", ".join(f"{name} {statistics.median(v):.2f}" for name, v in p50s.items()))
    print("  CPU µs per call (medians; the tracker's setup included), this process / the server's processes:")
    for name, used in cpu.items():
        own = statistics.median(u[0] for u in used) / CALLS * 1e6
        servers = [u[1] for u in used if u[1] is not None]
        server = f"{statistics.median(servers) / CALLS * 1e6:.0f}" if servers else "-"
        print(f"    {name:<12}{own:>6.0f} / {server}")


async def _first(load: Coroutine[Any, Any, tuple[list[float], float]]) -> list[float]:
    return (await load)[0]


def _print_statements(shape: str) -> None:
    print(f"    {shape}: each statement, p50 µs: to its send / send to the answer's last read / to the lane")
    for query, times in sorted(statements.items(), key=lambda kv: -len(kv[1])):
        if len(times) < 50:
            continue
        parts = [statistics.median(column) * 1e6 for column in zip(*times, strict=True)]
        whole = statistics.median(sum(t) for t in times) * 1e6
        split = " / ".join(f"{part:4.0f}" for part in parts)
        print(f"      {len(times):>6,} × {split}, {whole:4.0f} in all  {query}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(int(args[0]) if args else 6, "--statements" in sys.argv)
