"""Calls made on another running event loop than the tracker's: a thread's ``asyncio.run``, as a sync
FastAPI endpoint (run in Starlette's thread pool) may do with an async client.

What such a call needs of the database runs on the tracker's loop (`loops.hop`): it is in the
ledger and the budgets at once, its reservation is made and released there, and the tracker's own
PostgreSQL connections stay its loop's. Each test's tracker runs on the test's loop; the calls run
under `asyncio.run` in a worker thread, as an app's would.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import warnings
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from llm_spend import Budget, BudgetExceeded, CallRecord, Tracker, Usage, current_tags, with_tags
from llm_spend.loops import hop
from llm_spend.testing import FakeProviderTransport

WAIT = 30  # a hang guard, not a timing assertion
MODEL = "gpt-4o-mini"
USAGE = Usage(input_tokens=1000, output_tokens=500)  # $0.00045 on gpt-4o-mini
START = datetime(2020, 1, 1, tzinfo=UTC)


async def elsewhere(work: Callable[[], Awaitable[Any]], **tags: str) -> Any:
    """Run `work()` under `asyncio.run` in a worker thread, with these tags, and return its result."""

    async def main() -> Any:
        with with_tags(**tags):
            return await work()

    return await asyncio.to_thread(asyncio.run, main())


async def scalar(url: str, sql: str) -> Any:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.scalar(sa.text(sql))
    finally:
        await engine.dispose()


async def held(url: str) -> int:
    return int(await scalar(url, "SELECT count(*) FROM llm_spend_reservations"))


def calls_after_next_start(url: str, spool: Path) -> int:
    """Start a tracker on the same database and spool, as the app's next run does (it writes what
    was spooled), and count the ledger's calls."""

    async def start() -> int:
        async with Tracker(url, spool_path=spool):
            pass
        return int(await scalar(url, "SELECT count(*) FROM llm_calls"))

    return asyncio.run(start())


