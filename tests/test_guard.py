"""Block mode: reservations that hold under concurrency, across processes, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from conftest import PG_URL
from llm_spend import (
    Budget,
    BudgetExceeded,
    CallRecord,
    LLMSpendError,
    SpendMiddleware,
    Tracker,
    UnknownPriceError,
    Usage,
    with_tags,
)
from llm_spend.money import from_nanousd
from llm_spend.storage.rows import PendingWrite
from llm_spend.storage.schema import calls, reservations, rollups
from llm_spend.storage.spool import Spool

MODEL = "gpt-4o-mini"
WORKER = Path(__file__).with_name("guard_worker.py")


async def ledger(url: str) -> dict[str, Any]:
    """What a user would query: ledger sums, the global day rollup, reservations outstanding."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            spent, count = (
                await conn.execute(select(func.coalesce(func.sum(calls.c.cost_nanousd), 0), func.count()))
            ).one()
            day = (
                await conn.execute(
                    select(rollups.c.spent_nanousd, rollups.c.reserved_nanousd, rollups.c.calls).where(
                        rollups.c.period == "day", rollups.c.scope_key == ""
                    )
                )
            ).all()
            held = (await conn.execute(select(func.count()).select_from(reservations))).scalar_one()
    finally:
        await engine.dispose()
    return {"spent": int(spent), "calls": count, "day": day, "reservations": held}


async def test_300_concurrent_guarded_calls_never_overshoot(db_url: str) -> None:
    """300 concurrent guarded calls against $0.10/day: spend <= limit, refusals preflight, not gratuitous."""
    limit = Decimal("0.10")
    reached_provider = 0
    refused: list[BudgetExceeded] = []
    async with Tracker(db_url, budgets=[Budget.daily(limit, mode="block")]) as tracker:

        async def one() -> None:
            nonlocal reached_provider
            try:
                async with tracker.guard(
                    provider="openai", model=MODEL, input_tokens=1000, max_output_tokens=500
                ) as call:
                    reached_provider += 1
                    await asyncio.sleep(0.001)
                    await call.record(Usage(input_tokens=1000, output_tokens=500))
            except BudgetExceeded as exc:
                refused.append(exc)

        await asyncio.gather(*(one() for _ in range(300)))
    state = await ledger(db_url)
    assert from_nanousd(state["spent"]) <= limit
    assert from_nanousd(state["spent"]) >= limit / 2
    assert refused and all(exc.stage == "preflight" for exc in refused)
    assert reached_provider + len(refused) == 300
    assert state["calls"] == reached_provider  # refused calls never reached the provider nor the ledger
    assert state["day"][0][0] == state["spent"] and state["day"][0][1] == 0
    assert state["reservations"] == 0


def _run_workers(url: str, limit: str, processes: int, calls_each: int) -> list[dict[str, Any]]:
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), url, limit, str(calls_each)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


async def test_four_processes_share_one_budget(db_url: str) -> None:
    """4 processes x 120 guarded calls on one database: spend <= limit, rollups == ledger, no lock errors."""
    async with Tracker(db_url):  # migrate once, as a deploy would
        pass
    limit = Decimal("0.05")
    results = await asyncio.to_thread(_run_workers, db_url, str(limit), 4, 120)
    assert all(result["errors"] == [] for result in results), results
    served = sum(result["served"] for result in results)
    assert served + sum(result["refused"] for result in results) == 480
    state = await ledger(db_url)
    assert from_nanousd(state["spent"]) <= limit
    assert from_nanousd(state["spent"]) >= limit / 2
    assert state["calls"] == served
    assert state["day"][0][0] == state["spent"] and state["day"][0][2] == served
    assert state["day"][0][1] == 0 and state["reservations"] == 0


