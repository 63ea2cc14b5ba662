"""Tracker: manual capture with track(), the ledger rows and rollups it writes, lifecycle, subscribers."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http import HTTPStatus
from importlib.metadata import version
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import genai_prices
import httpx
import pytest
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from conftest import FreezingProxy, pg_sessions
from llm_spend import (
    Budget,
    CallRecord,
    SpendMiddleware,
    StorageError,
    Tracker,
    Usage,
    current_tags,
    with_tags,
)
from llm_spend.budgets import window_bounds
from llm_spend.money import from_nanousd, to_nanousd

Factory = Callable[..., Awaitable[Tracker]]

TOKEN_COLUMNS = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)


# -- helpers: read the database the way a user would, with a separate engine -------------------------


async def query(url: str, sql: str, **params: Any) -> list[dict[str, Any]]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(text(sql), params)
            return [dict(row) for row in result.mappings().all()]
    finally:
        await engine.dispose()


async def count(url: str, table: str) -> int:
    rows = await query(url, f"SELECT COUNT(*) AS n FROM {table}")
    return int(rows[0]["n"])


async def table_names(url: str) -> list[str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(lambda sync: sa_inspect(sync).get_table_names())
    finally:
        await engine.dispose()


def as_dict(tags: Any) -> dict[str, str]:
    return json.loads(tags) if isinstance(tags, str) else dict(tags)


def genai_cost(model: str, provider: str = "openai", **tokens: int) -> Decimal:
    calc = genai_prices.calc_price(genai_prices.Usage(**tokens), model, provider_id=provider)
    return calc.total_price


# -- pricing and the returned record -----------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens",
    [
        {"input_tokens": 1200, "output_tokens": 300},
        {"input_tokens": 1200, "output_tokens": 300, "cache_read_tokens": 1000},
        {"input_tokens": 7, "output_tokens": 0},
        {"input_tokens": 123_457, "output_tokens": 9_876},
    ],
    ids=["plain", "cache-read", "tiny", "large"],
)
async def test_track_cost_equals_genai_prices_to_the_nano_dollar(
    sqlite_url: str, tracker_factory: Factory, tokens: dict[str, int]
) -> None:
    """track() returns a CallRecord whose Decimal cost is genai-prices' calc_price to the nano-dollar."""
    tracker = await tracker_factory(sqlite_url)
    record = await tracker.track(provider="openai", model="gpt-4o", **tokens)
    expected = to_nanousd(genai_cost("gpt-4o", **tokens))
    assert isinstance(record, CallRecord)
    assert isinstance(record.cost, Decimal)
    assert record.cost_nanousd == expected
    assert to_nanousd(record.cost) == expected
    assert record.pricing_status == "priced"
    assert record.usage_source == "manual"
    assert record.input_tokens == tokens["input_tokens"]
    assert record.output_tokens == tokens["output_tokens"]


async def test_track_stores_the_priced_row(db_url: str, tracker_factory: Factory) -> None:
    """The ledger row holds the call's tokens, integer nano-USD cost, status, source and tags."""
    tracker = await tracker_factory(db_url)
    with with_tags(user_id="42", feature="chat"):
        record = await tracker.track(
            provider="openai", model="gpt-4o", input_tokens=1200, output_tokens=300,
            cache_read_tokens=200, reasoning_tokens=50, latency_ms=321, service_tier="default",
            provider_response_id="chatcmpl-1",
        )  # fmt: skip
    rows = await query(db_url, "SELECT * FROM llm_calls")
    assert len(rows) == 1
    row = rows[0]
    assert row["event_id"] == record.event_id
    assert row["provider"] == "openai"
    assert row["model"] == "gpt-4o"
    assert (row["input_tokens"], row["output_tokens"]) == (1200, 300)
    assert (row["cache_read_tokens"], row["cache_write_tokens"], row["reasoning_tokens"]) == (200, 0, 50)
    assert (
        row["cost_nanousd"]
        == record.cost_nanousd
        == to_nanousd(genai_cost("gpt-4o", input_tokens=1200, output_tokens=300, cache_read_tokens=200))
    )
    assert isinstance(row["cost_nanousd"], int)
    assert from_nanousd(row["cost_nanousd"]) == record.cost
    assert row["pricing_status"] == "priced"
    assert row["usage_source"] == "manual"
    assert row["latency_ms"] == 321
    assert row["service_tier"] == "default"
    assert row["provider_response_id"] == "chatcmpl-1"
    assert row["request_id"] is None
    assert as_dict(row["tags"]) == {"user_id": "42", "feature": "chat"}


async def test_row_stamps_price_source_with_genai_prices_version(
    db_url: str, tracker_factory: Factory
) -> None:
    """Each priced row says which price table priced it, e.g. "genai-prices 0.2.3"."""
    tracker = await tracker_factory(db_url)
    record = await tracker.track(provider="openai", model="gpt-4o", input_tokens=10, output_tokens=10)
    rows = await query(db_url, "SELECT price_source FROM llm_calls")
    assert record.price_source is not None
    assert record.price_source.startswith("genai-prices")
    assert version("genai-prices") in record.price_source
    assert rows == [{"price_source": record.price_source}]


async def test_unknown_model_is_stored_with_null_cost(db_url: str, tracker_factory: Factory) -> None:
    """An unknown model: cost None, pricing_status "unknown_model", a row with NULL cost (never $0)."""
    tracker = await tracker_factory(db_url)
    record = await tracker.track(
        provider="openai", model="no-such-model-xyz-1", input_tokens=100, output_tokens=10
    )
    assert record.cost is None
    assert record.cost_nanousd is None
    assert record.pricing_status == "unknown_model"
    rows = await query(db_url, "SELECT cost_nanousd, pricing_status FROM llm_calls")
    assert rows == [{"cost_nanousd": None, "pricing_status": "unknown_model"}]
    rollups = await query(db_url, "SELECT calls, spent_nanousd, unknown_cost_calls FROM llm_spend_rollups")
    assert rollups and all(r == {"calls": 1, "spent_nanousd": 0, "unknown_cost_calls": 1} for r in rollups)


async def test_track_outside_a_running_tracker_raises(sqlite_url: str) -> None:
    """track() on a tracker that was never entered raises instead of losing the call silently."""
    tracker = Tracker(sqlite_url)
    with pytest.raises(Exception, match=r"(?i)not running|async with"):
        await tracker.track(provider="openai", model="gpt-4o", input_tokens=1, output_tokens=1)


# -- invalid input --------------------------------------------------------------------------------------

VALID: dict[str, Any] = {"provider": "openai", "model": "gpt-4o", "input_tokens": 100, "output_tokens": 50}

