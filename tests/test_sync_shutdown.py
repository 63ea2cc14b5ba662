"""Sync clients outliving the tracker or its event loop: a call in flight in a worker thread when the
tracker closes and its loop stops or closes returns to its caller, is never left waiting on the dead
loop, and, billed, waits in the spool to be written (its reservation settled) at the next start.

The tracker runs on an event loop of its own thread, as a server's does, or under `asyncio.run`; each
sync call runs in a thread of the test's making, as an app's worker threads do. The fake provider
holds its answer until the test has taken the tracker (and its loop) away.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from llm_spend import Budget, Tracker, current_tags, with_tags
from llm_spend.loops import run_on
from llm_spend.money import from_nanousd
from llm_spend.reports import BudgetStatus
from llm_spend.storage.schema import calls

CHAT_URL = "https://api.openai.com/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Say hello"}]
USAGE = {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}
ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini-2024-07-18"}
ANSWER |= {
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}],
    "usage": USAGE,
}
BUDGETS = [Budget.daily(1, mode="block")]
SHUTDOWN = 0.5
"""The tracker's exit waits this long for guarded calls still out: these tests keep them out past it."""
WAIT = 30  # a hang guard, not a timing assertion: each wait below ends in well under a second


class LoopThread:
    """An event loop running on a thread of its own, as a server's; `stop` stops it without closing."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(WAIT)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(WAIT)
        assert not self._thread.is_alive()


class Caller(threading.Thread):
    """A worker thread making one sync call; keeps what it returned or raised."""

    def __init__(self, call: Any) -> None:
        super().__init__(daemon=True)
        self._call = call
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with with_tags(user="u1"):
                self.result = self._call()
        except BaseException as error:
            self.error = error

    def outcome(self) -> Any:
        self.join(WAIT)
        assert not self.is_alive(), "the sync call is still waiting on a dead loop"
        if self.error is not None:
            raise self.error
        return self.result


def json_handler(held: threading.Event, answer: threading.Event, status: int = 200) -> Any:
    def handler(request: httpx2.Request) -> httpx2.Response:
        held.set()
        assert answer.wait(WAIT)
        return httpx2.Response(status, json=ANSWER if status == 200 else {"error": "busy"})

    return handler


async def next_start(url: str, spool: Path) -> tuple[list[dict[str, Any]], int, list[BudgetStatus]]:
    """Start a tracker on the same database and spool, as the next run of the app does: the ledger's
    rows, the reservations left, and the budget's status."""
    async with Tracker(url, budgets=BUDGETS, spool_path=spool, shutdown_timeout=SHUTDOWN) as tracker:
        status = await tracker.budget_status()
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = [dict(row) for row in (await conn.execute(sa.select(calls))).mappings()]
            held = await conn.scalar(sa.text("SELECT count(*) FROM llm_spend_reservations"))
    finally:
        await engine.dispose()
    return rows, held, status


def assert_written_once(rows: list[dict[str, Any]], held: int, status: list[BudgetStatus]) -> None:
    [row] = rows
    assert (row["input_tokens"], row["output_tokens"], row["pricing_status"]) == (100, 20, "priced")
    assert row["tags"] == {"user": "u1"}
    assert held == 0
    assert status[0].spent == from_nanousd(row["cost_nanousd"]) > 0 and status[0].reserved == 0


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "calls.spool"


@pytest.fixture
def server() -> Iterator[LoopThread]:
    served = LoopThread()
    yield served
    if not served.loop.is_closed():
        if served.loop.is_running():
            served.stop()
        served.loop.close()