async def test_a_call_tracked_on_another_loop_is_in_the_ledger_at_once(
    db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`track()` on another loop: the row, its rollup and its tags are written before it returns,
    subscribers get it on the tracker's loop, and a raise-mode budget it crosses raises there."""
    seen: list[tuple[int, str]] = []
    tracker = Tracker(db_url, spool_path=tmp_path / "spool", budgets=[Budget.daily("0.001", mode="raise")])
    async with tracker:
        tracker.subscribe(lambda record: seen.append((threading.get_ident(), record.tags["user"])))
        with caplog.at_level(logging.WARNING, logger="llm_spend"):
            record = await elsewhere(lambda: tracker.track(provider="openai", model=MODEL, input_tokens=1000,
                                                           output_tokens=500), user="b")  # fmt: skip
            assert isinstance(record, CallRecord) and record.cost == Decimal("0.00045")
            assert await scalar(db_url, "SELECT count(*) FROM llm_calls") == 1
            [row] = await tracker.report(start=START, group_by=["user"])
            assert (row.group, row.calls, row.cost) == ({"user": "b"}, 1, Decimal("0.00045"))
            await elsewhere(lambda: tracker.track(provider="openai", model=MODEL, input_tokens=1000,
                                                  output_tokens=500), user="b")  # fmt: skip
            with pytest.raises(BudgetExceeded) as raised:  # 0.0009 + 0.00045 > 0.001
                await elsewhere(lambda: tracker.track(provider="openai", model=MODEL, input_tokens=1000,
                                                      output_tokens=500), user="c")  # fmt: skip
        assert raised.value.stage == "post" and raised.value.spent == Decimal("0.00135")
        assert "spooled" not in caplog.text and "off the tracker's event loop" not in caplog.text
        [status] = await tracker.budget_status()
        assert status.spent == Decimal("0.00135")
    assert seen == [(threading.get_ident(), "b"), (threading.get_ident(), "b"), (threading.get_ident(), "c")]


async def test_a_guarded_call_on_another_loop_reserves_settles_and_releases_on_the_trackers(
    db_url: str, tmp_path: Path
) -> None:
    """`guard()` on another loop: its reservation is held while the call runs, settled by its record,
    released at once when it leaves without one (not left to the sweep), and refused over the limit;
    the tracker's own loop goes on using its database afterwards, with no warning."""
    tracker = Tracker(
        db_url, spool_path=tmp_path / "spool", budgets=[Budget.daily("0.01", per="user", mode="block")]
    )
    async with tracker:

        async def recorded() -> tuple[Decimal | None, int, CallRecord]:
            async with tracker.guard(
                provider="openai", model=MODEL, input_tokens=1000, max_output_tokens=500
            ) as call:
                during = await held(db_url)
                record = await call.record(USAGE)
            return call.estimate, during, record

        async def released() -> int:
            async with tracker.guard(
                provider="openai", model=MODEL, input_tokens=1000, max_output_tokens=500
            ):
                return await held(db_url)

        async def too_big() -> None:
            async with tracker.guard(
                provider="openai", model=MODEL, input_tokens=100_000, max_output_tokens=1
            ):
                raise AssertionError("a refused call runs no body")

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            estimate, during, record = await elsewhere(recorded, user="u1")
            assert estimate == Decimal("0.00075")  # the bound: priority-tier prices
            assert during == 1 and record.cost == Decimal("0.00045")
            assert await held(db_url) == 0
            assert await elsewhere(released, user="u1") == 1
            assert await held(db_url) == 0
            with pytest.raises(BudgetExceeded) as refused:
                await elsewhere(too_big, user="u1")
            assert refused.value.stage == "preflight" and refused.value.spent == Decimal("0.00045")
            async with tracker.guard(provider="openai", model=MODEL, input_tokens=1000, max_output_tokens=500,
                                     tags={"user": "u1"}) as call:  # fmt: skip
                await call.record(USAGE)
            statuses = {status.scope_value: status for status in await tracker.budget_status()}
        assert (statuses["u1"].spent, statuses["u1"].reserved) == (Decimal("0.0009"), 0)
    assert await scalar(db_url, "SELECT count(*) FROM llm_calls") == 2


async def test_a_budget_holds_exactly_for_calls_from_three_loops_at_once(db_url: str, tmp_path: Path) -> None:
    """Guarded calls of one user from the tracker's loop and from two other loops at once, each
    reserving what it then costs: exactly as many go out as the daily limit pays for, and the
    ledger's sum is the limit, never above."""
    limit = Decimal("0.00075") * 7  # seven calls, and no eighth
    tracker = Tracker(
        db_url, spool_path=tmp_path / "spool", budgets=[Budget.daily(limit, per="user", mode="block")]
    )

    async def calls(n: int) -> int:
        made = 0

        async def one() -> None:
            nonlocal made
            try:
                async with tracker.guard(
                    provider="openai", model=MODEL, input_tokens=1000, max_output_tokens=500
                ) as call:
                    await asyncio.sleep(0.01)  # the provider's time, while others reserve
                    await call.record(USAGE, service_tier="priority")  # costs its bound, 0.00075
                    made += 1
            except BudgetExceeded as refused:
                assert refused.stage == "preflight"

        await asyncio.gather(*(one() for _ in range(n)))
        return made

    async with tracker:
        with with_tags(user="u1"):
            made = await asyncio.gather(calls(6), elsewhere(lambda: calls(6)), elsewhere(lambda: calls(6)))
        assert sum(made) == 7
        [status] = await tracker.budget_status()
        assert (status.spent, status.reserved) == (limit, 0)
    assert await scalar(db_url, "SELECT sum(cost_nanousd) FROM llm_calls") == 7 * 750_000
    assert await held(db_url) == 0


async def test_an_async_sdk_client_on_another_loop_is_captured_on_the_trackers(
    db_url: str, tmp_path: Path
) -> None:
    """An AsyncOpenAI client made and used under a worker thread's `asyncio.run` (a sync endpoint's
    way), its http client from the tracker: the answer comes back, and the call is in the ledger with
    the endpoint's tags and its reservation settled, before the endpoint returns."""
    fake = FakeProviderTransport(usage=USAGE, model="gpt-4o-mini-2024-07-18")
    tracker = Tracker(
        db_url, spool_path=tmp_path / "spool", budgets=[Budget.daily(1, per="user", mode="block")]
    )
    async with tracker:

        async def endpoint() -> tuple[str, int, Any]:
            client = openai.AsyncOpenAI(
                api_key="sk-test", max_retries=0, http_client=tracker.httpx_client(transport=fake)
            )
            async with client:
                answer = await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=500
                )
                streamed = await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=500, stream=True
                )
                async for _ in streamed:
                    pass
            return (
                answer.model,
                answer.usage.prompt_tokens,
                await tracker.report(start=START, group_by=["user"]),
            )

        model, prompt_tokens, rows = await elsewhere(endpoint, user="u7")
        assert (model, prompt_tokens) == ("gpt-4o-mini-2024-07-18", 1000)
        [row] = rows
        assert (row.group, row.calls, row.cost) == ({"user": "u7"}, 2, Decimal("0.0009"))
        [status] = await tracker.budget_status()
        assert (status.scope_value, status.spent, status.reserved) == ("u7", Decimal("0.0009"), 0)
    assert await held(db_url) == 0