INVALID = [
    pytest.param({"input_tokens": -1}, "input_tokens", id="negative-input"),
    pytest.param({"output_tokens": -5}, "output_tokens", id="negative-output"),
    pytest.param({"input_tokens": 1.5}, "input_tokens", id="float-input"),
    pytest.param({"output_tokens": 2.0}, "output_tokens", id="float-output"),
    pytest.param({"input_tokens": True}, "input_tokens", id="bool-input"),
    pytest.param({"output_tokens": "10"}, "output_tokens", id="str-output"),
    pytest.param({"cache_read_tokens": -1}, "cache_read_tokens", id="negative-cache-read"),
    pytest.param(
        {"input_tokens": 100, "cache_read_tokens": 60, "cache_write_tokens": 41},
        "cache_read_tokens",
        id="cache-exceeds-input",
    ),
    pytest.param(
        {"input_tokens": 100, "cache_write_tokens": 101}, "cache_write_tokens", id="cache-write-gt-input"
    ),
    pytest.param({"output_tokens": 50, "reasoning_tokens": 51}, "reasoning_tokens", id="reasoning-gt-output"),
    pytest.param({"provider": ""}, "provider", id="empty-provider"),
    pytest.param({"provider": "   "}, "provider", id="blank-provider"),
    pytest.param({"model": ""}, "model", id="empty-model"),
    pytest.param({"model": None}, "model", id="none-model"),
    pytest.param({"input_tokens": 10**9 + 1}, "input_tokens", id="input-over-1e9"),
    pytest.param({"output_tokens": 10**12}, "output_tokens", id="output-over-1e9"),
    pytest.param({"latency_ms": -3}, "latency_ms", id="negative-latency"),
    pytest.param({"latency_ms": 3_000_000_000}, "latency_ms", id="latency-over-int32"),
    pytest.param({"latency_ms": 1.5}, "latency_ms", id="float-latency"),
    pytest.param({"batch": "no"}, "batch", id="batch-not-bool"),
    pytest.param({"batch": True, "service_tier": "priority"}, "batch", id="batch-and-another-tier"),
    pytest.param({"service_tier": "t" * 65}, "service_tier", id="long-service-tier"),
    pytest.param({"tags": {"bad key": "x"}}, "bad key", id="bad-tag-key"),
    pytest.param({"tags": ["user_id", "1"]}, "tags", id="tags-not-a-mapping"),
    pytest.param({"tags": {f"k{i}": "v" for i in range(51)}}, "50", id="too-many-tags"),
]


@pytest.mark.parametrize(("override", "field"), INVALID)
async def test_invalid_input_raises_value_error_naming_the_field(
    sqlite_url: str, tracker_factory: Factory, override: dict[str, Any], field: str
) -> None:
    """Each invalid input raises ValueError whose message names the field, and records nothing."""
    tracker = await tracker_factory(sqlite_url)
    with pytest.raises(ValueError) as info:
        await tracker.track(**(VALID | override))
    assert field in str(info.value)
    await tracker.track(**VALID)  # committed after anything the bad call could have queued
    assert await count(sqlite_url, "llm_calls") == 1
    rollup = await query(sqlite_url, "SELECT calls FROM llm_spend_rollups WHERE scope_key = ''")
    assert rollup and all(r["calls"] == 1 for r in rollup)


async def test_invalid_inputs_write_nothing(db_url: str, tracker_factory: Factory) -> None:
    """After every kind of invalid call, the ledger and rollups are empty on every backend."""
    tracker = await tracker_factory(db_url, budgets=[Budget.daily(100, per="user_id")])
    for param in INVALID:
        override, field = param.values
        with pytest.raises(ValueError, match=field), with_tags(user_id="u1"):
            await tracker.track(**(VALID | override))
    assert await count(db_url, "llm_calls") == 0
    assert await count(db_url, "llm_spend_rollups") == 0


def test_token_limit_of_exactly_1e9_is_accepted_as_input() -> None:
    """10**9 tokens is the largest accepted count (the limit is inclusive); Usage accepts it."""
    from llm_spend import Usage

    assert Usage(input_tokens=10**9, output_tokens=0).input_tokens == 10**9
    with pytest.raises(ValueError, match="input_tokens"):
        Usage(input_tokens=10**9 + 1)


# -- tags: explicit > with_tags > middleware ----------------------------------------------------------