def test_a_sync_sdk_call_outliving_asyncio_run_is_spooled_and_written_at_the_next_start(
    db_url: str, spool: Path
) -> None:
    """`asyncio.run(main())` returns, closing the tracker and then its loop, while a worker thread's
    OpenAI call waits for its answer: the call returns its answer, and the next start writes it."""
    asked, answer = threading.Event(), threading.Event()

    def handler(request: httpx.Request) -> httpx.Response:
        asked.set()
        assert answer.wait(WAIT)
        return httpx.Response(200, json=ANSWER)

    async def main() -> Caller:
        async with Tracker(db_url, budgets=BUDGETS, spool_path=spool, shutdown_timeout=SHUTDOWN) as tracker:
            http = tracker.httpx_sync_client(transport=httpx.MockTransport(handler))
            client = openai.OpenAI(api_key="sk-test", max_retries=0, http_client=http)
            caller = Caller(lambda: client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES))
            caller.start()
            assert await asyncio.to_thread(asked.wait, WAIT)  # reserved, and waiting for its answer
        return caller

    caller = asyncio.run(main())
    answer.set()
    assert caller.outcome().usage.prompt_tokens == 100
    assert spool.exists()
    assert_written_once(*asyncio.run(next_start(db_url, spool)))


def test_the_exit_waits_for_a_sync_clients_guarded_call_still_out(db_url: str, spool: Path) -> None:
    """The tracker exits while a worker thread's guarded call waits for its answer, which comes
    during the exit: the exit waits for it, as for a task's call, and it is settled in the database
    then, not spooled for the next start (by when another process's sweep may have freed its room)."""
    asked, answer = threading.Event(), threading.Event()

    async def main() -> Caller:
        tracker = Tracker(db_url, budgets=BUDGETS, spool_path=spool, shutdown_timeout=WAIT)
        async with tracker:
            http = tracker.httpx_sync_client(transport=httpx2.MockTransport(json_handler(asked, answer)))
            client = openai.OpenAI(api_key="sk-test", max_retries=0, http_client=http)
            caller = Caller(lambda: client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES))
            caller.start()
            assert await asyncio.to_thread(asked.wait, WAIT)  # reserved, and waiting for its answer
            asyncio.get_running_loop().call_later(0.2, answer.set)  # while the exit runs
        return caller

    caller = asyncio.run(main())
    assert caller.outcome().usage.prompt_tokens == 100
    assert not spool.exists()
    assert_written_once(*asyncio.run(next_start(db_url, spool)))


def test_an_answer_that_comes_while_asyncio_run_shuts_down_is_kept(db_url: str, spool: Path) -> None:
    """The answer comes after `main()` returned, while `asyncio.run` cancels what is left and waits for
    its executor (held busy until the caller has its answer): the record, made on the loop or in the
    thread, is in the spool before anything can cancel it, and the next start writes it."""
    asked, answer, returned = threading.Event(), threading.Event(), threading.Event()
    callers: list[Caller] = []

    def busy() -> None:  # an app's work still in the default executor as asyncio.run ends
        assert returned.wait(WAIT)
        answer.set()
        callers[0].join(WAIT)

    async def main() -> None:
        async with Tracker(db_url, budgets=BUDGETS, spool_path=spool, shutdown_timeout=SHUTDOWN) as tracker:
            http = tracker.httpx_sync_client(transport=httpx2.MockTransport(json_handler(asked, answer)))
            callers.append(
                Caller(lambda: http.post(CHAT_URL, json={"model": "gpt-4o-mini", "messages": MESSAGES}))
            )
            callers[0].start()
            assert await asyncio.to_thread(asked.wait, WAIT)
        asyncio.get_running_loop().run_in_executor(None, busy)
        returned.set()

    asyncio.run(main())
    assert callers[0].outcome().status_code == 200
    assert_written_once(*asyncio.run(next_start(db_url, spool)))


