"""llm-spend benchmarks, printed in one run: `make bench` (or .venv/bin/python bench/run.py).

1. What SpendMiddleware adds per request over the bare Starlette app, by direct ASGI calls (no
   server, no HTTP parsing), next to a trivial pure-ASGI middleware and a no-op BaseHTTPMiddleware.
2. track()'s sustained calls/s on a SQLite file, next to raw stdlib sqlite3 writing the same ledger
   rows and rollup upserts in batches of 500, one transaction per batch: the floor for this work.
3. What contextvars-extras costs per with_tags scope over plain contextvars (docs/decisions.md).

Figures only, no assertions: they depend on the machine. About 1-2 minutes on 2 slow cores.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import contextvars_cost
import sqlalchemy
import starlette
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_spend import Budget, BudgetExceeded, CallRecord, SpendMiddleware, Tracker, with_tags
from llm_spend.storage.store import Store

REQUESTS, REQUEST_RUNS = 20_000, 7
CALLS, WAVE, BATCH, TRACK_RUNS = 20_000, 2_000, 500, 3
USERS = 100
BARE = "bare Starlette app"

# -- 1. middleware overhead -------------------------------------------------------------------------

request_var: ContextVar[str | None] = ContextVar("request_var", default=None)


class ContextVarMiddleware:
    """The least a pure-ASGI middleware can do: set a ContextVar, reset it in finally."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = request_var.set(scope["path"])
        try:
            await self.app(scope, receive, send)
        finally:
            request_var.reset(token)