async def test_explicit_tags_win_over_with_tags_which_win_over_middleware(
    db_url: str, tracker_factory: Factory
) -> None:
    """Row tags merge middleware, with_tags and tags=; on a shared key tags= wins, then with_tags."""
    tracker = await tracker_factory(db_url)

    async def endpoint(request: Request) -> JSONResponse:
        with with_tags(feature="ctx", team="ctx"):
            record = await tracker.track(**VALID, tags={"team": "explicit", "extra": 1})
        return JSONResponse({"event_id": record.event_id, "tags": dict(record.tags)})

    app = Starlette(
        routes=[Route("/", endpoint)],
        middleware=[
            Middleware(
                SpendMiddleware,
                tracker=tracker,
                tags=lambda request: {"user_id": "mw", "feature": "mw", "team": "mw"},
            )
        ],
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        response = await client.get("/", headers={"X-Request-ID": "req-abc"})
    assert response.status_code == 200
    expected = {"user_id": "mw", "feature": "ctx", "team": "explicit", "extra": "1"}
    assert response.json()["tags"] == expected
    rows = await query(db_url, "SELECT tags, request_id, event_id FROM llm_calls")
    assert len(rows) == 1
    assert as_dict(rows[0]["tags"]) == expected
    assert rows[0]["request_id"] == "req-abc"
    assert rows[0]["event_id"] == response.json()["event_id"]


async def test_explicit_tags_are_normalized_like_with_tags(sqlite_url: str, tracker_factory: Factory) -> None:
    """tags= values are stored as strings, truncated, secrets redacted, and None removes a context key."""
    tracker = await tracker_factory(sqlite_url)
    with with_tags(user_id="1", feature="chat"):
        record = await tracker.track(
            **VALID, tags={"n": 5, "long": "x" * 300, "api_key": "sk-123", "feature": None}
        )
    expected = {"user_id": "1", "n": "5", "long": "x" * 256, "api_key": "[REDACTED]"}
    assert dict(record.tags) == expected
    rows = await query(sqlite_url, "SELECT tags FROM llm_calls")
    assert as_dict(rows[0]["tags"]) == expected


async def test_explicit_tags_over_50_with_context_tags_raise(
    sqlite_url: str, tracker_factory: Factory
) -> None:
    """tags= that bring the merged tags above 50 raise ValueError and record nothing."""
    tracker = await tracker_factory(sqlite_url)
    with with_tags(**{f"a{i}": "v" for i in range(30)}), pytest.raises(ValueError, match="50"):
        await tracker.track(**VALID, tags={f"b{i}": "v" for i in range(30)})
    await tracker.track(**VALID)
    assert await count(sqlite_url, "llm_calls") == 1


async def test_explicit_tags_do_not_change_the_context(sqlite_url: str, tracker_factory: Factory) -> None:
    """Passing tags= to track() leaves current_tags() as it was."""
    tracker = await tracker_factory(sqlite_url)
    with with_tags(user_id="1"):
        await tracker.track(**VALID, tags={"user_id": "2"})
        assert dict(current_tags()) == {"user_id": "1"}


# -- rollups equal the ledger ---------------------------------------------------------------------------


async def test_rollups_equal_ledger_sums_after_concurrent_tracking(
    db_url: str, tracker_factory: Factory
) -> None:
    """After 500 concurrent track() calls, every rollup row equals the ledger's sums for its window."""
    tz_name = "America/New_York"
    tracker = await tracker_factory(
        db_url,
        timezone=tz_name,
        budgets=[Budget.daily(10_000, per="user_id"), Budget.monthly(10_000, per="team")],
    )
    rng = random.Random(7)
    models = ["gpt-4o", "gpt-4o-mini", "no-such-model-xyz"]

    async def one(i: int) -> CallRecord:
        input_tokens = rng.randint(0, 5000)
        output_tokens = rng.randint(0, 2000)
        tags: dict[str, str] = {"user_id": f"u{i % 7}"}
        if i % 3:
            tags["team"] = f"t{i % 4}"
        await asyncio.sleep(0)
        with with_tags(**tags):
            return await tracker.track(
                provider="openai",
                model=models[i % 3],
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                cache_read_tokens=rng.randint(0, input_tokens),
                reasoning_tokens=rng.randint(0, output_tokens),
            )

    records = await asyncio.gather(*(one(i) for i in range(500)))
    assert len({r.event_id for r in records}) == 500

    from llm_spend.storage.schema import calls, rollups  # decoded datetimes and JSON

    engine = create_async_engine(db_url)
    try:
        async with engine.connect() as conn:
            ledger = (await conn.execute(calls.select())).mappings().all()
            stored = (await conn.execute(rollups.select())).mappings().all()
    finally:
        await engine.dispose()
    assert len(ledger) == 500

    tz = ZoneInfo(tz_name)
    expected: dict[tuple[str, datetime, str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    scopes = [("day", ""), ("month", ""), ("day", "user_id"), ("month", "team")]
    for row in ledger:
        tags = as_dict(row["tags"])
        for period, scope_key in scopes:
            value = tags.get(scope_key) if scope_key else ""
            if value is None:
                continue
            sums = expected[(period, window_bounds(period, row["occurred_at"], tz)[0], scope_key, value)]
            sums["spent_nanousd"] += row["cost_nanousd"] or 0
            sums["calls"] += 1
            sums["unknown_cost_calls"] += row["cost_nanousd"] is None
            for column in TOKEN_COLUMNS:
                sums[column] += row[column]

    got = {
        (r["period"], r["window_start"], r["scope_key"], r["scope_value"]): {
            name: r[name] for name in ("spent_nanousd", "calls", "unknown_cost_calls", *TOKEN_COLUMNS)
        }
        for r in stored
    }
    assert got == {key: dict(value) for key, value in expected.items()}
    assert all(r["reserved_nanousd"] == 0 for r in stored)

    totals = (await query(db_url, "SELECT SUM(cost_nanousd) AS s, COUNT(*) AS n FROM llm_calls"))[0]
    day_global = [v for k, v in got.items() if k[0] == "day" and k[2] == ""]
    assert sum(v["spent_nanousd"] for v in day_global) == int(totals["s"])
    assert sum(v["calls"] for v in day_global) == int(totals["n"]) == 500
    assert int(totals["s"]) == sum(r.cost_nanousd or 0 for r in records)


# -- lifecycle ------------------------------------------------------------------------------------------


async def test_async_with_writes_every_accepted_call_before_exit(db_url: str) -> None:
    """After `async with tracker` exits, all 300 tracked calls are in the database, seen by a new engine."""
    async with Tracker(db_url) as tracker:
        tasks = [asyncio.create_task(tracker.track(**VALID, tags={"i": i})) for i in range(300)]
        records = await asyncio.gather(*tasks)
    assert len({r.event_id for r in records}) == 300
    assert await count(db_url, "llm_calls") == 300
    rows = await query(db_url, "SELECT calls FROM llm_spend_rollups WHERE scope_key = '' AND period = 'day'")
    assert sum(r["calls"] for r in rows) == 300


async def test_lifespan_writes_every_accepted_call_before_exit(sqlite_url: str) -> None:
    """tracker.lifespan(app) runs the tracker; on exit all 300 calls are durably in the SQLite file."""
    tracker = Tracker(sqlite_url)
    async with tracker.lifespan(None):
        records = await asyncio.gather(*(tracker.track(**VALID) for _ in range(300)))
    assert len(records) == 300
    reopened = Tracker(sqlite_url)
    async with reopened:
        assert await count(sqlite_url, "llm_calls") == 300


async def test_calls_in_flight_when_the_tracker_exits_are_written_or_refused(sqlite_url: str) -> None:
    """Calls still queued when the tracker exits are all written; none hangs, none is silently lost."""
    tracker = Tracker(sqlite_url, max_queue=5, max_batch=3)
    await tracker.__aenter__()
    tasks = [asyncio.create_task(tracker.track(**VALID)) for _ in range(100)]
    await asyncio.sleep(0)
    closing = asyncio.create_task(tracker.__aexit__(None, None, None))
    # a hang guard, not a timing assertion: the whole thing takes well under a second
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=30)
    await asyncio.wait_for(closing, timeout=30)
    recorded = [r for r in results if isinstance(r, CallRecord)]
    failed = [r for r in results if not isinstance(r, CallRecord)]
    assert all(isinstance(e, Exception) and not isinstance(e, ValueError) for e in failed)
    assert await count(sqlite_url, "llm_calls") == len(recorded)
    assert len(recorded) == 100


async def test_calls_still_open_when_the_tracker_closes_are_spooled_and_written_at_the_next_start(
    db_url: str, tmp_path: Path
) -> None:
    """A guarded call and a stream still running when the lifespan ends (after it waited its
    shutdown_timeout for the guarded call) were billed: recorded after the close, they wait in the
    spool, and the next start writes them and settles the reservation."""
    budgets, spool = [Budget.daily(1, mode="block")], tmp_path / "calls.spool"
    tracker = Tracker(db_url, budgets=budgets, spool_path=spool, shutdown_timeout=0.5)
    await tracker.__aenter__()
    answered = asyncio.Event()

    async def guarded() -> CallRecord:
        async with tracker.guard(
            provider="openai", model="gpt-4o-mini", input_tokens=100, max_output_tokens=100
        ) as call:
            await answered.wait()
            return await call.record(Usage(input_tokens=100, output_tokens=10))

    async def streamed() -> None:
        async with tracker.track_stream(provider="openai", model="gpt-4o-mini") as stream:
            await answered.wait()
            stream.usage(input_tokens=100, output_tokens=10)

    tasks = [asyncio.create_task(guarded()), asyncio.create_task(streamed())]
    await asyncio.sleep(0.05)  # both are under way (the guard has reserved)
    await tracker.__aexit__(None, None, None)
    answered.set()
    record, _ = await asyncio.gather(*tasks)
    assert isinstance(record, CallRecord) and await count(db_url, "llm_calls") == 0

    async with Tracker(db_url, budgets=budgets, spool_path=spool) as again:
        status = await again.budget_status()
    assert await count(db_url, "llm_calls") == 2
    assert await count(db_url, "llm_spend_reservations") == 0
    assert status[0].spent == 2 * record.cost and status[0].reserved == 0


async def test_the_exit_waits_for_guarded_calls_still_out_and_settles_them_in_the_database(
    db_url: str, tmp_path: Path
) -> None:
    """A guarded call that ends within shutdown_timeout of the lifespan's exit is written and
    settled then, not spooled: spooled, it would be settled only when this process next starts,
    and if that is after its lease, another process's sweep would have freed its room meanwhile."""
    spool = tmp_path / "calls.spool"
    tracker = Tracker(db_url, budgets=[Budget.daily(1, mode="block")], spool_path=spool, shutdown_timeout=5)
    await tracker.__aenter__()

    async def guarded() -> CallRecord:
        async with tracker.guard(
            provider="openai", model="gpt-4o-mini", input_tokens=100, max_output_tokens=100
        ) as call:
            await asyncio.sleep(0.3)  # the provider answers while the tracker exits
            return await call.record(Usage(input_tokens=100, output_tokens=10))

    task = asyncio.create_task(guarded())
    await asyncio.sleep(0.05)  # reserved
    await tracker.__aexit__(None, None, None)
    assert task.done() and (await task).cost is not None
    assert (await count(db_url, "llm_calls"), await count(db_url, "llm_spend_reservations")) == (1, 0)
    assert not spool.exists() or spool.stat().st_size == 0


async def test_the_exit_does_not_wait_for_a_call_that_cannot_end_meanwhile(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A guard entered by the very task that exits the tracker, or by a task that has ended (a
    stream never closed), cannot end while the exit waits: it is not waited for (the exit took its
    whole shutdown_timeout), and the call is spooled as before."""
    budgets = [Budget.daily(1, mode="block")]
    tracker = Tracker(sqlite_url, budgets=budgets, spool_path=tmp_path / "s", shutdown_timeout=60)
    await tracker.__aenter__()
    guard = tracker.guard(provider="openai", model="gpt-4o-mini", input_tokens=100, max_output_tokens=100)
    call = await guard.__aenter__()

    async def abandoned() -> None:  # enters a guard and ends without leaving it
        await tracker.guard(
            provider="openai", model="gpt-4o-mini", input_tokens=1, max_output_tokens=1
        ).__aenter__()

    await asyncio.create_task(abandoned())
    async with asyncio.timeout(10):  # not its 60 s (a timeout in this task: wait_for makes another)
        await tracker.__aexit__(None, None, None)
    assert "guarded calls still out" not in caplog.text
    call.record(Usage(input_tokens=100, output_tokens=10))
    await guard.__aexit__(None, None, None)
    assert tracker.spool.backlog()[0] == 1


async def test_an_exit_cancelled_while_it_waits_still_closes_the_tracker(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Cancelled (a lifespan's own deadline) while it waits for a guarded call, the exit still stops
    the writer and the sweeper and closes the store: entering again starts them once, and the
    last exit leaves none running."""
    tracker = Tracker(sqlite_url, budgets=[Budget.daily(1, mode="block")], spool_path=tmp_path / "s")
    await tracker.__aenter__()
    release = asyncio.Event()

    async def out() -> None:
        async with tracker.guard(provider="openai", model="gpt-4o-mini", input_tokens=1, max_output_tokens=1):
            await release.wait()

    task = asyncio.create_task(out())
    await asyncio.sleep(0.05)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(tracker.__aexit__(None, None, None), 0.2)
    release.set()
    await task
    async with tracker:
        await tracker.track(**VALID)
    names = [t.get_name() for t in asyncio.all_tasks()]
    assert "llm-spend-writer" not in names and "llm-spend-sweeper" not in names
    assert await count(sqlite_url, "llm_calls") == 1


async def test_a_call_recorded_after_close_whose_spool_cannot_be_written_is_lost_loudly_not_raised(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A call recorded after the tracker closed, when the spool cannot be written (its directory is
    a file): logged as LOST and counted, as the writer's spooling does, and the caller still gets
    its record."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    tracker = Tracker(sqlite_url, spool_path=blocker / "spool")
    async with tracker:
        pass
    with caplog.at_level(logging.ERROR, logger="llm_spend"):
        record = await tracker.track(**VALID)
    assert isinstance(record, CallRecord)
    assert tracker.spool.dropped == 1 and "LOST" in caplog.text
    assert await count(sqlite_url, "llm_calls") == 0


def test_a_tracker_entered_together_under_one_asyncio_run_then_another_starts_in_each(
    sqlite_url: str,
) -> None:
    """Two tasks entering one tracker together, under `asyncio.run` and then under another: the second
    run's tasks wait on a lock of their own loop, not the first run's (which would raise)."""
    tracker = Tracker(sqlite_url)

    async def use() -> None:
        async with tracker:
            await tracker.track(**VALID)

    async def together() -> None:
        await asyncio.gather(use(), use())

    asyncio.run(together())
    asyncio.run(together())
    assert asyncio.run(count(sqlite_url, "llm_calls")) == 4


async def test_tasks_entering_one_tracker_together_start_it_once(sqlite_url: str) -> None:
    """Two tasks entering the same tracker at once (two lifespans sharing it) start one writer; the
    last exit stops it, in time, and leaves no task behind."""
    tracker = Tracker(sqlite_url, shutdown_timeout=30)
    before = asyncio.all_tasks()

    async def use() -> None:
        async with tracker:
            await tracker.track(**VALID)

    await asyncio.wait_for(asyncio.gather(use(), use()), timeout=20)  # a hang guard, not a timing check
    assert asyncio.all_tasks() - before == set()
    assert await count(sqlite_url, "llm_calls") == 2


async def test_calls_are_written_when_the_block_exits_with_an_error(sqlite_url: str) -> None:
    """An exception leaving `async with tracker` still leaves every tracked call in the database."""
    with pytest.raises(RuntimeError, match="app crashed"):
        async with Tracker(sqlite_url) as tracker:
            await asyncio.gather(*(tracker.track(**VALID) for _ in range(50)))
            raise RuntimeError("app crashed")
    assert await count(sqlite_url, "llm_calls") == 50


async def test_cancelled_caller_still_gets_its_call_recorded(
    sqlite_url: str, tracker_factory: Factory
) -> None:
    """A track() whose caller is cancelled after submitting is still written, and later calls work."""
    tracker = await tracker_factory(sqlite_url)
    task = asyncio.create_task(tracker.track(**VALID))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await tracker.track(**VALID)
    assert await count(sqlite_url, "llm_calls") == 2


async def test_two_trackers_on_one_database_keep_rollups_equal_to_ledger(
    db_url: str, tracker_factory: Factory
) -> None:
    """Two trackers (as two processes) writing concurrently to one database keep rollups == ledger sums."""
    budgets = [Budget.daily(10_000, per="user_id")]
    a = await tracker_factory(db_url, budgets=budgets)
    b = await tracker_factory(db_url, budgets=budgets)

    async def one(tracker: Tracker, i: int) -> CallRecord:
        return await tracker.track(**VALID, tags={"user_id": f"u{i % 5}"})

    records = await asyncio.gather(*(one(t, i) for i in range(150) for t in (a, b)))
    total = sum(r.cost_nanousd or 0 for r in records)
    ledger = (await query(db_url, "SELECT SUM(cost_nanousd) AS s, COUNT(*) AS n FROM llm_calls"))[0]
    assert (int(ledger["s"]), int(ledger["n"])) == (total, 300)
    rollups = await query(
        db_url, "SELECT period, scope_key, scope_value, spent_nanousd, calls FROM llm_spend_rollups"
    )
    for period in ("day", "month"):
        glob = [r for r in rollups if r["period"] == period and r["scope_key"] == ""]
        assert [(r["spent_nanousd"], r["calls"]) for r in glob] == [(total, 300)]
    per_user = {r["scope_value"]: r["calls"] for r in rollups if r["scope_key"] == "user_id"}
    assert per_user == {f"u{i}": 60 for i in range(5)}


async def test_in_memory_sqlite_database_works(tracker_factory: Factory) -> None:
    """An in-memory SQLite URL migrates and records (one shared connection)."""
    tracker = await tracker_factory("sqlite+aiosqlite://")
    seen: list[CallRecord] = []
    tracker.subscribe(seen.append)
    record = await tracker.track(**VALID)
    assert seen == [record]
    assert record.cost is not None


async def test_in_memory_database_reads_while_writes_are_under_way() -> None:
    """On an in-memory database (one connection) a report or budget status read while calls are
    written answers, and the totals add up: its one connection is lent to one user at a time. It
    was shared, and a read beginning while a write's transaction was open there failed ("cannot
    start a transaction within a transaction")."""
    since = datetime.now(UTC) - timedelta(days=1)
    async with Tracker("sqlite+aiosqlite://", budgets=[Budget.daily(100)]) as tracker:

        async def write() -> list[CallRecord]:
            return [await tracker.track(**VALID) for _ in range(150)]

        async def read() -> int:
            for _ in range(150):
                await tracker.budget_status()
                await tracker.report(start=since, group_by=["model"])
            return 150

        records, reads = await asyncio.gather(write(), read())
        [row] = await tracker.report(start=since)
        [status] = await tracker.budget_status()
    assert reads == 150 and row.calls == 150
    assert row.cost == status.spent == sum(r.cost for r in records if r.cost is not None) > 0


async def test_a_tracker_exit_cancelled_again_and_again_still_writes_what_was_submitted(db_url: str) -> None:
    """An exit under anyio's cancel scope (which cancels the task again on every loop turn) still
    waits out the calls submitted before it, up to `shutdown_timeout`, and closes the store: each
    call is in the ledger when the exit returns. It used to stop at the first cancellation inside
    the writer's drain, before the calls were written or spooled."""
    tracker = Tracker(db_url)
    with anyio.CancelScope() as scope:
        async with tracker:
            tracked = [asyncio.ensure_future(tracker.track(**VALID)) for _ in range(200)]
            await asyncio.sleep(0)  # every call's write queued
            scope.cancel()
    written = [task.done() and not task.cancelled() for task in tracked]  # as the exit returns
    assert scope.cancelled_caught and all(written)
    assert await count(db_url, "llm_calls") == 200


async def test_guarded_calls_cancelled_again_and_again_in_their_block_are_released_by_the_exit(
    db_url: str,
) -> None:
    """Guarded calls timed out inside their block under anyio (re-cancelled on every loop turn)
    stop waiting for their release, which goes on: the tracker's exit waits for those releases,
    so no reservation stays held for the sweep."""
    async with Tracker(db_url, budgets=[Budget.daily(100, mode="block")]) as tracker:

        async def call() -> None:
            with anyio.move_on_after(0.05):
                async with tracker.guard(
                    provider="openai", model="gpt-4o-mini", input_tokens=10, max_output_tokens=10
                ):
                    await asyncio.sleep(1)

        await asyncio.gather(*(call() for _ in range(40)))
    held = await query(db_url, "SELECT reserved_nanousd FROM llm_spend_rollups WHERE scope_key = ''")
    assert await count(db_url, "llm_spend_reservations") == 0
    assert [row["reserved_nanousd"] for row in held] == [0]  # the day's window


async def self_exiting(tracker: Tracker, proxy: FreezingProxy) -> None:
    """A call written, then three more once the server stopped answering, then the exit."""
    async with tracker:
        await tracker.track(**VALID)
        proxy.frozen.set()
        stuck = [asyncio.ensure_future(tracker.track(**VALID)) for _ in range(3)]
        await asyncio.sleep(0.05)
    assert all(call.done() for call in stuck)  # spooled by the exit


async def test_a_tracker_exit_returns_when_the_server_stops_answering(pg_url: str, tmp_path: Path) -> None:
    """The server stops answering while calls are written: the exit, cancelled or not, returns
    within its bounds (the drain's and the close's `shutdown_timeout`) with the calls in the spool,
    which the next start replays. The close of the store's connections waited for the server
    without end, and a cancelled exit could not be stopped."""
    proxy = FreezingProxy()
    url = make_url(pg_url)
    port = await proxy.start(url.port or 5432)
    relayed = url.set(port=port).render_as_string(hide_password=False)
    spool = tmp_path / "calls.spool"
    try:
        for cancelled in (False, True):
            proxy.frozen.clear()
            tracker = Tracker(relayed, shutdown_timeout=0.5, spool_path=str(spool))
            leaving = asyncio.ensure_future(self_exiting(tracker, proxy))
            if cancelled:
                await asyncio.sleep(0.3)
                leaving.cancel()
            done, _ = await asyncio.wait({leaving}, timeout=60)  # a guard against a hang only
            assert done, "the exit did not return"
            assert leaving.cancelled() == cancelled
            assert len(spool.read_text().splitlines()) == 3  # its three calls, for the next start
    finally:
        await proxy.close()
    assert await count(pg_url, "llm_calls") == 5  # the first exit's three were replayed at the next start


def test_starlette_lifespan_runs_the_tracker(db_url: str) -> None:
    """Starlette(lifespan=tracker.lifespan) migrates, serves tracking endpoints and flushes on shutdown."""
    tracker = Tracker(db_url)

    async def endpoint(request: Request) -> JSONResponse:
        record = await tracker.track(**VALID)
        return JSONResponse({"cost": str(record.cost)})

    app = Starlette(routes=[Route("/", endpoint)], lifespan=tracker.lifespan)
    with TestClient(app) as client:
        for _ in range(5):
            assert client.get("/").status_code == 200
    assert asyncio.run(count(db_url, "llm_calls")) == 5


async def test_tracker_can_be_entered_again_after_exit(sqlite_url: str) -> None:
    """A tracker that exited can be entered again and keeps recording into the same ledger."""
    tracker = Tracker(sqlite_url)
    async with tracker:
        await tracker.track(**VALID)
    async with tracker:
        await tracker.track(**VALID)
    assert await count(sqlite_url, "llm_calls") == 2


async def test_nested_enter_keeps_tracker_running_until_outermost_exit(sqlite_url: str) -> None:
    """Entering twice (lifespan plus async with) keeps it running until the last exit."""
    tracker = Tracker(sqlite_url)
    async with tracker.lifespan(None):
        async with tracker:
            await tracker.track(**VALID)
        await tracker.track(**VALID)
    assert await count(sqlite_url, "llm_calls") == 2


async def test_auto_migrate_false_leaves_database_empty_until_migrate(db_url: str) -> None:
    """With auto_migrate=False entering creates no tables; `await tracker.migrate()` then creates them."""
    tracker = Tracker(db_url, auto_migrate=False)
    async with tracker:
        assert [t for t in await table_names(db_url) if t.startswith("llm_")] == []
        await tracker.migrate()
        names = set(await table_names(db_url))
        assert {"llm_calls", "llm_spend_rollups", "llm_spend_reservations"} <= names
        record = await tracker.track(**VALID)
    assert (await query(db_url, "SELECT event_id FROM llm_calls")) == [{"event_id": record.event_id}]


async def test_a_read_of_a_database_never_migrated_says_so(db_url: str) -> None:
    """With auto_migrate=False and no migration, report(), total() and budget_status() raise a
    StorageError that says what to run, not the driver's "no such table"; open or not."""
    tracker = Tracker(db_url, auto_migrate=False, budgets=[Budget.daily(1)])
    start = datetime(2000, 1, 1, tzinfo=UTC)
    reads = (
        lambda: tracker.report(start=start),
        lambda: tracker.total(start=start),
        tracker.budget_status,
    )
    for read in reads:
        with pytest.raises(StorageError, match=r"no llm-spend schema yet: run `llm-spend db upgrade`"):
            await read()
    async with tracker:
        for read in reads:
            with pytest.raises(StorageError, match="no llm-spend schema yet"):
                await read()
        await tracker.migrate()
        assert (await tracker.total(start=start)).calls == 0


async def test_migrate_twice_is_fine(db_url: str) -> None:
    """migrate() is idempotent: twice before and once more while running changes nothing and keeps data."""
    tracker = Tracker(db_url)
    await tracker.migrate()
    await tracker.migrate()
    async with tracker:
        await tracker.track(**VALID)
        await tracker.migrate()
        await tracker.track(**VALID)
    assert await count(db_url, "llm_calls") == 2


async def test_a_guarded_call_under_a_block_budget_needs_the_tracker_open(db_url: str) -> None:
    """Before the tracker is entered, every guarded call raises RuntimeError before its body runs:
    the call would be made and billed, and recorded nowhere. After it exits, one under a block-mode
    budget raises too, reserving nothing (no one would release what it reserved, which would hold
    the budget until its lease ended); one that no block-mode budget applies to needs no
    reservation and goes on, its record spooled for the next start."""
    tracker = Tracker(db_url, budgets=[Budget.daily("1.00", per="user_id", mode="block")])
    await tracker.migrate()  # the table a reservation would be held in exists from the start
    call = {"provider": "openai", "model": "gpt-4o-mini", "input_tokens": 10, "max_output_tokens": 10}
    for tags in ({"user_id": "u1"}, {}):
        with pytest.raises(RuntimeError, match=r"the tracker is not running; enter it"):
            async with tracker.guard(**call, tags=tags):
                pytest.fail(f"a guarded call with tags {tags} ran before the tracker was entered")
    async with tracker:
        pass
    with pytest.raises(RuntimeError, match=r"block-mode budget needs the tracker open"):
        async with tracker.guard(**call, tags={"user_id": "u1"}):
            pytest.fail("a guarded call ran after the tracker exited")
    async with tracker.guard(**call) as unguarded:  # no user_id: no window applies
        assert unguarded.estimate is None
    assert await count(db_url, "llm_spend_reservations") == 0


async def test_reads_outside_the_trackers_lifetime_leave_no_connection_open(pg_url: str) -> None:
    """A migration before the tracker is entered and reads after it exits answer, and close what
    they opened: a PostgreSQL connection left in the pool would outlive its event loop."""
    tracker = Tracker(pg_url, auto_migrate=False)
    await tracker.migrate()
    assert await asyncio.to_thread(pg_sessions, pg_url) == 0
    async with tracker:
        await tracker.track(**VALID)
    total, statuses = await asyncio.gather(
        tracker.total(start=datetime(2000, 1, 1, tzinfo=UTC)), tracker.budget_status()
    )
    health = await tracker.health()
    assert (total.calls, statuses, health.schema_current) == (1, [], True)
    assert await asyncio.to_thread(pg_sessions, pg_url) == 0


@pytest.mark.parametrize(
    ("options", "named"),
    [
        pytest.param(
            {"spool_path": "."}, "spool_path must be the path of a file, not of a directory", id="spool-dir"
        ),
        pytest.param({"spool_path": ""}, "spool_path must be the path of a file", id="spool-empty"),
        pytest.param({"spool_path": 123}, "spool_path must be the path of a file", id="spool-int"),
        pytest.param({"spool_path": "a\x00b"}, "spool_path must be the path of a file", id="spool-nul"),
        pytest.param({"auto_migrate": "false"}, "auto_migrate must be True or False", id="auto-migrate-str"),
        pytest.param({"clamp_max_tokens": "no"}, "clamp_max_tokens must be True or False", id="clamp-str"),
        pytest.param({"max_batch": True}, "max_batch must be a positive integer", id="max-batch-bool"),
        pytest.param({"max_queue": 0}, "max_queue must be a positive integer", id="max-queue-0"),
        pytest.param({"reservation_ttl": math.inf}, "reservation_ttl must be", id="ttl-inf"),
        pytest.param({"reservation_ttl": math.nan}, "reservation_ttl must be", id="ttl-nan"),
        pytest.param(
            {"reservation_ttl": 3e11}, "reservation_ttl must be .* from 1 to 2,592,000", id="ttl-huge"
        ),
        pytest.param({"sweep_interval": math.inf}, "sweep_interval must be", id="sweep-inf"),
        pytest.param({"reservation_ttl": 1e-300}, "reservation_ttl must be .* from 1 to", id="ttl-tiny"),
        pytest.param({"sweep_interval": 5e-324}, "sweep_interval must be .* from 0.1 to", id="sweep-tiny"),
        pytest.param(
            {"shutdown_timeout": 0}, "shutdown_timeout must be a number of seconds above 0", id="shutdown-0"
        ),
        pytest.param(
            {"default_max_output_tokens": 0}, "default_max_output_tokens must be at least 1", id="dmot-0"
        ),
        pytest.param({"clamp_min_output_tokens": 10**15}, "clamp_min_output_tokens of", id="cmot-huge"),
        pytest.param({"prices_file": 123}, "prices_file must be a path", id="prices-file-int"),
    ],
)
def test_constructor_options_are_checked_naming_the_option(
    sqlite_url: str, options: dict[str, Any], named: str
) -> None:
    """Each option of the wrong type or out of range raises ValueError naming it when the tracker
    is built (a bool option does not take a string's truth; a spool never names a directory)."""
    with pytest.raises(ValueError, match=named):
        Tracker(sqlite_url, **options)


def test_a_short_reservation_ttl_has_streams_renew_their_lease_in_time(sqlite_url: str) -> None:
    """Streams renew their reservation every 60 s, or every half lease when it is shorter: with
    reservation_ttl=30 a stream longer than 30 s lost its reservation to the sweep before."""
    assert Tracker(sqlite_url).capture.lease_renewal == 60
    assert Tracker(sqlite_url, reservation_ttl=30).capture.lease_renewal == 15


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://127.0.0.1/test",
        "sqlite:///ledger.db",
        "mysql+aiomysql://u@h/db",
        "",
        "not a url",
        None,
        Path("ledger.db"),
        "sqlite+aiosqlite:///ledger\x00.db",
    ],
)
def test_a_url_the_tracker_cannot_use_raises_naming_url(url: Any) -> None:
    """A sync driver (which would fail at its first connection, or import a missing module), another
    database, something not a URL string."""
    with pytest.raises(ValueError, match=r"^url"):
        Tracker(url)


async def test_a_sqlite_folder_is_needed_when_the_tracker_starts_not_when_it_is_built(tmp_path: Path) -> None:
    """An app may build the tracker at import and make the data folder in its lifespan; entering
    without it names the folder (it was an OperationalError, "unable to open database file")."""
    folder = tmp_path / "data"
    tracker = Tracker(f"sqlite+aiosqlite:///{folder / 'ledger.db'}", spool_path=tmp_path / "s")
    with pytest.raises(
        ValueError, match=r"^url: the folder of the SQLite database file, '.*data', does not exist"
    ):
        await tracker.__aenter__()
    folder.mkdir()
    async with tracker:
        await tracker.track(**VALID)
    assert await count(f"sqlite+aiosqlite:///{folder / 'ledger.db'}", "llm_calls") == 1


def test_flags_and_counts_take_their_usual_python_spellings(sqlite_url: str) -> None:
    """0 and 1 for a flag, an IntEnum for a count; a string never (it was taken for its truth)."""
    tracker = Tracker(sqlite_url, auto_migrate=0, clamp_max_tokens=1, max_batch=HTTPStatus.OK)
    assert tracker.auto_migrate is False


async def test_replay_never_moves_a_directory_found_where_the_spool_file_goes(
    sqlite_url: str, tmp_path: Path
) -> None:
    """A directory made at the spool's path after the tracker was built is left where it is."""
    folder = tmp_path / "spool"
    tracker = Tracker(sqlite_url, spool_path=folder)
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    async with tracker:
        await tracker.track(**VALID)
    assert (folder / "keep.txt").read_text() == "mine"
    assert [name for name in os.listdir(tmp_path) if name.startswith("spool")] == ["spool"]


async def test_a_stream_event_with_bad_counts_or_text_is_recorded_unknown_not_cheaper_or_lost(
    db_url: str, tracker_factory: Factory
) -> None:
    """A stream whose last event reports a count that is not one (5.0) and a model with NUL (which
    no database stores: PostgreSQL refused the write, and the call went to the spool's rejects) is
    recorded under the requested model, with unknown usage and NULL cost, never at $0."""
    tracker = await tracker_factory(db_url)
    async with tracker.track_stream(provider="openai", model="gpt-4o-mini") as s:
        s.event({"id": "c1", "model": "gpt\x00-4o", "choices": [],
                 "usage": {"prompt_tokens": 100, "completion_tokens": 5.0}})  # fmt: skip
    rows = await query(
        db_url, "SELECT model, pricing_status, cost_nanousd FROM llm_calls WHERE provider_response_id = 'c1'"
    )
    assert rows == [{"model": "gpt-4o-mini", "pricing_status": "unknown_usage", "cost_nanousd": None}]


async def test_an_errored_stream_with_50_tags_is_recorded_with_its_error_as_a_51st(
    sqlite_url: str, tracker_factory: Factory
) -> None:
    """The `stream_errored` tag goes past the 50-tag limit rather than lose the call, or replace the
    caller's error with a ValueError about tags."""
    tracker = await tracker_factory(sqlite_url)
    tags = {f"k{i}": "v" for i in range(50)}
    with pytest.raises(ConnectionError, match="cut"):
        async with tracker.track_stream(provider="openai", model="gpt-4o-mini", tags=tags) as s:
            s.usage(input_tokens=1000, output_tokens=1000)
            raise ConnectionError("cut")
    [row] = await query(sqlite_url, "SELECT tags, output_tokens FROM llm_calls")
    assert row["output_tokens"] == 1000
    assert json.loads(row["tags"]) == {**tags, "stream_errored": "true"}


async def test_manual_streams_name_what_is_wrong_with_an_event_or_totals(
    sqlite_url: str, tracker_factory: Factory
) -> None:
    """An event that is no JSON object (tuple keys, a lone surrogate) or totals with an unknown
    keyword raise ValueError; the stream is still recorded when its block ends."""
    tracker = await tracker_factory(sqlite_url)
    async with tracker.track_stream(provider="openai", model="gpt-4o-mini") as s:
        with pytest.raises(ValueError, match="event must be a JSON object"):
            s.event({"type": "\ud800"})
        with pytest.raises(ValueError, match="event must be a JSON object"):
            s.event({(1, 2): 3})  # type: ignore[dict-item]
        with pytest.raises(ValueError, match=r"usage takes the token counts .*; got 'bogus'"):
            s.usage(bogus=3)
        s.usage(input_tokens=10, output_tokens=2)
    [row] = await query(sqlite_url, "SELECT input_tokens, output_tokens FROM llm_calls")
    assert row == {"input_tokens": 10, "output_tokens": 2}


async def test_a_latency_that_is_an_int_subclass_is_stored_as_its_number(
    sqlite_url: str, tracker_factory: Factory
) -> None:
    """As token counts are: an IntEnum member is its int."""
    tracker = await tracker_factory(sqlite_url)
    record = await tracker.track(**VALID, latency_ms=HTTPStatus.OK)
    assert type(record.latency_ms) is int and record.latency_ms == 200


RECORD_FIELDS = [
    pytest.param({"latency_ms": "fast"}, "latency_ms", id="latency-str"),
    pytest.param({"latency_ms": -5}, "latency_ms", id="latency-negative"),
    pytest.param({"latency_ms": 2**31}, "latency_ms", id="latency-over-int32"),
    pytest.param({"service_tier": 123}, "service_tier", id="tier-int"),
    pytest.param({"service_tier": "t" * 65}, "service_tier", id="tier-long"),
    pytest.param({"provider_response_id": object()}, "provider_response_id", id="id-object"),
    pytest.param({"provider_response_id": "a\x00b"}, "provider_response_id", id="id-nul"),
    pytest.param({"usage_source": "bogus"}, "usage_source", id="source-bogus"),
    pytest.param({"stream": "yes"}, "stream", id="stream-str"),
    pytest.param({"model": ""}, "model", id="model-empty"),
]


@pytest.mark.parametrize(("field", "named"), RECORD_FIELDS)
async def test_a_guarded_calls_record_checks_its_fields_naming_them(
    db_url: str, tracker_factory: Factory, field: dict[str, Any], named: str
) -> None:
    """`call.record(usage, ...)` raises ValueError naming a bad field before anything is written, and
    the call can then be recorded as it should; its reservation is settled once. Before, such a
    record was written as given (text in an integer column), or failed its write and was set aside
    with its reservation held until the lease ended."""
    tracker = await tracker_factory(db_url, budgets=[Budget.daily(5, mode="block")])
    usage = Usage(input_tokens=100, output_tokens=20)
    async with tracker.guard(
        provider="openai", model="gpt-4o-mini", input_tokens=100, max_output_tokens=50
    ) as call:
        with pytest.raises(ValueError, match=named):
            call.record(usage, **field)
        record = await call.record(usage, latency_ms=12, service_tier="default", provider_response_id="r1")
    rows = await query(
        db_url, "SELECT latency_ms, service_tier, provider_response_id, cost_nanousd FROM llm_calls"
    )
    assert rows == [
        {
            "latency_ms": 12,
            "service_tier": "default",
            "provider_response_id": "r1",
            "cost_nanousd": record.cost_nanousd,
        }
    ]
    assert await count(db_url, "llm_spend_reservations") == 0


@pytest.mark.parametrize("timezone", ["Not/AZone", "", "UTC+5"])
def test_bad_timezone_raises_value_error_naming_timezone(sqlite_url: str, timezone: str) -> None:
    """Tracker(timezone=...) with a name that is not an IANA zone raises ValueError naming timezone."""
    with pytest.raises(ValueError, match="timezone"):
        Tracker(sqlite_url, timezone=timezone)


def test_bad_mode_raises_value_error_naming_mode(sqlite_url: str) -> None:
    """Tracker(mode=...) outside notify/raise/block raises ValueError naming mode."""
    with pytest.raises(ValueError, match="mode"):
        Tracker(sqlite_url, mode="loud")


# -- subscribers ----------------------------------------------------------------------------------------


async def test_sync_and_async_subscribers_get_each_record_after_commit(
    db_url: str, tracker_factory: Factory
) -> None:
    """Sync and async subscribers receive each CallRecord, and the row is already committed then."""
    tracker = await tracker_factory(db_url)
    sync_seen: list[CallRecord] = []
    async_seen: list[tuple[CallRecord, int]] = []

    async def on_async(record: CallRecord) -> None:
        rows = await query(
            db_url, "SELECT COUNT(*) AS n FROM llm_calls WHERE event_id = :e", e=record.event_id
        )
        async_seen.append((record, int(rows[0]["n"])))

    tracker.subscribe(sync_seen.append)
    tracker.subscribe(on_async)
    first = await tracker.track(**VALID)
    second = await tracker.track(**VALID, tags={"x": "y"})
    assert [r.event_id for r in sync_seen] == [first.event_id, second.event_id]
    assert [(r.event_id, n) for r, n in async_seen] == [(first.event_id, 1), (second.event_id, 1)]
    assert sync_seen[1].tags == {"x": "y"}


async def test_subscribers_get_the_record_of_a_call_that_raised_budget_exceeded(
    sqlite_url: str, tracker_factory: Factory
) -> None:
    """A call recorded and then refused by a raise-mode budget is still delivered to subscribers."""
    tracker = await tracker_factory(sqlite_url, budgets=[Budget.per_call("0.0001", mode="raise")])
    seen: list[CallRecord] = []
    tracker.subscribe(seen.append)
    from llm_spend import BudgetExceeded

    with pytest.raises(BudgetExceeded):
        await tracker.track(**VALID)
    assert len(seen) == 1
    assert (await query(sqlite_url, "SELECT event_id FROM llm_calls")) == [{"event_id": seen[0].event_id}]


async def test_unsubscribe_stops_delivery(sqlite_url: str, tracker_factory: Factory) -> None:
    """The callable returned by subscribe() stops further deliveries of its subscription; called
    again it does nothing (it raised list.remove's ValueError, or would end another subscription
    of the same callable)."""
    tracker = await tracker_factory(sqlite_url)
    seen: list[CallRecord] = []
    unsubscribe = tracker.subscribe(seen.append)
    other = tracker.subscribe(seen.append)  # the same callable, subscribed twice: two deliveries
    await tracker.track(**VALID)
    unsubscribe()
    unsubscribe()
    await tracker.track(**VALID)
    assert len(seen) == 3
    other()
    await tracker.track(**VALID)
    assert len(seen) == 3


async def test_raising_subscriber_is_logged_and_recording_continues(
    sqlite_url: str, tracker_factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """A subscriber that raises (a CancelledError of its own included) is logged; track() still
    returns, the row is stored, others still get it."""
    tracker = await tracker_factory(sqlite_url)
    seen: list[CallRecord] = []

    def broken(record: CallRecord) -> None:
        raise RuntimeError("subscriber exploded")

    async def broken_async(record: CallRecord) -> None:
        raise KeyError("async subscriber exploded")

    async def cancelled_inside(record: CallRecord) -> None:  # an await of its own, cancelled
        waiting = asyncio.get_running_loop().create_future()
        waiting.cancel()
        await waiting

    tracker.subscribe(broken)
    tracker.subscribe(broken_async)
    tracker.subscribe(cancelled_inside)  # it broke track() with CancelledError, the others skipped
    tracker.subscribe(seen.append)
    with caplog.at_level(logging.ERROR, logger="llm_spend"):
        first = await tracker.track(**VALID)
        second = await tracker.track(**VALID)
    assert [r.event_id for r in seen] == [first.event_id, second.event_id]
    assert await count(sqlite_url, "llm_calls") == 2
    messages = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert "subscriber exploded" in caplog.text or "subscriber exploded" in messages
    assert "async subscriber exploded" in caplog.text or "async subscriber exploded" in messages
    assert sum(1 for r in caplog.records if r.levelno >= logging.ERROR) >= 4


def test_subscribe_rejects_non_callable(sqlite_url: str) -> None:
    """subscribe() with something that is not callable raises ValueError."""
    with pytest.raises(ValueError, match="callback"):
        Tracker(sqlite_url).subscribe("nope")  # type: ignore[arg-type]


async def test_batch_and_service_tier_are_priced_and_stored(sqlite_url: str) -> None:
    """track(batch=True) prices at batch rates and stores service_tier "batch"; a tier is priced as given."""
    from datetime import UTC, datetime

    from genai_prices import Usage as GenaiUsage
    from genai_prices import calc_price

    from llm_spend.money import to_nanousd

    async with Tracker(sqlite_url) as tracker:
        batch = await tracker.track(
            provider="openai", model="gpt-4o", input_tokens=1000, output_tokens=100, batch=True
        )
        priority = await tracker.track(
            provider="openai", model="gpt-4o", input_tokens=1000, output_tokens=100, service_tier="priority"
        )
    now = datetime.now(UTC)
    usage = GenaiUsage(input_tokens=1000, output_tokens=100)
    expected_batch = calc_price(usage, "gpt-4o", provider_id="openai", genai_request_timestamp=now,
                                price_context={"processing": "batch"})  # fmt: skip
    expected_priority = calc_price(usage, "gpt-4o", provider_id="openai", genai_request_timestamp=now,
                                   price_context={"service_tier": "priority"})  # fmt: skip
    assert batch.service_tier == "batch" and batch.cost_nanousd == to_nanousd(expected_batch.total_price)
    assert priority.cost_nanousd == to_nanousd(expected_priority.total_price)
    assert batch.cost_nanousd != priority.cost_nanousd