@pytest.mark.parametrize("tracker_closed", [True, False], ids=["tracker closed", "tracker left open"])
def test_a_sync_call_whose_loop_stopped_returns_and_is_spooled(
    db_url: str, spool: Path, server: LoopThread, tracker_closed: bool
) -> None:
    """The tracker's loop stops (without closing) while a sync call waits for its answer, with the
    tracker closed first or left open: the call does not wait for the loop to run again, and its
    record goes to the spool. The loop, run again to close the tracker, records nothing twice."""
    asked, answer = threading.Event(), threading.Event()
    tracker = Tracker(db_url, budgets=BUDGETS, spool_path=spool, shutdown_timeout=SHUTDOWN)
    server.run(tracker.__aenter__())
    http = tracker.httpx_sync_client(transport=httpx2.MockTransport(json_handler(asked, answer)))
    caller = Caller(lambda: http.post(CHAT_URL, json={"model": "gpt-4o-mini", "messages": MESSAGES}))
    caller.start()
    assert asked.wait(WAIT)
    if tracker_closed:
        server.run(tracker.__aexit__(None, None, None))
    server.stop()
    answer.set()
    assert json.loads(caller.outcome().content)["usage"] == USAGE
    assert spool.exists()
    if not tracker_closed:  # the app runs its loop again, and closes the tracker
        server.loop.run_until_complete(tracker.__aexit__(None, None, None))
    server.loop.close()
    assert_written_once(*asyncio.run(next_start(db_url, spool)))


class HeldStream(httpx2.SyncByteStream):
    """An SSE answer whose first chunk comes at once and the rest, with the usage, once `answer` is set."""

    def __init__(self, answer: threading.Event) -> None:
        self._answer = answer

    def __iter__(self) -> Iterator[bytes]:
        chunk = {"id": "c", "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": "Hi"}}]}
        yield f"data: {json.dumps(chunk)}\n\n".encode()
        assert self._answer.wait(WAIT)
        last = {"id": "c", "model": "gpt-4o-mini", "choices": [], "usage": USAGE}
        yield f"data: {json.dumps(last)}\n\n".encode()
        yield b"data: [DONE]\n\n"


def test_a_sync_stream_read_after_its_loop_closed_is_spooled_with_its_usage(
    db_url: str, spool: Path, server: LoopThread
) -> None:
    """A sync stream half read when the tracker closes and its loop closes: the caller reads the rest,
    and the call, with the usage its last event carried, is written at the next start."""
    first, answer = threading.Event(), threading.Event()
    tracker = Tracker(db_url, budgets=BUDGETS, spool_path=spool, shutdown_timeout=SHUTDOWN)
    server.run(tracker.__aenter__())
    http = tracker.httpx_sync_client(
        transport=httpx2.MockTransport(
            lambda request: httpx2.Response(
                200, stream=HeldStream(answer), headers={"content-type": "text/event-stream"}
            )
        )
    )

    def read() -> list[bytes]:
        body = {"model": "gpt-4o-mini", "stream": True, "messages": MESSAGES}
        with http.stream("POST", CHAT_URL, json=body) as response:
            chunks = response.iter_raw()
            got = [next(chunks)]
            first.set()
            return got + list(chunks)

    caller = Caller(read)
    caller.start()
    assert first.wait(WAIT)
    server.run(tracker.__aexit__(None, None, None))
    server.stop()
    server.loop.close()
    answer.set()
    assert b"[DONE]" in b"".join(caller.outcome())
    rows, held, status = asyncio.run(next_start(db_url, spool))
    assert [row["stream"] for row in rows] == [True]
    assert_written_once(rows, held, status)