def test_a_call_on_another_loop_once_the_trackers_stopped_is_spooled_for_the_next_start(
    db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The tracker's loop is stopped (not closed, the tracker left open) when another loop records a
    call: nothing waits for it, the call is spooled with a warning, and the next start writes it. A
    guarded call there cannot reserve: it raises, and nothing is held in the database."""
    spool = tmp_path / "spool"
    loop = asyncio.new_event_loop()
    tracker = Tracker(db_url, spool_path=spool, budgets=[Budget.daily(1, per="user", mode="block")])
    loop.run_until_complete(tracker.__aenter__())  # then the loop stops, the tracker open

    async def track() -> CallRecord:
        return await tracker.track(provider="openai", model=MODEL, input_tokens=1000, output_tokens=500)

    async def guarded() -> None:
        with with_tags(user="u1"):
            async with tracker.guard(provider="openai", model=MODEL, input_tokens=10, max_output_tokens=10):
                raise AssertionError("no call goes out unreserved")

    try:
        with caplog.at_level(logging.WARNING, logger="llm_spend"):
            record = asyncio.run(track())
        assert record.cost == Decimal("0.00045") and "spooled to" in caplog.text
        with pytest.raises(RuntimeError, match="cannot reserve on this event loop"):
            asyncio.run(guarded())
        assert asyncio.run(held(db_url)) == 0
    finally:
        loop.run_until_complete(tracker.__aexit__(None, None, None))
        loop.close()
    assert asyncio.run(scalar(db_url, "SELECT count(*) FROM llm_calls")) == 0

    assert calls_after_next_start(db_url, spool) == 1


# -- hop itself: a loop running in a thread of its own, as a server's ---------------------------------


@pytest.fixture
def home() -> Any:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop, thread
    if loop.is_running():
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT)
    loop.close()


def test_hop_runs_on_the_home_loop_in_the_callers_context(home: Any) -> None:
    loop, thread = home

    async def where() -> tuple[int, dict[str, str]]:
        return threading.get_ident(), dict(current_tags())

    async def main() -> Any:
        with with_tags(user="u1"):
            return await hop(loop, where())

    assert asyncio.run(main()) == (thread.ident, {"user": "u1"})


def test_hop_to_a_stopped_loop_runs_here_or_refuses(home: Any) -> None:
    """A home loop stopped before it took the work: the waiter runs it on its own loop, or, not
    `here`, refuses it with a RuntimeError and closes it (never left un-awaited)."""
    loop, thread = home
    loop.call_soon_threadsafe(loop.stop)
    thread.join(WAIT)

    async def where() -> int:
        return threading.get_ident()

    refused = where()

    async def main() -> int:
        with pytest.raises(RuntimeError, match="event loop is gone"):
            await hop(loop, refused, here=False)
        return await hop(loop, where())

    assert asyncio.run(main()) == threading.get_ident()
    assert refused.cr_frame is None


def test_hop_to_a_loop_that_never_takes_the_work_gives_it_up(
    home: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A home loop that runs but never takes the work (blocked waiting for the very thread that
    hops): after `_PATIENCE` the waiter runs it here, with an error logged, instead of hanging."""
    import llm_spend.loops

    monkeypatch.setattr(llm_spend.loops, "_PATIENCE", 0.5)
    loop, _ = home
    release = threading.Event()
    loop.call_soon_threadsafe(release.wait, WAIT)  # the loop's thread blocks until the test says

    async def where() -> int:
        return threading.get_ident()

    try:
        with caplog.at_level(logging.ERROR, logger="llm_spend"):
            assert asyncio.run(hop(loop, where())) == threading.get_ident()
        assert "did not take a call's work" in caplog.text
    finally:
        release.set()


def test_a_hop_cancelled_while_its_work_runs_cancels_it_or_undoes_what_it_made(home: Any) -> None:
    """The waiter is cancelled while the home loop runs the work: with `undo`, the work is cancelled,
    and a result it made before the cancellation reached it is handed to `undo`, on the home loop."""
    loop, thread = home
    started, finish = threading.Event(), threading.Event()
    undone: list[tuple[str, int]] = []

    async def reserve(shielded: bool) -> str:
        started.set()
        try:
            await asyncio.sleep(WAIT)
        except asyncio.CancelledError:
            if not shielded:
                raise
            await asyncio.to_thread(finish.wait, WAIT)  # ends with its result all the same, as a
        return "reservation"  # reservation whose statement was under way does

    async def undo(made: str) -> None:
        undone.append((made, threading.get_ident()))

    async def main(shielded: bool) -> None:
        task = asyncio.ensure_future(hop(loop, reserve(shielded), undo=undo))
        assert await asyncio.to_thread(started.wait, WAIT)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    started.clear()
    asyncio.run(main(shielded=False))
    assert asyncio.run_coroutine_threadsafe(asyncio.sleep(0.05), loop).result(WAIT) is None and undone == []
    started.clear()
    asyncio.run(main(shielded=True))
    finish.set()
    for _ in range(WAIT * 20):  # until the undo ran on the home loop
        if undone:
            break
        threading.Event().wait(0.05)
    assert undone == [("reservation", thread.ident)]


def test_a_call_on_another_loop_while_the_trackers_is_blocked_is_spooled_once(
    db_url: str, tmp_path: Path, home: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The tracker's loop runs but is blocked (on the very thread that calls, say): `track()` on
    another loop gives up waiting once, spools the call, and hands nothing on again; a read there
    raises rather than using the tracker's connections from the wrong loop. Once the loop runs again
    it writes nothing twice: the next start writes the call, once."""
    import llm_spend.loops

    monkeypatch.setattr(llm_spend.loops, "_PATIENCE", 0.5)
    loop, _ = home
    spool = tmp_path / "spool"
    tracker = Tracker(db_url, spool_path=spool)
    asyncio.run_coroutine_threadsafe(tracker.__aenter__(), loop).result(WAIT)
    release = threading.Event()
    loop.call_soon_threadsafe(release.wait, WAIT)

    async def track() -> CallRecord:
        return await tracker.track(provider="openai", model=MODEL, input_tokens=1000, output_tokens=500)

    try:
        with caplog.at_level(logging.WARNING, logger="llm_spend"):
            assert asyncio.run(track()).cost == Decimal("0.00045")
            with pytest.raises(RuntimeError, match="did not take the call's work"):
                asyncio.run(tracker.report(start=START))
        assert caplog.text.count("did not take a call's work") == 2  # once each, never twice over
        assert caplog.text.count("spooled to") == 1
    finally:
        release.set()
        asyncio.run_coroutine_threadsafe(tracker.__aexit__(None, None, None), loop).result(WAIT)
    assert asyncio.run(scalar(db_url, "SELECT count(*) FROM llm_calls")) == 0

    assert calls_after_next_start(db_url, spool) == 1


@pytest.mark.parametrize("then", ["runs again", "stops"])
def test_a_record_whose_caller_and_loop_end_before_the_tracker_takes_it_is_kept(
    sqlite_url: str, tmp_path: Path, home: Any, then: str
) -> None:
    """A call recorded on another loop whose caller is cancelled, and whose loop then ends (its
    `asyncio.run` returns), while the tracker's loop is busy and has not taken the record yet: the
    tracker's loop writes it once it runs again; if it stops instead, the record is spooled as the
    other loop ends, not left to a loop that may never take it."""
    loop, thread = home
    spool = tmp_path / "spool"
    tracker = Tracker(sqlite_url, spool_path=spool)
    asyncio.run_coroutine_threadsafe(tracker.__aenter__(), loop).result(WAIT)
    release = threading.Event()

    def busy() -> None:  # takes nothing until the test says; then runs on, or stops
        assert release.wait(WAIT)
        if then == "stops":
            loop.stop()

    loop.call_soon_threadsafe(busy)

    async def endpoint() -> None:
        task = asyncio.ensure_future(
            tracker.track(provider="openai", model=MODEL, input_tokens=1000, output_tokens=500)
        )
        await asyncio.sleep(0.05)  # handed over, waiting
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        if then == "stops":
            release.set()
            await asyncio.to_thread(thread.join, WAIT)

    asyncio.run(endpoint())
    release.set()
    if then == "stops":  # run it again, to close the tracker
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
    else:
        for _ in range(WAIT * 10):  # until the tracker's loop has written it
            if asyncio.run(scalar(sqlite_url, "SELECT count(*) FROM llm_calls")):
                break
            threading.Event().wait(0.1)
    asyncio.run_coroutine_threadsafe(tracker.__aexit__(None, None, None), loop).result(WAIT)
    written = asyncio.run(scalar(sqlite_url, "SELECT count(*) FROM llm_calls"))
    assert written == (1 if then == "runs again" else 0)

    assert calls_after_next_start(sqlite_url, spool) == 1
    loop.call_soon_threadsafe(loop.stop)
    thread.join(WAIT)


async def test_guarded_calls_on_another_loop_cancelled_anywhere_leave_nothing_reserved(
    db_url: str, tmp_path: Path
) -> None:
    """Guarded calls on another loop, each cancelled at a random moment (before, during or after its
    reservation is made at home, or inside the block): once all have ended, no reservation is held
    and the budget's window holds nothing reserved; none was released twice (reserved never < 0)."""
    rng = random.Random(8)
    tracker = Tracker(db_url, spool_path=tmp_path / "spool", budgets=[Budget.daily(1000, mode="block")])

    async def burst() -> int:
        async def one() -> None:
            async with tracker.guard(provider="openai", model=MODEL, input_tokens=100, max_output_tokens=100):
                await asyncio.sleep(0.001)

        running = asyncio.get_running_loop()
        tasks = [asyncio.ensure_future(one()) for _ in range(200)]
        for task in tasks:
            running.call_later(rng.random() * 0.3, task.cancel)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(result is None or isinstance(result, asyncio.CancelledError) for result in results)
        return sum(isinstance(result, asyncio.CancelledError) for result in results)

    async with tracker:
        for _ in range(4):  # each burst its own `asyncio.run`, as a sync endpoint's calls are
            assert await elsewhere(burst) > 0
        for _ in range(WAIT * 10):  # undos still under way at home end within moments
            if await held(db_url) == 0:
                break
            await asyncio.sleep(0.1)
        assert await held(db_url) == 0
        [status] = await tracker.budget_status()
        assert status.reserved == 0 and status.spent == 0


@pytest.mark.parametrize("recorded", [False, True], ids=["released", "recorded"])
async def test_a_guard_cancelled_as_its_loop_ends_is_still_settled_on_the_trackers(
    db_url: str, tmp_path: Path, recorded: bool
) -> None:
    """A guarded call on another loop, inside its block when its request is cancelled and its
    `asyncio.run` ends at once (cancelling what has not started, the guard's exit among it): the
    release, or the record made (not awaited, as the capture transport leaves it to the exit), was
    handed to the tracker's loop already, so nothing stays reserved and the call is in the ledger."""
    tracker = Tracker(db_url, spool_path=tmp_path / "spool", budgets=[Budget.daily(1, mode="block")])

    async def guarded(entered: asyncio.Event) -> None:
        async with tracker.guard(
            provider="openai", model=MODEL, input_tokens=1000, max_output_tokens=500
        ) as call:
            if recorded:
                call.record(USAGE)  # awaited by leaving the block
            entered.set()
            await asyncio.sleep(WAIT)

    async def endpoint() -> None:
        entered = asyncio.Event()
        task = asyncio.ensure_future(guarded(entered))
        await entered.wait()
        task.cancel()  # and return at once: `asyncio.run` cancels what is left

    async with tracker:
        await elsewhere(endpoint)
        for _ in range(WAIT * 10):  # until the tracker's loop has done what it was handed
            if await held(db_url) == 0:
                break
            await asyncio.sleep(0.1)
        assert await held(db_url) == 0
        [status] = await tracker.budget_status()
        assert status.reserved == 0
        assert status.spent == (Decimal("0.00045") if recorded else 0)
    assert await scalar(db_url, "SELECT count(*) FROM llm_calls") == (1 if recorded else 0)


async def test_a_guarded_call_on_another_loop_paid_for_raises_in_no_block_window(
    db_url: str, tmp_path: Path
) -> None:
    """A guarded call on another loop is judged on the tracker's with what it reserved: calls
    recorded after the fact took the window over its limit meanwhile, but this one cost less than it
    had reserved, so it raises nothing (its reservation paid for it); a call tracked after it raises."""
    tracker = Tracker(db_url, spool_path=tmp_path / "spool", budgets=[Budget.daily("0.001", mode="block")])

    async def guarded() -> CallRecord:
        async with tracker.guard(
            provider="openai", model=MODEL, input_tokens=1000, max_output_tokens=500
        ) as call:
            # reserved 0.00075; meanwhile a call made without a guard spends 0.0009 of the 0.001
            await tracker.track(provider="openai", model=MODEL, input_tokens=2000, output_tokens=1000)
            return await call.record(USAGE)

    async with tracker:
        record = await elsewhere(guarded)
        assert record.cost == Decimal("0.00045")
        [status] = await tracker.budget_status()
        assert (status.spent, status.reserved) == (Decimal("0.00135"), 0)


def test_reads_on_another_loop_while_the_trackers_is_stopped_are_refused(db_url: str, tmp_path: Path) -> None:
    """The tracker open, its loop stopped: a read on another loop raises RuntimeError rather than use
    the tracker's connections there (on PostgreSQL, they belong to the stopped loop), and the
    tracker's own reads work when its loop runs again."""
    loop = asyncio.new_event_loop()
    tracker = Tracker(db_url, spool_path=tmp_path / "spool")
    loop.run_until_complete(tracker.__aenter__())
    try:
        loop.run_until_complete(
            tracker.track(provider="openai", model=MODEL, input_tokens=1000, output_tokens=500)
        )
        for read in (tracker.report(start=START), tracker.budget_status(), tracker.health()):
            with pytest.raises(RuntimeError, match="cannot be read on this event loop"):
                asyncio.run(read)
        [row] = loop.run_until_complete(tracker.report(start=START))
        assert row.calls == 1
    finally:
        loop.run_until_complete(tracker.__aexit__(None, None, None))
        loop.close()


def test_what_a_callback_cut_off_from_the_tracker_spawns_is_not_cut_off(
    sqlite_url: str, tmp_path: Path, home: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record a waiter spools itself (the tracker's loop did not take it) runs its subscribers cut
    off; a task such a subscriber spawns is not: once the tracker's loop runs again, a call it
    tracks is written there, not spooled."""
    import llm_spend.loops

    monkeypatch.setattr(llm_spend.loops, "_PATIENCE", 0.3)
    loop, _ = home
    tracker = Tracker(sqlite_url, spool_path=tmp_path / "spool")
    asyncio.run_coroutine_threadsafe(tracker.__aenter__(), loop).result(WAIT)
    release = threading.Event()
    loop.call_soon_threadsafe(release.wait, WAIT)
    spawned: list[asyncio.Task[CallRecord]] = []

    async def later() -> CallRecord:
        await asyncio.to_thread(release.wait, WAIT)  # the tracker's loop runs again
        return await tracker.track(provider="openai", model=MODEL, input_tokens=10, output_tokens=10)

    def subscriber(record: CallRecord) -> None:
        if record.usage.input_tokens == 1000:
            spawned.append(asyncio.ensure_future(later()))

    async def endpoint() -> None:
        await tracker.track(provider="openai", model=MODEL, input_tokens=1000, output_tokens=500)
        release.set()
        await spawned[0]

    unsubscribe = tracker.subscribe(subscriber)
    try:
        asyncio.run(endpoint())
        assert asyncio.run(scalar(sqlite_url, "SELECT count(*) FROM llm_calls")) == 1  # the later one
    finally:
        unsubscribe()
        release.set()
        asyncio.run_coroutine_threadsafe(tracker.__aexit__(None, None, None), loop).result(WAIT)