async def test_killed_process_reservation_is_swept(db_url: str) -> None:
    """A process SIGKILLed holding a reservation: after the sweep, reserved is what live callers hold."""
    async with Tracker(db_url, budgets=[Budget.daily(1, mode="block")]) as tracker:
        proc = subprocess.Popen(  # noqa: ASYNC220 - started once; its output is read below
            [sys.executable, str(WORKER), db_url, "1", "0", "hold"], stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout is not None
            assert json.loads(proc.stdout.readline()) == {"holding": True}
            async with tracker.guard(
                provider="openai", model=MODEL, input_tokens=10, max_output_tokens=10
            ) as call:
                ours = call.reservation
                assert ours is not None
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                before = (await ledger(db_url))["day"][0][1]
                assert before > ours.estimate  # the dead process's money is still held
                await asyncio.sleep(1.2)  # its lease (1 s) runs out
                from datetime import UTC, datetime

                assert await tracker.store.sweep(datetime.now(UTC)) == 1
                state = await ledger(db_url)
                assert state["day"][0][1] == ours.estimate
                assert state["reservations"] == 1
                await call.record(Usage(input_tokens=10, output_tokens=10))
        finally:
            if proc.poll() is None:
                proc.kill()
    state = await ledger(db_url)
    assert state["day"][0][1] == 0 and state["reservations"] == 0


async def test_per_user_budget_refuses_one_user_and_serves_another(db_url: str) -> None:
    """A per-user daily block budget: user a is refused while user b is served, in the same second."""
    budget = Budget.daily("0.001", per="user_id", mode="block")
    async with Tracker(db_url, budgets=[budget]) as tracker:
        with with_tags(user_id="a"):
            async with tracker.guard(
                provider="openai", model=MODEL, input_tokens=1000, max_output_tokens=500
            ) as c:
                await c.record(Usage(input_tokens=1000, output_tokens=500))
            with pytest.raises(BudgetExceeded) as refused:
                async with tracker.guard(
                    provider="openai", model=MODEL, input_tokens=1000, max_output_tokens=500
                ):
                    pytest.fail("user a should have been refused before the call")
        async with tracker.guard(
            provider="openai", model=MODEL, input_tokens=1000, max_output_tokens=500, tags={"user_id": "b"}
        ) as call:
            record = await call.record(Usage(input_tokens=1000, output_tokens=500))
    exc = refused.value
    assert exc.budget is budget and exc.stage == "preflight"
    assert exc.scope == "user_id" and exc.scope_value == "a"
    assert exc.spent == record.cost and exc.reserved == 0
    assert exc.requested > 0 and exc.spent + exc.requested > exc.limit
    assert exc.window_start is not None and exc.window_end is not None and exc.retry_after is not None
    assert record.tags["user_id"] == "b"


async def test_cancelled_guarded_call_releases_its_reservation(db_url: str) -> None:
    """Cancelling a guarded call mid-flight releases what it reserved; nothing is recorded."""
    async with Tracker(db_url, budgets=[Budget.daily(1, mode="block")]) as tracker:
        entered = asyncio.Event()

        async def slow_call() -> None:
            async with tracker.guard(provider="openai", model=MODEL, input_tokens=100, max_output_tokens=100):
                entered.set()
                await asyncio.sleep(60)

        task = asyncio.create_task(slow_call())
        await entered.wait()
        assert (await ledger(db_url))["day"][0][1] > 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        state = await ledger(db_url)
        assert state["day"][0][1] == 0 and state["reservations"] == 0 and state["calls"] == 0


async def cancel_while_entering(tracker: Tracker) -> tuple[int, list[CallRecord]]:
    """Twelve guarded calls at a time, eight times, all but three cancelled at every point of
    entering: before their reservation is sent, while its statement runs (their task is woken once
    it ended, and gives back what it was granted), and after it, inside the block. Returns how many
    entered the block, and the records of the three a time never cancelled."""
    entered, records = 0, []

    async def call(i: int, recorded: bool) -> None:
        nonlocal entered
        tags = {"user_id": f"u{i % 3}"}
        async with tracker.guard(
            provider="openai", model=MODEL, input_tokens=100, max_output_tokens=100, tags=tags
        ) as guarded:
            entered += 1
            if recorded:
                records.append(await guarded.record(Usage(input_tokens=100, output_tokens=10)))
                assert records[-1].event_id == guarded.reservation.id  # one id per guarded call
                return
            await asyncio.sleep(60)

    for delay in (None, 0, 0, 0.0003, 0.001, 0.002, 0.004, 0.008):
        tasks = [asyncio.create_task(call(i, recorded=i % 4 == 0)) for i in range(12)]
        if delay is not None:
            await asyncio.sleep(delay)
        for i, task in enumerate(tasks):
            if i % 4:
                task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert [r for r in results if not isinstance(r, asyncio.CancelledError)] == [None] * 3
    return entered, records


GUARD_BUDGETS = [Budget.daily(1, mode="block"), Budget.daily(1, per="user_id", mode="block")]


async def test_guarded_calls_cancelled_while_they_reserve_leave_nothing_reserved(db_url: str) -> None:
    """`cancel_while_entering` on each database: none stays reserved; the calls never cancelled
    are recorded, each under its reservation's id."""
    async with Tracker(db_url, budgets=GUARD_BUDGETS) as tracker:
        entered, records = await cancel_while_entering(tracker)
    assert entered > len(records) == 24  # some of the cancelled calls had reserved
    state = await ledger(db_url)
    assert state["calls"] == 24 and state["reservations"] == 0
    assert state["day"][0][1] == 0 and state["day"][0][0] == state["spent"] > 0


async def test_guarded_calls_cancelled_while_they_reserve_in_memory() -> None:
    """The same on an in-memory database (SQLAlchemy's path, its reservation on a task of its own),
    as a user reads it: the budgets' windows hold nothing reserved, and what was spent is the
    recorded calls' cost."""
    async with Tracker("sqlite+aiosqlite:///:memory:", budgets=GUARD_BUDGETS) as tracker:
        _, records = await cancel_while_entering(tracker)
        status = await tracker.budget_status()
    assert len(records) == 24 and len(status) == 4  # the global window and three users'
    assert all(window.reserved == 0 for window in status)
    assert next(w.spent for w in status if w.scope_value is None) == sum(r.cost for r in records)


async def test_guarded_calls_cancelled_again_and_again_while_they_reserve_leave_nothing_reserved(
    db_url: str,
) -> None:
    """anyio's cancel scopes (Starlette's) cancel a task again on every loop turn until it ends. A
    guarded call timed out so while it reserves gives back what it was granted all the same: the
    release runs on in a task of its own, and the tracker's exit waits for it."""
    async with Tracker(db_url, budgets=GUARD_BUDGETS) as tracker:

        async def call(i: int, delay: float) -> None:
            with anyio.move_on_after(delay):
                tags = {"user_id": f"u{i % 3}"}
                async with tracker.guard(
                    provider="openai", model=MODEL, input_tokens=100, max_output_tokens=100, tags=tags
                ):
                    await asyncio.sleep(60)

        for delay in (0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005):
            await asyncio.gather(*(call(i, delay) for i in range(10)))
    state = await ledger(db_url)
    assert state["reservations"] == 0 and state["day"][0][1] == 0 and state["calls"] == 0


SHUTDOWN = """
import asyncio, sys
from llm_spend import Budget, Tracker

async def main():
    tracker = Tracker(sys.argv[1], budgets=[Budget.daily(1, mode="block")])
    await tracker.__aenter__()  # a lifespan whose shutdown never runs

    async def call():
        async with tracker.guard(provider="openai", model="gpt-4o", input_tokens=10, max_output_tokens=10):
            pass

    asyncio.create_task(call())  # main returns at once: the loop ends as the reservation starts

asyncio.run(main())
print("returned")
"""


def test_a_loop_that_ends_as_a_guarded_call_reserves_ends(db_url: str) -> None:
    """`asyncio.run` ending in the turn a guarded call starts reserving cancels the task that would
    make the reservation before its first step; the caller, waiting for an answer nothing will give,
    is let go, and `asyncio.run` returns (it hung on PostgreSQL)."""
    done = subprocess.run(
        [sys.executable, "-c", SHUTDOWN, db_url], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "returned"


async def test_error_inside_guard_releases_and_propagates(db_url: str) -> None:
    """An exception in the guarded block releases the reservation and reaches the caller unchanged."""
    async with Tracker(db_url, budgets=[Budget.daily(1, mode="block")]) as tracker:
        with pytest.raises(RuntimeError, match="provider down"):
            async with tracker.guard(provider="openai", model=MODEL, input_tokens=100, max_output_tokens=100):
                raise RuntimeError("provider down")
    state = await ledger(db_url)
    assert state["day"][0][1] == 0 and state["reservations"] == 0 and state["calls"] == 0


@pytest.mark.parametrize("max_output_tokens", [1, None], ids=["max-output-set", "no-max-output"])
async def test_unknown_model_is_refused_by_default(sqlite_url: str, max_output_tokens: int | None) -> None:
    """A model without a price under a block budget: UnknownPriceError before the call, nothing
    recorded, with or without max output tokens (without, its unknown context window was named)."""
    async with Tracker(sqlite_url, budgets=[Budget.daily(1, mode="block")]) as tracker:
        with pytest.raises(UnknownPriceError, match="no-such-model"):
            async with tracker.guard(
                provider="openai", model="no-such-model", input_tokens=1, max_output_tokens=max_output_tokens
            ):
                pytest.fail("should not be reached")
    assert (await ledger(sqlite_url))["calls"] == 0


@pytest.mark.parametrize("max_output_tokens", [1, None], ids=["max-output-set", "no-max-output"])
async def test_unknown_model_allowed_is_recorded_unpriced(
    sqlite_url: str, max_output_tokens: int | None
) -> None:
    """unknown_price='allow': the call goes out unreserved and is stored with NULL cost, flagged;
    without max output tokens too (it was refused for its unknown context window)."""
    tracker = Tracker(sqlite_url, budgets=[Budget.daily(1, mode="block")], unknown_price="allow")
    guarded = tracker.guard(
        provider="openai", model="no-such-model", input_tokens=1, max_output_tokens=max_output_tokens
    )
    async with tracker, guarded as c:
        assert c.reservation is None
        record = await c.record(Usage(input_tokens=1, output_tokens=1))
    assert record.cost is None and record.pricing_status == "unknown_model"
    state = await ledger(sqlite_url)
    assert state["calls"] == 1 and state["spent"] == 0


async def test_per_call_block_budget_refuses_a_large_estimate(sqlite_url: str) -> None:
    """A per-call block budget refuses a call whose upper-bound estimate is over the limit, without I/O."""
    async with Tracker(sqlite_url, budgets=[Budget.per_call("0.0001", mode="block")]) as tracker:
        with pytest.raises(BudgetExceeded) as refused:
            async with tracker.guard(
                provider="openai", model=MODEL, input_tokens=10, max_output_tokens=100_000
            ):
                pytest.fail("should not be reached")
    assert refused.value.period == "call" and refused.value.window_end is None


async def test_cost_above_estimate_is_recorded_in_full(sqlite_url: str) -> None:
    """When the actual cost exceeds the estimate, the call is recorded in full and the excess counted."""
    async with Tracker(sqlite_url, budgets=[Budget.daily(10, mode="block")]) as tracker:
        async with tracker.guard(
            provider="openai", model=MODEL, input_tokens=10, max_output_tokens=10
        ) as call:
            record = await call.record(Usage(input_tokens=100_000, output_tokens=10_000))
        assert tracker.budget_guard.excess_calls == 1
    state = await ledger(sqlite_url)
    assert state["spent"] == record.cost_nanousd and state["day"][0][1] == 0


async def test_a_guarded_call_of_unknown_cost_holds_its_estimate_until_its_windows_end(db_url: str) -> None:
    """A billed call whose usage never arrived (a stream cut short) has no cost to settle, but cost
    at most its estimate: every window it reserved in keeps the estimate reserved until the last of
    them ends, so cutting calls short never takes a user past a block-mode budget. Another user's
    window is their own, and once the windows end the sweep gives the money back."""
    size: dict[str, Any] = {
        "provider": "openai",
        "model": MODEL,
        "input_tokens": 1000,
        "max_output_tokens": 500,
    }
    sizing = Tracker("sqlite+aiosqlite:///:memory:", budgets=[Budget.daily(1, mode="block")])
    async with sizing, sizing.guard(**size) as call:
        estimate = call.estimate
    assert estimate is not None
    budgets = [Budget.daily(estimate * 3 / 2, per="user_id", mode="block"), Budget.monthly(1, mode="block")]
    async with Tracker(db_url, budgets=budgets) as tracker:
        async with tracker.guard(**size, tags={"user_id": "u1"}) as call:
            record = await call.record(None)
        assert (record.cost, record.pricing_status) == (None, "unknown_usage")
        with pytest.raises(BudgetExceeded) as refused:
            async with tracker.guard(**size, tags={"user_id": "u1"}):
                pytest.fail("a second call of the same size does not fit beside the held estimate")
        assert (refused.value.stage, refused.value.spent, refused.value.reserved) == (
            "preflight",
            0,
            estimate,
        )
        async with tracker.guard(**size, tags={"user_id": "u2"}) as other:
            paid = await other.record(Usage(input_tokens=800, output_tokens=300))
        now = datetime.now(UTC)
        month_end = (
            now.replace(day=1, hour=0, minute=0, second=0, microsecond=0) + timedelta(days=32)
        ).replace(day=1)
        held, windows = await held_and_windows(db_url)
        assert held == [month_end]  # the month's window outlasts the user's day
        held_nanousd = int(estimate * 10**9)
        assert windows[("day", "u1")] == (0, held_nanousd)
        assert windows[("day", "u2")] == (paid.cost_nanousd, 0)
        assert windows[("month", "")] == (paid.cost_nanousd, held_nanousd)
        assert await tracker.store.sweep(month_end + timedelta(seconds=1)) == 1
        held, windows = await held_and_windows(db_url)
        assert held == [] and windows[("month", "")] == (paid.cost_nanousd, 0)


SMALL: dict[str, Any] = {"provider": "openai", "model": MODEL, "input_tokens": 100, "max_output_tokens": 50}


async def test_a_lease_renewal_after_the_hold_leaves_the_estimate_held(db_url: str) -> None:
    """A stream's lease renewal can land after the call was recorded with no usage (a heartbeat
    not yet cancelled, a chunk arriving while another task closes the stream): the call's own
    `extend()` then does nothing, and a renewal already under way never brings the expiry in, so
    the sweep after a lease leaves the held estimate alone."""
    async with Tracker(db_url, budgets=[Budget.monthly(1, mode="block")]) as tracker:
        async with tracker.guard(**SMALL) as call:
            await call.record(None)
            await call.extend()
        assert call.reservation is not None
        lease_end = datetime.now(UTC) + timedelta(minutes=10)
        assert await tracker.store.extend(call.reservation.id, lease_end)  # found, and left as it was
        month_end = (datetime.now(UTC).replace(day=1) + timedelta(days=32)).replace(
            day=1, hour=0, minute=0, second=0, microsecond=0
        )
        held, windows = await held_and_windows(db_url)
        assert held == [month_end]
        assert await tracker.store.sweep(lease_end + timedelta(seconds=1)) == 0
        assert windows[("month", "")] == (0, call.reservation.estimate)


async def test_a_guarded_call_of_a_model_with_no_price_is_settled_not_held(db_url: str) -> None:
    """Only a call whose usage never arrived is held. A call whose answer names a model the price
    table does not know (its cost unknown, its usage known) gives its reservation back as before:
    `reprice` adds its cost once the price is known, which a held estimate would then double."""
    async with Tracker(db_url, budgets=[Budget.monthly(1, mode="block")]) as tracker:
        async with tracker.guard(**SMALL) as call:
            usage = Usage(input_tokens=80, output_tokens=20)
            record = await call.record(usage, model="gpt-4o-mini-2099-01-01")
        assert (record.cost, record.pricing_status) == (None, "unknown_model")
        held, windows = await held_and_windows(db_url)
        assert held == [] and windows[("month", "")] == (0, 0)


async def held_and_windows(url: str) -> tuple[list[datetime], dict[tuple[str, str], tuple[int, int]]]:
    """The reservations' expiries, and each rollup's (spent, reserved) by (period, scope value)."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            held = list((await conn.execute(select(reservations.c.expires_at))).scalars())
            rows = (
                await conn.execute(
                    select(
                        rollups.c.period,
                        rollups.c.scope_value,
                        rollups.c.spent_nanousd,
                        rollups.c.reserved_nanousd,
                    )
                )
            ).all()
    finally:
        await engine.dispose()
    return held, {(period, scope): (spent, reserved) for period, scope, spent, reserved in rows}


async def test_unrecorded_record_is_awaited_on_exit(sqlite_url: str) -> None:
    """`call.record(usage)` without await is completed when the block exits."""
    async with Tracker(sqlite_url, budgets=[Budget.daily(10, mode="block")]) as tracker:
        async with tracker.guard(
            provider="openai", model=MODEL, input_tokens=10, max_output_tokens=10
        ) as call:
            call.record(Usage(input_tokens=10, output_tokens=10))
        assert (await ledger(sqlite_url))["calls"] == 1


async def test_middleware_refuses_exhausted_window_without_running_endpoint(db_url: str) -> None:
    """After a window is exhausted, the middleware refuses that user's next request before the endpoint."""
    tracker = Tracker(db_url, budgets=[Budget.daily("0.0006", per="user_id", mode="block")])
    runs: list[str] = []

    async def endpoint(request: Request) -> JSONResponse:
        runs.append(request.headers["x-user"])
        async with tracker.guard(
            provider="openai", model=MODEL, input_tokens=300, max_output_tokens=300
        ) as c:
            await c.record(Usage(input_tokens=300, output_tokens=300))
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[Route("/", endpoint, methods=["POST"])],
        middleware=[
            Middleware(
                SpendMiddleware,
                tracker=tracker,
                tags=lambda r: {"user_id": r.headers["x-user"]},
                status_code=429,
            )
        ],
    )
    async with (
        tracker,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        codes = [(await client.post("/", headers={"x-user": "a"})).status_code for _ in range(3)]
        # $0.00045 of $0.0006 spent: the third call's estimate ($0.000375) did not fit, a smaller one
        # would, so the window is not known exhausted and a's requests still reach the endpoint
        assert codes == [200, 200, 429] and runs == ["a"] * 3
        with with_tags(user_id="a"), pytest.raises(BudgetExceeded):  # a call made anyway: $0.000675
            await tracker.track(provider="openai", model=MODEL, input_tokens=300, output_tokens=300)
        refused = await client.post("/", headers={"x-user": "a"})
        served = await client.post("/", headers={"x-user": "b"})
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
    assert refused.json()["stage"] == "preflight"
    assert runs == ["a", "a", "a", "b"]  # a's endpoint did not run again; b's did
    assert served.status_code == 200


async def test_a_refusal_for_the_size_of_a_call_leaves_the_window_open(db_url: str) -> None:
    """A call refused because its own estimate is larger than what is left does not mark the window
    exhausted: smaller calls still go through, and the middleware's preflight lets them in."""
    tracker = Tracker(db_url, budgets=[Budget.daily(1, per="user_id", mode="block")])
    async with tracker:
        with pytest.raises(BudgetExceeded) as refused:  # no max output: bounded by the context window
            async with tracker.guard(
                provider="openai", model="gpt-4o", input_tokens=100, tags={"user_id": "a"}
            ):
                pass
        assert refused.value.requested > 1 and refused.value.spent == 0
        assert tracker.preflight({"user_id": "a"}) is None
        async with tracker.guard(
            provider="openai", model="gpt-4o", input_tokens=100, max_output_tokens=100, tags={"user_id": "a"}
        ) as call:
            record = await call.record(Usage(input_tokens=100, output_tokens=50))
        assert record.cost == Decimal("0.00075") and tracker.preflight({"user_id": "a"}) is None


async def test_clamping_fits_the_tightest_window(db_url: str) -> None:
    """clamp_max_tokens with two windows: the first refusal comes from the looser one (day, $1); the
    output is clamped again to what the tighter one (the user's month, $0.05) can pay for."""
    tracker = Tracker(
        db_url,
        budgets=[Budget.daily("1.00", mode="block"), Budget.monthly("0.05", per="user_id", mode="block")],
        clamp_max_tokens=True,
    )
    async with (
        tracker,
        tracker.guard(
            provider="openai",
            model="gpt-4o",
            input_tokens=100,
            max_output_tokens=200_000,
            tags={"user_id": "u"},
        ) as call,
    ):
        assert call.max_output_tokens is not None and 1_000 < call.max_output_tokens < 5_000
        assert call.estimate is not None and Decimal("0.049") < call.estimate <= Decimal("0.05")
    assert (await ledger(db_url))["reservations"] == 0


async def test_a_guarded_call_within_its_estimate_never_raises_post(db_url: str) -> None:
    """A guarded call paid for by its reservation records without BudgetExceeded, although a call
    recorded after the fact took the window over meanwhile (that one raises); one that cost more than
    its estimate still raises."""
    tracker = Tracker(db_url, budgets=[Budget.daily("0.01", mode="block")])
    gpt_4o = {"provider": "openai", "model": "gpt-4o", "input_tokens": 1200, "output_tokens": 300}  # $0.006
    async with tracker:
        async with tracker.guard(
            provider="openai", model=MODEL, input_tokens=100, max_output_tokens=100
        ) as call:
            await tracker.track(**gpt_4o)
            with pytest.raises(BudgetExceeded):
                await tracker.track(**gpt_4o)  # $0.012 of $0.01
            record = await call.record(Usage(input_tokens=100, output_tokens=10))
        assert record.cost_nanousd is not None and record.cost_nanousd > 0
    state = await ledger(db_url)
    assert state["calls"] == 3 and state["day"][0][1] == 0 and state["reservations"] == 0

    over = Tracker(db_url, budgets=[Budget.daily("0.0121", mode="block")])
    async with (
        over,
        over.guard(provider="openai", model=MODEL, input_tokens=10, max_output_tokens=10) as call,
    ):
        with pytest.raises(BudgetExceeded) as raised:  # $0.0122 once recorded: more than it reserved
            await call.record(Usage(input_tokens=1_000, output_tokens=100))
    assert raised.value.stage == "post"


async def test_a_late_settlement_in_yesterdays_window_keeps_todays_exhaustion(sqlite_url: str) -> None:
    """A call reserved before midnight and settled after it counts in yesterday's window; finding that
    window over its limit must not replace what is known of today's."""
    tracker = Tracker(sqlite_url, budgets=[Budget.daily("0.01", mode="block")])
    gpt_4o = {"provider": "openai", "model": "gpt-4o", "input_tokens": 1200, "output_tokens": 300}
    async with tracker:
        await tracker.track(**gpt_4o)
        with pytest.raises(BudgetExceeded):
            await tracker.track(**gpt_4o)
        assert tracker.preflight({}) is not None
        guard, yesterday = tracker.budget_guard, datetime.now(UTC) - timedelta(days=1)
        day = guard.windows({}, yesterday)[0]
        guard.after({}, yesterday, 6_000_000, {day: 12_000_000})  # settled now, in yesterday's window
        known = tracker.preflight({})
        assert known is not None and known.window_end is not None and known.window_end > datetime.now(UTC)


async def test_preflight_normalizes_its_tags_and_answers_a_new_error_each_time(sqlite_url: str) -> None:
    """`tracker.preflight(tags)` takes tags as `with_tags` does (42 is "42"), and each refusal is a
    new BudgetExceeded whose `retry_after` counts from the moment it is asked for."""
    tracker = Tracker(sqlite_url, budgets=[Budget.daily("0.01", per="user_id", mode="block")])
    gpt_4o = {"provider": "openai", "model": "gpt-4o", "input_tokens": 1200, "output_tokens": 300}
    async with tracker:
        with with_tags(user_id=42):
            await tracker.track(**gpt_4o)
            with pytest.raises(BudgetExceeded):
                await tracker.track(**gpt_4o)
        first = tracker.preflight({"user_id": 42})
        assert first is not None and first.scope_value == "42" and first.spent == Decimal("0.012")
        await asyncio.sleep(1.1)
        second = tracker.preflight({"user_id": "42"})
        assert second is not None and second is not first
        assert first.retry_after is not None and second.retry_after is not None
        assert second.retry_after < first.retry_after
        assert tracker.preflight({"user_id": 43}) is None and tracker.preflight({"user_id": None}) is None
        with pytest.raises(ValueError, match="tag"):
            tracker.preflight({"": "x"})


async def test_a_records_cost_is_what_the_ledger_stores(sqlite_url: str) -> None:
    """`record.cost` is the stored nano-USD amount (rounded half-even), so sums of records, the ledger
    and reports agree: $0.0375 per million input tokens is 37.5 nano-USD a token, stored as 38."""
    tracker = Tracker(sqlite_url, price_overrides={"acme/tiny": {"input": "0.0375", "output": "0.15"}})
    async with tracker:
        records = [
            await tracker.track(provider="acme", model="tiny", input_tokens=1, output_tokens=0)
            for _ in range(10)
        ]
        rows = await tracker.report(start=datetime.now(UTC) - timedelta(days=1))
    assert {r.cost for r in records} == {Decimal("0.000000038")}
    assert all(r.cost == from_nanousd(r.cost_nanousd or 0) for r in records)
    assert rows[0].cost == sum(r.cost or 0 for r in records) == Decimal("0.00000038")
    assert (await ledger(sqlite_url))["spent"] == 380


async def test_unknown_context_window_needs_a_max_or_a_configured_cap(sqlite_url: str) -> None:
    """No max output tokens and no known context window: refused clearly, unless a cap is configured."""
    budgets = [Budget.daily(10, mode="block")]
    model = "gemini-2.5-pro"  # priced, but genai-prices knows no context window for it
    async with Tracker(sqlite_url, budgets=budgets) as tracker:
        assert tracker.pricer.context_window("google", model) is None
        with pytest.raises(LLMSpendError, match="default_max_output_tokens"):
            async with tracker.guard(provider="google", model=model, input_tokens=100):
                pytest.fail("should not be reached")
    capped = Tracker(sqlite_url, budgets=budgets, default_max_output_tokens=8192)
    async with capped as tracker, tracker.guard(provider="google", model=model, input_tokens=100) as call:
        expected = tracker.pricer.bound(
            "google", model, input_tokens=100, output_tokens=8192, at=call.reservation.at
        )
        assert call.reservation is not None and call.reservation.estimate == expected.nanousd


async def test_a_call_asking_for_several_answers_with_no_max_reserves_a_window_for_each(
    sqlite_url: str,
) -> None:
    """`choices=n` (OpenAI's `n`, Gemini's `candidateCount`) with no max output tokens: each answer
    may run to the context window less the input, and the bound covers all n; a max output bounds
    them together. A choices that is not a positive int is refused, naming it."""
    model = "gpt-4o-mini"
    async with Tracker(sqlite_url, budgets=[Budget.daily(1000, mode="block")]) as tracker:
        window = tracker.pricer.context_window("openai", model)
        assert window is not None
        guard = functools.partial(tracker.guard, provider="openai", model=model, input_tokens=1000)
        async with guard(choices=3) as three, guard(max_output_tokens=3 * (window - 1000)) as same:
            assert three.estimate == same.estimate
            async with guard() as one:
                assert one.estimate is not None and three.estimate is not None
                assert one.estimate < three.estimate
        async with guard(max_output_tokens=500, choices=3) as bounded, guard(max_output_tokens=500) as alone:
            assert bounded.estimate == alone.estimate
        for bad in (0, -2, 1.5, "3", True):
            with pytest.raises(ValueError, match="choices must be a positive int"):
                async with guard(choices=bad):
                    pytest.fail("should not be reached")


async def test_a_refusal_reports_the_locked_totals_and_reserves_nothing_anywhere(db_url: str) -> None:
    """Two windows, the per-user one refusing: the refusal carries that window's spent and reserved
    (another call's reservation held open), and the global window, which would have accepted, is
    left exactly as it was (all or nothing in one statement on PostgreSQL, one transaction on SQLite)."""
    budgets = [Budget.daily(100, mode="block"), Budget.daily("0.0006", per="user_id", mode="block")]
    async with (
        Tracker(db_url, budgets=budgets) as tracker,
        tracker.guard(
            provider="openai", model=MODEL, input_tokens=1000, max_output_tokens=200, tags={"user_id": "a"}
        ) as held,
    ):
        before = await ledger(db_url)
        with pytest.raises(BudgetExceeded) as refused:
            async with tracker.guard(
                provider="openai", model=MODEL, input_tokens=1000, max_output_tokens=200,
                tags={"user_id": "a"},
            ):  # fmt: skip
                pytest.fail("the second call should have been refused")
        assert await ledger(db_url) == before
        await held.record(Usage(input_tokens=1000, output_tokens=200))
    exc = refused.value
    assert exc.scope_value == "a" and exc.spent == 0
    assert exc.reserved == from_nanousd(before["day"][0][1]) > 0
    assert (await ledger(db_url))["reservations"] == 0


async def test_reserving_in_a_window_whose_row_was_deleted_recreates_it(db_url: str) -> None:
    """Window rows known to this process vanish (a database reset under it): the next reservation
    creates them again and holds, and the rollups equal the ledger written afterwards."""
    async with Tracker(db_url, budgets=[Budget.daily(1, mode="block")]) as tracker:
        async with tracker.guard(
            provider="openai", model=MODEL, input_tokens=100, max_output_tokens=100
        ) as c:
            await c.record(Usage(input_tokens=100, output_tokens=100))
        engine = create_async_engine(db_url)
        try:
            async with engine.begin() as conn:
                await conn.execute(calls.delete())
                await conn.execute(rollups.delete())
        finally:
            await engine.dispose()
        async with tracker.guard(
            provider="openai", model=MODEL, input_tokens=100, max_output_tokens=100
        ) as c:
            assert (await ledger(db_url))["day"][0][1] > 0
            record = await c.record(Usage(input_tokens=100, output_tokens=100))
    state = await ledger(db_url)
    assert state["calls"] == 1 and state["spent"] == record.cost_nanousd
    assert state["day"] == [(record.cost_nanousd, 0, 1)]


async def _hold_together(tracker: Tracker, users: list[str]) -> tuple[list[BudgetExceeded | int], Any]:
    """Guarded calls entered at once (one per user given) and held open until every one is granted
    or refused; returns each one's reserved estimate or refusal, and the ledger while they were held."""
    release = asyncio.Event()

    async def one(user: str) -> BudgetExceeded | int:
        try:
            async with tracker.guard(
                provider="openai", model=MODEL, input_tokens=1000, max_output_tokens=500,
                tags={"user_id": user},
            ) as call:  # fmt: skip
                assert call.reservation is not None
                await release.wait()
                return call.reservation.estimate
        except BudgetExceeded as exc:
            return exc

    tasks = [asyncio.ensure_future(one(user)) for user in users]
    async with asyncio.timeout(30):
        while True:
            held = await ledger(tracker.url)
            if held["reservations"] + sum(task.done() for task in tasks) == len(tasks):
                break
            await asyncio.sleep(0.02)
    held = await ledger(tracker.url)  # read again: the poll's queries may straddle the last commit
    release.set()
    return list(await asyncio.gather(*tasks)), held


def _reserved(state: dict[str, Any]) -> int:
    """Reserved in the global day windows (two of them when a test runs across midnight)."""
    return sum(row[1] for row in state["day"])


def _estimate() -> int:
    from datetime import UTC, datetime

    from llm_spend.pricing import Pricer

    bound = Pricer().bound("openai", MODEL, input_tokens=1000, output_tokens=500, at=datetime.now(UTC))
    assert bound.nanousd is not None
    return bound.nanousd


async def test_reservations_made_together_are_each_granted_or_refused_exactly(db_url: str) -> None:
    """Guarded calls reserving at once (one statement on PostgreSQL) against a limit of exactly five
    estimates: three together all fit and are granted; then, of twelve together, five are granted
    and seven refused at preflight, the window holding exactly five estimates, and nothing after."""
    estimate = _estimate()
    budgets = [Budget.daily(from_nanousd(5 * estimate), mode="block")]
    async with Tracker(db_url, budgets=budgets) as tracker:
        few, held_few = await _hold_together(tracker, ["a", "b", "c"])
        many, held_many = await _hold_together(tracker, [f"u{i}" for i in range(12)])
    assert few == [estimate] * 3 and _reserved(held_few) == 3 * estimate
    granted = [r for r in many if isinstance(r, int)]
    refused = [r for r in many if isinstance(r, BudgetExceeded)]
    assert granted == [estimate] * 5 and len(refused) == 7
    assert all(exc.stage == "preflight" and exc.requested == from_nanousd(estimate) for exc in refused)
    assert _reserved(held_many) == 5 * estimate and held_many["reservations"] == 5
    state = await ledger(db_url)
    assert _reserved(state) == 0 and state["reservations"] == 0 and state["calls"] == 0


async def test_reservations_made_together_refuse_per_window(db_url: str) -> None:
    """Calls of three users reserve at once, each user's window holding one and a half estimates:
    each user's first call is granted and their second refused by their own window, and the global
    window holds exactly the three granted estimates."""
    estimate = _estimate()
    budgets = [
        Budget.daily(100, mode="block"),
        Budget.daily(from_nanousd(estimate + estimate // 2), per="user_id", mode="block"),
    ]
    async with Tracker(db_url, budgets=budgets) as tracker:
        results, held = await _hold_together(tracker, ["a", "b", "a", "c", "b"])
    assert [isinstance(r, int) for r in results] == [True, True, False, True, False]
    assert [r.scope_value for r in results if isinstance(r, BudgetExceeded)] == ["a", "b"]
    assert _reserved(held) == 3 * estimate and held["reservations"] == 3


CALL = {"provider": "openai", "model": MODEL, "input_tokens": 100, "max_output_tokens": 10}


async def test_guarded_calls_cancelled_while_the_write_queue_is_full_are_recorded(db_url: str) -> None:
    """Backpressure and cancellation together: each call whose record was accepted is written and
    settles its reservation, though its caller stopped waiting for the queue to have room."""
    budgets = [Budget.daily(100, mode="block")]
    accepted = 0
    async with Tracker(db_url, budgets=budgets, max_queue=1, max_batch=1) as tracker:

        async def one() -> None:
            nonlocal accepted
            async with tracker.guard(**CALL) as call:  # type: ignore[arg-type]
                pending = call.record(Usage(input_tokens=100, output_tokens=10))
                accepted += 1  # the provider was paid; record() took the call
                await pending

        tasks = [asyncio.create_task(one()) for _ in range(100)]
        while tracker.backpressure_waits == 0:  # noqa: ASYNC110 - a counter, no event to wait on
            await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    state = await ledger(db_url)
    assert accepted > 1 and state["calls"] == accepted and state["day"][0][2] == accepted
    assert state["reservations"] == 0 and state["day"][0][1] == 0


async def test_a_call_spooled_twice_gives_its_reservation_back_once(db_url: str, tmp_path: Path) -> None:
    """A spool holding one guarded call twice, replayed while its reservation is held: the call is
    counted once and its reservation released once (never a negative amount reserved)."""
    budgets = [Budget.daily(1, mode="block")]
    tracker = Tracker(db_url, budgets=budgets, spool_path=tmp_path / "a.spool")
    async with tracker, tracker.guard(**CALL) as call:  # type: ignore[arg-type]
        held = call.reservation
        assert held is not None
        record = tracker._recorder.build(
            provider="openai", model=MODEL, usage=Usage(input_tokens=100, output_tokens=10),
            usage_source="manual", tags=call.tags, occurred_at=held.at,
        )  # fmt: skip
        windows = tracker.budget_guard.windows(call.tags, held.at)
        item = PendingWrite(record, windows, held.id, held.windows)
        Spool(tmp_path / "b.spool").append([item, item], await tracker.store.identity())
        async with Tracker(db_url, budgets=budgets, spool_path=tmp_path / "b.spool"):
            pass  # its start replays the spool
        call.reservation = None  # recorded by the replay: leave without releasing
    state = await ledger(db_url)
    assert state["calls"] == 1 and state["reservations"] == 0
    assert state["day"][0] == (record.cost_nanousd, 0, 1)


def terminate_all(pg_url: str) -> int:
    """End every session on the test's database but the asker's, from another thread while the
    caller's loop waits, so that the tracker's connections have not yet seen their end when its next
    statements go out (as after a server restart); how many were ended."""
    import asyncpg

    async def terminate() -> int:
        admin = await asyncpg.connect(PG_URL.replace("+asyncpg", ""))
        try:
            killed: int = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid()",
                make_url(pg_url).database,
            )
            return killed
        finally:
            await admin.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, terminate()).result()


async def test_a_release_right_after_the_server_drops_its_connections_is_made_on_a_new_one(
    pg_url: str,
) -> None:
    """A guarded call that fails gives its reservation back at once, and a long one renews its lease,
    even on a connection the server has just dropped: made again on a new one, as reservations and
    writes are. Before, the release failed and the budget stayed held until the lease ended."""
    async with Tracker(pg_url, budgets=[Budget.daily("0.001", mode="block")]) as tracker:
        for _ in range(2):
            async with tracker.guard(**CALL) as call:  # type: ignore[arg-type]  # the pool holds some
                await call.record(Usage(input_tokens=100, output_tokens=10))
        assert terminate_all(pg_url) >= 1
        with pytest.raises(RuntimeError, match="provider call failed"):
            async with tracker.guard(**CALL):  # type: ignore[arg-type]
                raise RuntimeError("provider call failed")
        assert (await ledger(pg_url))["reservations"] == 0
        async with tracker.guard(**CALL) as call:  # type: ignore[arg-type]
            assert terminate_all(pg_url) >= 1
            await call.extend()
            await call.record(Usage(input_tokens=100, output_tokens=10))
    state = await ledger(pg_url)
    assert (state["calls"], state["reservations"], state["day"][0][1]) == (3, 0, 0)


async def test_calls_right_after_the_server_drops_every_connection_are_reserved_and_written(
    pg_url: str, tmp_path: Path
) -> None:
    """PostgreSQL: a restart (here every connection to the database terminated, the pool's idle ones
    too) costs no call its reservation or its write: the first statement on a lost connection is made
    again on a new one, so with fail_closed nothing fails and nothing goes to the spool."""

    spool = tmp_path / "calls.spool"
    budgets = [Budget.daily(100, mode="block")]
    async with Tracker(pg_url, budgets=budgets, on_storage_error="fail_closed", spool_path=spool) as tracker:
        for _ in range(3):  # the lanes and the pool hold connections
            async with tracker.guard(**CALL) as call:  # type: ignore[arg-type]
                await call.record(Usage(input_tokens=100, output_tokens=10))
        await tracker.report(start=datetime.now(UTC) - timedelta(days=1))
        for _ in range(2):
            assert terminate_all(pg_url) >= 2
            outcomes = []
            for _ in range(3):
                async with tracker.guard(**CALL) as call:  # type: ignore[arg-type]
                    outcomes.append("reserved" if call.reservation is not None else "went out")
                    await call.record(Usage(input_tokens=100, output_tokens=10))
            await tracker.track(provider="openai", model=MODEL, input_tokens=10, output_tokens=1)
            assert outcomes == ["reserved"] * 3
    state = await ledger(pg_url)
    assert state["calls"] == 3 + 2 * 4 and state["reservations"] == 0
    assert state["day"][0][1] == 0  # nothing left reserved
    assert not spool.exists() or spool.stat().st_size == 0


async def test_after_the_server_drops_its_connections_an_exhausted_budget_still_refuses(pg_url: str) -> None:
    """PostgreSQL: a connection the server closed is not lent again, so with fail_open the first
    call after the drop is still checked against the budget instead of going out unreserved."""
    budgets = [Budget.daily("0.0001", mode="block")]
    async with Tracker(pg_url, budgets=budgets, on_storage_error="fail_open") as tracker:
        with pytest.raises(BudgetExceeded):  # $0.00015: the whole budget, and more
            await tracker.track(provider="openai", model=MODEL, input_tokens=1000, output_tokens=0)
        assert terminate_all(pg_url) >= 1
        await asyncio.sleep(0.3)
        outcomes = []
        for _ in range(3):
            try:
                async with tracker.guard(**CALL) as call:  # type: ignore[arg-type]
                    outcomes.append("went out" if call.reservation is None else "reserved")
                    await call.record(Usage(input_tokens=100, output_tokens=10))
            except BudgetExceeded:
                outcomes.append("refused")
    assert outcomes == ["refused"] * 3
    assert (await ledger(pg_url))["calls"] == 1