def test_a_sync_stream_dropped_unread_after_its_loop_closed_is_spooled(
    db_url: str, spool: Path, server: LoopThread
) -> None:
    """A sync stream opened, then let go without being read or closed once the tracker and its loop
    closed: collected, it is recorded (with unknown usage, as nothing of it was read) by a thread of
    its own, and the next start writes it and holds its reservation until the window ends (its
    cost is unknown, at most the estimate: never $0)."""
    tracker = Tracker(db_url, budgets=BUDGETS, spool_path=spool, shutdown_timeout=SHUTDOWN)
    server.run(tracker.__aenter__())
    http = tracker.httpx_sync_client(
        transport=httpx2.MockTransport(
            lambda request: httpx2.Response(
                200, stream=HeldStream(threading.Event()), headers={"content-type": "text/event-stream"}
            )
        )
    )
    body = {"model": "gpt-4o-mini", "stream": True, "messages": MESSAGES}
    with with_tags(user="u1"):
        response = http.send(http.build_request("POST", CHAT_URL, json=body), stream=True)
    server.run(tracker.__aexit__(None, None, None))
    server.stop()
    server.loop.close()
    del response
    gc.collect()
    for thread in threading.enumerate():
        if thread.name == "llm-spend-late-stream":
            thread.join(WAIT)
    rows, held, status = asyncio.run(next_start(db_url, spool))
    [row] = rows
    assert (row["stream"], row["usage_source"], row["pricing_status"], row["cost_nanousd"]) == (
        True, "unknown", "unknown_usage", None,
    )  # fmt: skip
    assert row["tags"] == {"user": "u1"}
    assert held == 1 and status[0].spent == 0 and status[0].reserved > 0


def test_a_failed_sync_call_after_the_tracker_closed_leaves_its_reservation_to_the_sweep(
    sqlite_url: str, spool: Path, server: LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    """A sync call answered 503 after the tracker and its loop closed: the caller gets the 503, nothing
    is recorded, and its reservation, which no database can release now, waits for its lease to end."""
    asked, answer = threading.Event(), threading.Event()
    tracker = Tracker(sqlite_url, budgets=BUDGETS, spool_path=spool, shutdown_timeout=SHUTDOWN)
    server.run(tracker.__aenter__())
    http = tracker.httpx_sync_client(transport=httpx2.MockTransport(json_handler(asked, answer, 503)))
    caller = Caller(lambda: http.post(CHAT_URL, json={"model": "gpt-4o-mini", "messages": MESSAGES}))
    caller.start()
    assert asked.wait(WAIT)
    server.run(tracker.__aexit__(None, None, None))
    server.stop()
    server.loop.close()
    with caplog.at_level(logging.WARNING, logger="llm_spend"):
        answer.set()
        assert caller.outcome().status_code == 503
    assert "released once its lease ends" in caplog.text
    rows, held, status = asyncio.run(next_start(sqlite_url, spool))
    assert rows == [] and held == 1 and status[0].spent == 0 and status[0].reserved > 0


def test_run_on_runs_on_the_loop_while_it_runs(server: LoopThread) -> None:
    """From another thread, the coroutine runs on the loop's thread, in the calling thread's context."""

    async def where() -> tuple[int, dict[str, str]]:
        return threading.get_ident(), dict(current_tags())

    with with_tags(user="u1"):
        ident, tags = run_on(server.loop, where())
    assert ident == server._thread.ident and tags == {"user": "u1"}


def test_run_on_a_closed_loop_runs_here_or_refuses(server: LoopThread) -> None:
    """On a closed loop a coroutine runs in the calling thread on a loop of its own, or, not `here`, is
    refused with a RuntimeError and closed (never left un-awaited)."""
    server.stop()
    server.loop.close()

    async def where() -> int:
        return threading.get_ident()

    assert run_on(server.loop, where()) == threading.get_ident()
    refused = where()
    with pytest.raises(RuntimeError, match="event loop is gone"):
        run_on(server.loop, refused, here=False)
    assert refused.cr_frame is None  # closed


def test_run_on_gives_up_when_the_loop_closes_under_its_coroutine(server: LoopThread) -> None:
    """A coroutine the loop started, then stopped and closed under: the caller gets a RuntimeError
    instead of waiting forever, and nothing runs it twice."""
    started, runs = threading.Event(), []

    async def slow() -> None:
        runs.append(1)
        started.set()
        await asyncio.sleep(WAIT)

    caller = Caller(lambda: run_on(server.loop, slow()))
    caller.start()
    assert started.wait(WAIT)
    server.stop()
    server.loop.close()
    with pytest.raises(RuntimeError, match="in the middle of a call's work"):
        caller.outcome()
    assert runs == [1]