class NoopHTTPMiddleware(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        return await call_next(request)


async def homepage(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def user_tags(request: Request) -> dict[str, str]:
    return {"user_id": request.headers.get("x-user", "anonymous")}


def build_apps(tracker: Tracker) -> dict[str, tuple[ASGIApp, int]]:
    """Each app to time, with its number of requests per run (BaseHTTPMiddleware is much slower)."""
    routes = [Route("/", homepage)]

    def app(*middleware: Middleware) -> Starlette:
        return Starlette(routes=routes, middleware=list(middleware))

    return {
        BARE: (app(), REQUESTS),
        "+ pure-ASGI middleware setting a ContextVar": (app(Middleware(ContextVarMiddleware)), REQUESTS),
        f"+ BaseHTTPMiddleware, no-op ({REQUESTS // 5:,} requests/run)": (
            app(Middleware(NoopHTTPMiddleware)),
            REQUESTS // 5,
        ),
        "+ SpendMiddleware (tags callable, block budget)": (
            app(Middleware(SpendMiddleware, tracker=tracker, tags=user_tags)),
            REQUESTS,
        ),
    }


def http_scope(user: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"bench"), (b"user-agent", b"bench"), (b"x-user", user.encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }


async def receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: Message) -> None:
    pass


async def time_requests(app: ASGIApp, n: int) -> float:
    """µs per request for n direct ASGI calls (a fresh scope dict each, as a server gives)."""
    scopes = [http_scope(f"user-{i}") for i in range(USERS)]
    started = time.perf_counter()
    for i in range(n):
        await app(dict(scopes[i % USERS]), receive, send)
    return (time.perf_counter() - started) / n * 1e6


HEAVY = {"user_id": "heavy"}


async def exhaust_one_user(tracker: Tracker) -> None:
    """Take user 'heavy' over the block budget, so the middleware has a refusal to look up."""
    try:
        await tracker.track(
            provider="openai", model="gpt-4o", input_tokens=3_000_000, output_tokens=0, tags=HEAVY
        )
    except BudgetExceeded:
        return
    raise RuntimeError("the 'heavy' user should have exceeded its budget")


async def bench_middleware(workdir: Path) -> dict[str, tuple[float, float]]:
    """(µs per request, µs added over the bare app) of each app: added is the median of its
    differences with the bare app's run of the same round, which a slow moment of the machine
    shifts alike (the difference of two medians would take each from another round)."""
    tracker = Tracker(
        f"sqlite+aiosqlite:///{workdir / 'middleware.db'}",
        budgets=[Budget.daily(5, per="user_id", mode="block")],
    )
    async with tracker:
        await exhaust_one_user(tracker)
        apps = build_apps(tracker)
        for app, _ in apps.values():  # warm up: builds each middleware stack, fills caches
            await time_requests(app, 1_000)
        samples: dict[str, list[float]] = {name: [] for name in apps}
        names = list(apps)
        for run in range(REQUEST_RUNS):  # interleaved, in an order that rotates
            for name in names[run % len(names) :] + names[: run % len(names)]:
                app, requests = apps[name]
                samples[name].append(await time_requests(app, requests))
    bare = samples[BARE]
    return {
        name: (statistics.median(values), statistics.median(a - b for a, b in zip(values, bare, strict=True)))
        for name, values in samples.items()
    }


# -- 2. track() throughput vs raw sqlite3 -----------------------------------------------------------


def track_call(tracker: Tracker) -> Awaitable[CallRecord]:
    return tracker.track(
        provider="openai", model="gpt-4o-mini", input_tokens=1200, output_tokens=300, cache_read_tokens=256
    )


async def bench_track(url: str) -> tuple[float, CallRecord]:
    """track() calls/s: CALLS calls in waves of WAVE concurrent ones (no budgets: global rollups only)."""
    async with Tracker(url) as tracker, with_tags(feature="bench", user_id="u1"):
        sample = await track_call(tracker)  # first connection, statement compilation, price lookup
        started = time.perf_counter()
        for _ in range(CALLS // WAVE):
            await asyncio.gather(*(track_call(tracker) for _ in range(WAVE)))
        elapsed = time.perf_counter() - started
    return CALLS / elapsed, sample


CALL_COLUMNS = (
    "event_id, occurred_at, provider, model, input_tokens, output_tokens, cache_read_tokens, "
    "cache_write_tokens, cache_write_1h_tokens, reasoning_tokens, cost_nanousd, pricing_status, "
    "price_source, usage_source, stream, latency_ms, service_tier, provider_response_id, request_id, tags"
)
INSERT_CALL = f"INSERT INTO llm_calls ({CALL_COLUMNS}) VALUES ({', '.join('?' * 20)})"
SUMS = (
    "spent_nanousd",
    "reserved_nanousd",
    "calls",
    "unknown_cost_calls",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)
UPSERT_ROLLUP = (
    f"INSERT INTO llm_spend_rollups (period, window_start, scope_key, scope_value, {', '.join(SUMS)}) "
    f"VALUES (?, ?, '', '', {', '.join('?' * len(SUMS))}) "
    "ON CONFLICT (period, window_start, scope_key, scope_value) DO UPDATE SET "
    + ", ".join(f"{name} = {name} + excluded.{name}" for name in SUMS)
)
SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"  # how SQLAlchemy stores a DateTime on SQLite


def sample_row(sample: CallRecord) -> tuple[tuple[Any, ...], str, tuple[int, ...]]:
    """What track() writes for `sample`: the ledger columns after event_id and occurred_at up to tags,
    the tags as JSON, and one batch's rollup increments (SUMS order)."""
    u, cost = sample.usage, sample.cost_nanousd or 0
    tokens = (u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens)
    same = (
        *(sample.provider, sample.model, *tokens, u.cache_write_1h_tokens, u.reasoning_tokens, cost),
        *(sample.pricing_status, sample.price_source, sample.usage_source, False, None, None, None, None),
    )
    sums = tuple(x * BATCH for x in (cost, 0, 1, 0, *tokens, u.reasoning_tokens))
    return same, json.dumps(dict(sample.tags)), sums


def bench_raw_sqlite(path: Path, sample: CallRecord) -> float:
    """calls/s of stdlib sqlite3 writing the same rows as track(): ledger + day/month rollups."""
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode=WAL", "busy_timeout=30000", "synchronous=NORMAL"):
        conn.execute(f"PRAGMA {pragma}")
    same, tags, sums = sample_row(sample)
    started = time.perf_counter()
    for _ in range(CALLS // BATCH):
        day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        windows = [("day", day), ("month", day.replace(day=1))]
        rows = [
            (str(uuid.uuid4()), datetime.now(UTC).strftime(SQLITE_TIME), *same, tags) for _ in range(BATCH)
        ]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(INSERT_CALL, rows)
        conn.executemany(
            UPSERT_ROLLUP, [(period, start.strftime(SQLITE_TIME), *sums) for period, start in windows]
        )
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    (count,) = conn.execute("SELECT count(*) FROM llm_calls").fetchone()
    conn.close()
    if count != CALLS:
        raise RuntimeError(f"raw sqlite3 wrote {count} rows, expected {CALLS}")
    return CALLS / elapsed


async def migrated(path: Path) -> Path:
    """A fresh SQLite file with llm-spend's real schema (its own migrations)."""
    store = Store(f"sqlite+aiosqlite:///{path}")
    try:
        await store.migrate()
    finally:
        await store.close()
    return path


async def bench_throughput(workdir: Path) -> tuple[float, float]:
    tracked, raw = [], []
    for run in range(TRACK_RUNS):
        calls_per_s, sample = await bench_track(f"sqlite+aiosqlite:///{workdir / f'track-{run}.db'}")
        tracked.append(calls_per_s)
        raw.append(bench_raw_sqlite(await migrated(workdir / f"raw-{run}.db"), sample))
    return statistics.median(tracked), statistics.median(raw)


# -- report -----------------------------------------------------------------------------------------


def section(title: str, body: Callable[[], None]) -> None:
    print(f"\n{title}")
    started = time.perf_counter()
    body()
    print(f"  ({time.perf_counter() - started:.0f} s)")


def cpu() -> str:
    """The CPU's name, family and model as Linux reports them (sessions land on different kinds),
    else the platform's name for it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            first = info.read().split("\n\n")[0]
    except OSError:
        return platform.processor() or platform.machine()
    fields = {
        key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first.splitlines())
    }
    name, family, model = (fields.get(key, "?") for key in ("model name", "cpu family", "model"))
    return f"{name} (family {family} model {model})"


def main() -> None:
    versions = f"Starlette {starlette.__version__}, SQLAlchemy {sqlalchemy.__version__}"
    print(
        f"llm-spend bench: Python {platform.python_version()}, {os.cpu_count()} CPUs, {versions}, "
        f"SQLite {sqlite3.sqlite_version}"
    )
    print(f"CPU: {cpu()}")
    print(f"load average at the start: {os.getloadavg()[0]:.2f} (the figures need a quiet machine)")
    with tempfile.TemporaryDirectory(prefix="llm-spend-bench-") as tmp:
        run_all(Path(tmp))
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


def run_all(workdir: Path) -> None:
    def middleware() -> None:
        results = asyncio.run(bench_middleware(workdir))
        print(f"  {'app':<50}{'µs/request':>11}{'added µs':>10}")
        for name, (us, added) in results.items():
            print(f"  {name:<50}{us:11.1f}{'' if name == BARE else f'{added:+10.1f}'}")

    def throughput() -> None:
        tracked, raw = asyncio.run(bench_throughput(workdir))
        print(f"  {'llm-spend tracker.track()':<50}{tracked:11,.0f} calls/s")
        print(f"  {f'raw sqlite3, batches of {BATCH}, same rows':<50}{raw:11,.0f} calls/s")
        print(f"  {'track() / raw sqlite3':<50}{tracked / raw:11.2f}x")

    def contextvars() -> None:
        print(contextvars_cost.report(contextvars_cost.measure()))

    section(
        f"1. Middleware overhead: GET / -> PlainTextResponse by direct ASGI calls, "
        f"median of {REQUEST_RUNS} runs x {REQUESTS:,} requests (added: of the runs' differences)",
        middleware,
    )
    section(
        f"2. track() throughput: {CALLS:,} calls in waves of {WAVE:,} concurrent, SQLite file "
        f"(WAL, synchronous=NORMAL), median of {TRACK_RUNS} runs",
        throughput,
    )
    section("3. contextvars cost per with_tags-style scope (median of 7 runs)", contextvars)


if __name__ == "__main__":
    main()
