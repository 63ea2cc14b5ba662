"""The capturing transport's behaviour: pass-through, budgets, retries, early ends, disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import gc
import gzip
import json
import pickle
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from google import genai
from google.genai import types as genai_types
from sqlalchemy.ext.asyncio import create_async_engine

from conftest import served
from llm_spend import Budget, BudgetExceeded, Tracker, Usage, with_tags
from llm_spend.capture import (
    CaptureOptions,
    async_budget_middleware,
    async_client,
    async_transport,
    spend_error,
    sync_client,
    sync_transport,
)
from llm_spend.capture.clients import bind
from llm_spend.capture.handback import identity_response
from llm_spend.money import from_nanousd
from llm_spend.storage.schema import calls, reservations, rollups
from llm_spend.testing import FakeProviderTransport, openai_chat_usage

MESSAGES = [{"role": "user", "content": "Say hello"}]
USAGE = Usage(input_tokens=100, output_tokens=20)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture
async def tracker(url: str) -> AsyncIterator[Tracker]:
    async with Tracker(url) as running:
        yield running


async def table(tracker: Tracker, which: sa.Table = calls) -> list[dict[str, Any]]:
    engine = create_async_engine(tracker.url)
    try:
        async with engine.connect() as connection:
            return [dict(row) for row in (await connection.execute(sa.select(which))).mappings()]
    finally:
        await engine.dispose()


async def assert_held_until_the_day_ends(tracker: Tracker) -> None:
    """A billed call of unknown cost keeps its reservation, and the daily window the estimate,
    until the window ends (UTC midnight): it never counts $0 against the budget. (Not before its
    lease ends either: a call made minutes before midnight is held until that lease's end.)"""
    [held] = await table(tracker, reservations)
    day = held["created_at"].astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    assert held["expires_at"] >= day + timedelta(days=1) and held["amount_nanousd"] > 0
    if held["created_at"] < day + timedelta(hours=23):  # its lease ends before midnight
        assert held["expires_at"] == day + timedelta(days=1)
    [status] = await tracker.budget_status()
    assert (status.spent, status.reserved) == (0, from_nanousd(held["amount_nanousd"]))


async def recorded(tracker: Tracker, count: int = 1) -> list[dict[str, Any]]:
    """The ledger rows once `count` calls are recorded: dropped streams record when collected."""
    for _ in range(50):
        rows = await table(tracker)
        if len(rows) >= count:
            await asyncio.sleep(0.05)  # a second, wrong record would show up by now
            return await table(tracker)
        gc.collect()
        await asyncio.sleep(0.01)
    return await table(tracker)


def openai_client(tracker: Tracker, fake: Any, **options: Any) -> openai.AsyncOpenAI:
    capture = CaptureOptions(**options) if options else None
    http = async_client(tracker, transport=fake, options=capture)
    return openai.AsyncOpenAI(api_key="test", http_client=http, max_retries=2)


def assert_unknown_usage(row: dict[str, Any]) -> None:
    assert (row["usage_source"], row["pricing_status"], row["cost_nanousd"]) == (
        "unknown",
        "unknown_usage",
        None,
    )
    assert row["stream"] is True


async def test_other_hosts_pass_through_untouched(tracker: Tracker) -> None:
    """A request to a host no route knows is not parsed, changed or recorded."""
    seen: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(200, json={"usage": {"prompt_tokens": 1, "completion_tokens": 1}})

    async with async_client(tracker, transport=httpx2.MockTransport(handler)) as http:
        body = b'{"model":"m","stream":true}'
        await http.post(
            "https://example.com/v1/chat/completions", content=body, headers={"Accept-Encoding": "gzip"}
        )
    assert seen[0].content == body and seen[0].headers["accept-encoding"] == "gzip"
    assert await table(tracker) == []


async def test_a_url_spelled_another_way_takes_the_same_route(tracker: Tracker) -> None:
    """Routes are remembered by the URL as written (an upper-case host, the default port, an escaped
    path) and found from it decoded: each spelling of a billed endpoint is recorded, once, and a
    path that only looks like one when undecoded is not."""
    fake = FakeProviderTransport(usage=USAGE)
    body = {"model": "gpt-4o-mini", "messages": MESSAGES}
    async with async_client(tracker, transport=fake) as http:
        for url in (
            "https://api.openai.com/v1/chat/completions",
            "https://API.OpenAI.com:443/v1/chat%2Fcompletions",
            "https://api.openai.com/v1/chat/completions",
            "https://api.openai.com/v1/chat/completions%3F",
        ):
            await http.post(url, json=body)
    rows = await table(tracker)
    assert [(row["provider"], row["model"]) for row in rows] == [("openai", "gpt-4o-mini")] * 3
    assert fake.calls == 4


async def test_provider_requests_ask_for_identity_encoding_and_compressed_bodies_still_parse(
    tracker: Tracker,
) -> None:
    """Accept-Encoding: identity goes to provider hosts; a gzip answer anyway is still read (its
    headers in any case, as httpx reads them)."""
    seen: list[str] = []
    payload = {"id": "c", "model": "gpt-4o-mini", "usage": openai_chat_usage(USAGE)}

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request.headers["accept-encoding"])
        if b'"stream":true' in request.content:
            events = f"data: {json.dumps({**payload, 'choices': []})}\n\ndata: [DONE]\n\n".encode()
            headers = {"Content-Encoding": "GZIP", "Content-Type": "text/event-stream; charset=utf-8"}
            return httpx2.Response(200, content=gzip.compress(events), headers=headers)
        headers = {"content-encoding": "gzip", "content-type": "application/json"}
        return httpx2.Response(200, content=gzip.compress(json.dumps(payload).encode()), headers=headers)

    client = openai_client(tracker, httpx2.MockTransport(handler))
    reply = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert reply.usage is not None and reply.usage.prompt_tokens == 100
    assert [chunk async for chunk in await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True)]  # type: ignore[arg-type]  # fmt: skip
    assert seen == ["identity", "identity"]
    assert [(row["input_tokens"], row["stream"]) for row in await table(tracker)] == [
        (100, False),
        (100, True),
    ]


@pytest.mark.parametrize(
    "content_type",
    ["TEXT/EVENT-STREAM; Charset=UTF-8", "text/plain", None],
    ids=["upper-case", "text-plain", "none"],
)
async def test_a_stream_asked_for_is_read_whatever_its_content_type_says(
    tracker: Tracker, content_type: str | None
) -> None:
    """A host (a proxy, an OpenAI-compatible server) may send a stream with the media type in upper
    case, with another, or with none; the SDKs read it all the same, and so does capture: its usage
    is recorded, not unknown."""
    chat = {"id": "c", "model": "gpt-4o-mini", "choices": [], "usage": openai_chat_usage(USAGE)}
    claude = [
        {"type": "message_start", "message": {"id": "m", "model": "claude-sonnet-4-5",
                                              "usage": {"input_tokens": 100, "output_tokens": 1}}},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 20}},
        {"type": "message_stop"},
    ]  # fmt: skip

    def handler(request: httpx2.Request) -> httpx2.Response:
        if request.url.host == "api.openai.com":
            events = f"data: {json.dumps(chat)}\n\ndata: [DONE]\n\n"
        else:
            events = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in claude)
        headers = {} if content_type is None else {"content-type": content_type}
        return httpx2.Response(200, content=events.encode(), headers=headers)

    fake = httpx2.MockTransport(handler)
    stream = await openai_client(tracker, fake).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True
    )  # type: ignore[arg-type]
    usages = [chunk.usage async for chunk in stream]
    assert usages and usages[-1] is not None
    claude_client = anthropic.AsyncAnthropic(
        api_key="test", http_client=async_client(tracker, transport=fake)
    )
    async with claude_client.messages.stream(
        model="claude-sonnet-4-5", max_tokens=50, messages=MESSAGES
    ) as s:  # type: ignore[arg-type]
        assert (await s.get_final_message()).usage.output_tokens == 20
    rows = await table(tracker)
    assert [(r["provider"], r["input_tokens"], r["usage_source"], r["stream"]) for r in rows] == [
        ("openai", USAGE.input_tokens, "stream", True),
        ("anthropic", 100, "stream", True),
    ]
    assert all(r["cost_nanousd"] for r in rows)


@pytest.fixture
def provider_server() -> Iterator[tuple[str, dict[str, bool]]]:
    """The fake provider behind a real HTTP server (uvicorn on 127.0.0.1), so that the capture reads
    bodies from a socket, as in production: a network transport hands back unread streams, where a
    mock transport hands back bodies read in full. settings["gzip"] compresses what it sends."""
    fake = FakeProviderTransport(usage=USAGE)
    settings = {"gzip": False}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        request = httpx2.Request(scope["method"], f"https://relay{scope['path']}", content=body)
        response = await fake.handle_async_request(request)
        headers = [
            (key.lower(), value) for key, value in response.headers.raw if key.lower() != b"content-length"
        ]
        chunks = [response.content] if response.is_closed else [chunk async for chunk in response.aiter_raw()]
        if settings["gzip"]:
            chunks, headers = [gzip.compress(b"".join(chunks))], [*headers, (b"content-encoding", b"gzip")]
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    with served(app, lifespan="off") as port:
        yield f"127.0.0.1:{port}", settings


@pytest.mark.parametrize("compressed", [False, True])
async def test_calls_over_a_socket_are_read_from_the_stream_and_recorded(
    tracker: Tracker, provider_server: tuple[str, dict[str, bool]], compressed: bool
) -> None:
    """Through httpx2's own network transport: the SDK gets the whole answer, the ledger its usage,
    for a JSON answer and a stream, plain or gzip-compressed."""
    host, settings = provider_server
    settings["gzip"] = compressed
    http = async_client(tracker, options=CaptureOptions(providers={host: "openai"}))
    client = openai.AsyncOpenAI(api_key="test", base_url=f"http://{host}/v1", http_client=http)
    reply = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert reply.choices[0].message.content and reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (100, 20)
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    assert text == "Hello from the fake provider."
    await http.aclose()
    rows = await recorded(tracker, 2)
    assert [
        (
            row["provider"],
            row["model"],
            row["input_tokens"],
            row["output_tokens"],
            row["usage_source"],
            row["stream"],
        )
        for row in rows
    ] == [
        ("openai", "gpt-4o-mini", 100, 20, "response", False),
        ("openai", "gpt-4o-mini", 100, 20, "stream", True),
    ]
    assert all(row["pricing_status"] == "priced" and row["cost_nanousd"] > 0 for row in rows)


@pytest.mark.parametrize("compressed", [False, True])
async def test_sync_calls_over_a_socket_are_read_from_the_stream_and_recorded(
    tracker: Tracker, provider_server: tuple[str, dict[str, bool]], compressed: bool
) -> None:
    """The same through the sync client (on a thread, recording on the tracker's loop)."""
    host, settings = provider_server
    settings["gzip"] = compressed
    loop = asyncio.get_running_loop()

    def work() -> tuple[Any, str]:
        with sync_client(
            tracker, loop=lambda: loop, options=CaptureOptions(providers={host: "openai"})
        ) as http:
            client = openai.OpenAI(api_key="test", base_url=f"http://{host}/v1", http_client=http)
            reply = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
            stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
            return reply, "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    reply, text = await asyncio.to_thread(work)
    assert reply.usage is not None and (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (100, 20)
    assert text == "Hello from the fake provider."
    rows = await recorded(tracker, 2)
    assert [
        (row["input_tokens"], row["output_tokens"], row["usage_source"], row["stream"]) for row in rows
    ] == [
        (100, 20, "response", False),
        (100, 20, "stream", True),
    ]
    assert all(row["pricing_status"] == "priced" and row["cost_nanousd"] > 0 for row in rows)


@pytest.mark.parametrize(
    "answer",
    [b"<html><body>Bad gateway</body></html>", b"[" * 100_000 + b"]" * 100_000, b'{"usage": NaN'],
    ids=["html", "nested past any parser", "cut short"],
)
async def test_a_2xx_answer_that_cannot_be_read_is_returned_and_recorded_with_unknown_usage(
    url: str, answer: bytes
) -> None:
    """A billed call whose body is no JSON capture can read still reaches the caller as it came, is
    recorded once (usage unknown, never $0), and its reservation is held until the window ends."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=answer, headers={"content-type": "application/json"})

    async with Tracker(url, budgets=[Budget.daily(5, mode="block")]) as tracker:
        async with async_client(tracker, transport=httpx2.MockTransport(handler)) as http:
            body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 10}
            response = await http.post("https://api.openai.com/v1/chat/completions", json=body)
        assert (response.status_code, response.content) == (200, answer)
        rows = await table(tracker)
        assert [(row["usage_source"], row["pricing_status"], row["cost_nanousd"]) for row in rows] == [
            ("unknown", "unknown_usage", None)
        ]
        await assert_held_until_the_day_ends(tracker)


class _ExitFails:
    """A real tracker's guard whose exit then fails, as a bug in recording would."""

    def __init__(self, tracker: Tracker) -> None:
        self._tracker = tracker

    def guard(self, **fields: Any) -> Any:
        inner = self._tracker.guard(**fields)

        class Failing:
            async def __aenter__(self) -> Any:
                return await inner.__aenter__()

            async def __aexit__(self, *exc: object) -> None:
                await inner.__aexit__(*exc)
                raise RuntimeError("recording broke")

        return Failing()


class _Watching:
    """A real tracker, with the `input_tokens` each guard was given written down."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker, self.bounds = tracker, []
        self.reserves = tracker.reserves

    def guard(self, **fields: Any) -> Any:
        self.bounds.append(fields["input_tokens"])
        return self.tracker.guard(**fields)


@pytest.mark.parametrize("mode", ["raise", "block"])
async def test_the_input_bound_is_worked_out_only_for_a_tracker_that_reserves(url: str, mode: str) -> None:
    """Without a block-mode budget nothing reads the input bound, so capture skips it (0); with one,
    the guard gets the request body's bytes and the template allowance, and reserves that."""
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 50}
    async with Tracker(url, budgets=[Budget.daily(10, mode=mode)]) as tracker:  # type: ignore[arg-type]
        watching = _Watching(tracker)
        http = async_client(watching, transport=FakeProviderTransport(usage=USAGE))  # type: ignore[arg-type]
        reply = await http.post("https://api.openai.com/v1/chat/completions", json=body)
        assert reply.status_code == 200
        sent = len(reply.request.content)
    assert tracker.reserves is (mode == "block")
    assert watching.bounds == ([sent + 16] if mode == "block" else [0])
    [row] = await table(tracker)
    assert (row["input_tokens"], row["output_tokens"], row["pricing_status"]) == (100, 20, "priced")


class _OlderGuard:
    """A tracker whose `guard` has the signature before `choices` (a TrackerLike written then)."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker, self.reserves = tracker, tracker.reserves

    def guard(
        self, *, provider: str, model: str, input_tokens: int, max_output_tokens: int | None = None
    ) -> Any:
        return self.tracker.guard(
            provider=provider, model=model, input_tokens=input_tokens, max_output_tokens=max_output_tokens
        )


async def test_a_guard_without_choices_serves_requests_for_one_answer(url: str) -> None:
    """Capture names `choices` to the guard only for a request of several answers: a guard of the
    older signature still records the others (bench/capture.py's stub is one)."""
    async with Tracker(url, budgets=[Budget.daily(10, mode="block")]) as tracker:
        http = async_client(_OlderGuard(tracker), transport=FakeProviderTransport(usage=USAGE))  # type: ignore[arg-type]
        body = {"model": "gpt-4o-mini", "messages": MESSAGES, "n": 1}
        assert (await http.post(CHAT_URL, json=body)).status_code == 200
        with pytest.raises(TypeError, match="choices"):
            await http.post(CHAT_URL, json={**body, "n": 3})
    assert [row["input_tokens"] for row in await table(tracker)] == [USAGE.input_tokens]


@pytest.mark.parametrize("mode", ["raise", "block"])
@pytest.mark.parametrize(
    "answer",
    [b'{"id":"r1","usage":{"prompt_tokens":10,"completion_tokens":2}}', b'{"id":"r1","usage":'],
    ids=["names no model", "cut short"],
)
@pytest.mark.parametrize("length", [1, 200], ids=["short request", "long request"])
async def test_a_call_whose_answer_names_no_model_is_recorded_under_the_requests(
    url: str, mode: str, answer: bytes, length: int
) -> None:
    """Without a block-mode budget capture reads no short request body before sending it (a long
    one it parses, to see whether it asks for a stream); the model the request names is read when
    the answer names none (a host that leaves it out, a body cut short)."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=answer, headers={"content-type": "application/json"})

    async with Tracker(url, budgets=[Budget.daily(10, mode=mode)]) as tracker:  # type: ignore[arg-type]
        async with async_client(tracker, transport=httpx2.MockTransport(handler)) as http:
            body = {"model": "gpt-4o-mini", "messages": MESSAGES * length, "max_tokens": 10}
            response = await http.post(CHAT_URL, json=body)
        assert (response.status_code, response.content) == (200, answer)
    [row] = await table(tracker)
    assert (row["model"], row["provider_response_id"]) == (
        "gpt-4o-mini",
        "r1" if answer.endswith(b"}") else None,
    )
    assert row["pricing_status"] == ("priced" if answer.endswith(b"}") else "unknown_usage")


@pytest.mark.parametrize("spelled", ['"stream":true', '"\\u0073tream":true', '"str\\u0065am" : true'])
async def test_a_stream_request_is_read_and_asks_for_usage_however_its_key_is_spelled(
    tracker: Tracker, spelled: str
) -> None:
    """A request body that asks for a stream is read before it is sent, with or without a block-mode
    budget, so that a chat stream is asked to report its usage: with the key spelled with escapes
    too, which a search of the raw bytes for the key would miss."""
    fake = FakeProviderTransport(usage=USAGE)
    content = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hi"}],' + spelled + "}"
    async with (
        async_client(tracker, transport=fake) as http,
        http.stream("POST", CHAT_URL, content=content.encode()) as response,
    ):
        await response.aread()
    assert fake.requests[-1].json["stream_options"] == {"include_usage": True}
    [row] = await recorded(tracker)
    assert (row["model"], row["input_tokens"], row["output_tokens"], row["stream"]) == (
        "gpt-4o-mini",
        100,
        20,
        True,
    )


async def test_a_failure_to_record_does_not_fail_the_callers_call(
    tracker: Tracker, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever goes wrong in recording (here the guard's exit raising after the record is written),
    the SDK gets its answer; the failure is logged."""
    http = async_client(_ExitFails(tracker), transport=FakeProviderTransport(usage=USAGE))  # type: ignore[arg-type]
    client = openai.AsyncOpenAI(api_key="test", http_client=http, max_retries=0)
    reply = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert reply.usage is not None and reply.usage.prompt_tokens == 100
    assert "recording a captured call failed" in caplog.text and "recording broke" in caplog.text
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    assert "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    failures = [r for r in caplog.records if r.getMessage() == "llm-spend: recording a captured call failed"]
    assert [str(record.exc_info[1]) for record in failures if record.exc_info] == ["recording broke"] * 2
    assert [(row["input_tokens"], row["stream"]) for row in await recorded(tracker, 2)] == [
        (100, False),
        (100, True),
    ]


async def test_non_2xx_is_not_recorded_and_releases_the_reservation(url: str) -> None:
    """A 400 is not billed: no row, and the block-mode reservation is released, not kept."""
    async with Tracker(url, budgets=[Budget.daily(10)], mode="block") as tracker:
        fake = FakeProviderTransport(statuses=[400])
        with pytest.raises(openai.BadRequestError):
            await openai_client(tracker, fake).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
        assert fake.calls == 1
        assert await table(tracker) == []
        assert await table(tracker, reservations) == []
        assert all(row["reserved_nanousd"] == 0 for row in await table(tracker, rollups))


async def test_each_sdk_retry_passes_once_and_the_billed_attempt_is_recorded(url: str) -> None:
    """429 then 500 then 200: three attempts reach the provider, one (the 2xx) is recorded."""
    async with Tracker(url, budgets=[Budget.daily(10)], mode="block") as tracker:
        fake = FakeProviderTransport(usage=USAGE, statuses=[429, 500])
        await openai_client(tracker, fake).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
        assert fake.calls == 3
        [row] = await table(tracker)
        assert row["input_tokens"] == 100 and row["pricing_status"] == "priced"
        assert await table(tracker, reservations) == []


async def test_stream_broken_off_after_the_first_chunk_is_recorded_once_as_unknown(tracker: Tracker) -> None:
    """A stream that ends before its usage chunk: one row, unknown usage, NULL cost (never $0)."""
    fake = FakeProviderTransport(usage=USAGE, truncate_after=1)
    client = openai_client(tracker, fake)
    chunks = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    assert len([chunk async for chunk in chunks]) == 1
    await chunks.close()
    [row] = await recorded(tracker)
    assert_unknown_usage(row)
    assert row["model"] == "gpt-4o-mini"


@pytest.mark.parametrize("close", [True, False], ids=["aclose", "dropped"])
async def test_caller_breaking_out_early_records_once(tracker: Tracker, close: bool) -> None:
    """Breaking out after the first chunk records on close, or when the dropped stream is collected."""
    fake = FakeProviderTransport(usage=USAGE, text="one two three four five")
    client = anthropic.AsyncAnthropic(api_key="test", http_client=async_client(tracker, transport=fake))
    events = await client.messages.create(
        model="claude-sonnet-4-6", max_tokens=50, messages=MESSAGES, stream=True
    )  # type: ignore[arg-type]
    async for _ in events:
        break
    if close:
        await events.close()
    del events
    [row] = await recorded(tracker)
    assert_unknown_usage(row)
    assert row["provider_response_id"] == "msg_fake1"  # from message_start


async def test_cancellation_mid_stream_is_recorded_once(tracker: Tracker) -> None:
    """Cancelling the task that reads a slow stream records the call (shielded), exactly once."""
    fake = FakeProviderTransport(usage=USAGE, delay=0.5, text="a b c d e f")
    client = openai_client(tracker, fake)
    first = asyncio.Event()

    async def consume() -> None:
        chunks = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        async for _ in chunks:
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [row] = await recorded(tracker)
    assert_unknown_usage(row)


def relay_app(client: openai.AsyncOpenAI, **create: Any) -> FastAPI:
    """A FastAPI app whose `GET /chat` relays an OpenAI chat stream's text in a StreamingResponse."""
    app = FastAPI()

    @app.get("/chat")
    async def chat() -> StreamingResponse:
        chunks = await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, **create
        )  # type: ignore[call-overload]

        async def body() -> AsyncIterator[str]:
            async for chunk in chunks:
                yield chunk.choices[0].delta.content or "" if chunk.choices else ""

        return StreamingResponse(body(), media_type="text/plain")

    return app


async def leave_after_the_first_words(app: FastAPI, spec_version: str = "2.0") -> None:
    """`GET /chat` from a client that leaves once the first part of the body arrived: its receive
    reports the disconnect, and on ASGI 2.4 a send after it raises, as such servers report it."""
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
        "method": "GET", "scheme": "http", "path": "/chat", "raw_path": b"/chat", "query_string": b"",
        "headers": [], "server": ("test", 80), "client": ("test", 1234), "root_path": "",
    }  # fmt: skip
    requested, first_body = False, asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await first_body.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            if first_body.is_set() and spec_version == "2.4":
                raise OSError("client went away")
            first_body.set()

    await app(scope, receive, send)


@pytest.mark.parametrize("spec_version", ["2.0", "2.4"])
async def test_client_disconnect_in_a_streaming_response_is_recorded(
    tracker: Tracker, spec_version: str
) -> None:
    """A FastAPI StreamingResponse proxying an LLM stream: the client leaves mid-stream; it is recorded."""
    fake = FakeProviderTransport(usage=USAGE, delay=0.2, text="a b c d e f g h")
    app = relay_app(openai_client(tracker, fake))
    with contextlib.suppress(Exception):  # Starlette's ClientDisconnect, on 2.4
        await leave_after_the_first_words(app, spec_version)
    [row] = await recorded(tracker)
    assert_unknown_usage(row)
    assert fake.calls == 1


async def test_a_user_who_drops_every_stream_before_its_usage_is_still_held_to_the_budget(
    db_url: str,
) -> None:
    """An app relays the real OpenAI SDK's stream in a StreamingResponse; one user leaves every
    response after its first words, before the usage chunk. Each such call is billed at a cost
    nobody knows, so each keeps its estimate reserved in the user's window: after a few, the
    user's next call is refused before it reaches the provider, not let through for ever at $0."""
    limit = Decimal("0.0002")  # a few calls' estimates (max_tokens=100)
    async with Tracker(db_url, budgets=[Budget.daily(limit, per="user", mode="block")]) as tracker:
        fake = FakeProviderTransport(usage=USAGE, delay=0.05, text="a b c d e f g h")
        app = relay_app(openai_client(tracker, fake), max_tokens=100)
        refused = None
        for _ in range(20):
            try:
                with with_tags(user="mallory"):
                    await leave_after_the_first_words(app)
            except BudgetExceeded as exc:
                refused = exc
                break
            await recorded(tracker, fake.calls)
        assert refused is not None and refused.stage == "preflight" and refused.scope_value == "mallory"
        rows = await table(tracker)
        assert 1 <= fake.calls == len(rows) <= 3
        assert all(row["pricing_status"] == "unknown_usage" for row in rows)
        held = await table(tracker, reservations)
        assert len(held) == len(rows)
        assert (
            sum(from_nanousd(r["amount_nanousd"]) for r in held)
            <= limit
            < refused.requested + sum(from_nanousd(r["amount_nanousd"]) for r in held)
        )


async def test_block_budget_refuses_before_the_provider_is_reached(url: str) -> None:
    """A block-mode refusal raises BudgetExceeded from each SDK, and no byte reaches the provider."""
    async with Tracker(url, budgets=[Budget.per_call(0.0001)], mode="block") as tracker:
        fake = FakeProviderTransport()
        with pytest.raises(BudgetExceeded) as refused:
            await openai_client(tracker, fake).chat.completions.create(
                model="gpt-4o", messages=MESSAGES, max_tokens=4000
            )  # type: ignore[arg-type]
        assert refused.value.stage == "preflight"

        claude = anthropic.AsyncAnthropic(
            api_key="test",
            http_client=async_client(tracker, transport=fake),
            middleware=[async_budget_middleware],
        )
        with pytest.raises(BudgetExceeded):
            await claude.messages.create(model="claude-opus-4-6", max_tokens=4000, messages=MESSAGES)  # type: ignore[arg-type]

        gemini = genai.Client(
            api_key="test",
            http_options=genai_types.HttpOptions(httpx_async_client=async_client(tracker, transport=fake)),
        )
        with pytest.raises(BudgetExceeded):
            await gemini.aio.models.generate_content(
                model="gemini-2.5-pro",
                contents="hi",
                config=genai_types.GenerateContentConfig(max_output_tokens=4000),
            )
        assert fake.calls == 0
        assert await table(tracker) == [] and await table(tracker, reservations) == []


async def test_a_request_for_several_answers_and_no_max_is_bounded_for_all_of_them(url: str) -> None:
    """OpenAI's `n` with no max tokens: each answer may fill the context window, and the provider
    bills them all, so the bound reserved (the refusal's `requested`) is n times one answer's
    output; nothing is sent."""
    async with Tracker(url, budgets=[Budget.per_call("0.000001")], mode="block") as tracker:
        fake = FakeProviderTransport()
        client = openai_client(tracker, fake)
        requested = []
        for n in (1, 4):
            with pytest.raises(BudgetExceeded) as refused:
                await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, n=n)  # type: ignore[arg-type]
            requested.append(refused.value.requested)
        one, four = requested
        assert Decimal("3.99") * one < four < 4 * one  # the input, a few bytes, is counted once
        assert fake.calls == 0


async def test_anthropic_without_the_middleware_wraps_and_retries_the_refusal(url: str) -> None:
    """anthropic wraps a transport error in APIConnectionError and retries it: every attempt is refused.

    The BudgetExceeded is the error's __cause__ (`spend_error(error)` finds it); the provider is not reached.
    """
    async with Tracker(url, budgets=[Budget.per_call(0.0001)], mode="block") as tracker:
        fake = FakeProviderTransport()
        http = async_client(tracker, transport=fake)
        claude = anthropic.AsyncAnthropic(api_key="test", http_client=http, max_retries=1)
        with pytest.raises(anthropic.APIConnectionError) as wrapped:
            await claude.messages.create(model="claude-opus-4-6", max_tokens=4000, messages=MESSAGES)  # type: ignore[arg-type]
        assert isinstance(wrapped.value.__cause__, BudgetExceeded)
        assert isinstance(spend_error(wrapped.value), BudgetExceeded)
        assert fake.calls == 0


async def test_raise_mode_budget_raises_after_recording_a_json_call(url: str) -> None:
    """raise mode: the call that crosses is recorded, then BudgetExceeded(stage="post") reaches the caller."""
    async with Tracker(url, budgets=[Budget.daily(0.00001)], mode="raise") as tracker:
        fake = FakeProviderTransport(usage=USAGE)
        with pytest.raises(BudgetExceeded) as crossed:
            await openai_client(tracker, fake).chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
        assert crossed.value.stage == "post" and fake.calls == 1
        assert len(await table(tracker)) == 1


@pytest.mark.parametrize(
    "sdk",
    [
        "anthropic",
        "anthropic, body to read",
        "anthropic stream",
        "anthropic sync",
        "anthropic sync, body to read",
    ],
)
async def test_an_sdk_retry_of_a_call_that_crossed_a_raise_budget_is_not_sent(url: str, sdk: str) -> None:
    """anthropic wraps the BudgetExceeded(stage="post") of a billed answer in APIConnectionError and
    retries: the retries are not sent (the provider would bill each), they raise the same error; the
    one billed call is in the ledger once. A call the app makes again itself is sent as usual."""
    async with Tracker(url, budgets=[Budget.daily(0.00001)], mode="raise") as tracker:
        # With a delay the fake answers as a network transport does, with a body still to read.
        fake = FakeProviderTransport(usage=USAGE, delay=0.001 if "body to read" in sdk else 0.0)
        request = {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": MESSAGES}
        transport: Any = fake
        if sdk == "anthropic stream":  # a stream read in full by the transport: recorded on arrival

            async def read_in_full(sent: httpx2.Request) -> httpx2.Response:
                answer = await fake.handle_async_request(sent)
                return httpx2.Response(200, headers=answer.headers, content=await answer.aread())

            request["stream"] = True
            transport = httpx2.MockTransport(read_in_full)
        if not sdk.startswith("anthropic sync"):
            claude = anthropic.AsyncAnthropic(
                api_key="test", http_client=async_client(tracker, transport=transport), max_retries=2
            )
            with pytest.raises(anthropic.APIConnectionError) as wrapped:
                await claude.messages.create(**request)  # type: ignore[arg-type]
        else:
            sync_claude = anthropic.Anthropic(
                api_key="test", http_client=tracker.httpx_sync_client(transport=fake), max_retries=2
            )
            with pytest.raises(anthropic.APIConnectionError) as wrapped:
                await asyncio.to_thread(sync_claude.messages.create, **request)  # type: ignore[arg-type]
        crossed = spend_error(wrapped.value)
        assert crossed is not None and crossed.stage == "post"
        assert fake.calls == 1 and len(await table(tracker)) == 1
        again = anthropic.AsyncAnthropic(
            api_key="test", http_client=async_client(tracker, transport=transport), max_retries=0
        )
        with pytest.raises(anthropic.APIConnectionError):
            await again.messages.create(**request)  # type: ignore[arg-type]
        assert fake.calls == 2 and len(await table(tracker)) == 2


async def test_a_retry_is_refused_only_for_the_call_that_crossed(url: str) -> None:
    """Another user's call with the same body, even marked as a retry, is its own call: sent, and
    judged by its own budget window."""
    async with Tracker(url, budgets=[Budget.daily(0.00001, per="user_id")], mode="raise") as tracker:
        fake = FakeProviderTransport(usage=USAGE)
        http = async_client(tracker, transport=fake)
        body = {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": MESSAGES}
        retry = {"x-stainless-retry-count": "1"}
        with with_tags(user_id="a"):
            with pytest.raises(BudgetExceeded):
                await http.post("https://api.anthropic.com/v1/messages", json=body)
            with pytest.raises(BudgetExceeded) as refused:
                await http.post("https://api.anthropic.com/v1/messages", json=body, headers=retry)
        assert fake.calls == 1 and refused.value.scope_value == "a"
        with with_tags(user_id="b"), pytest.raises(BudgetExceeded) as crossed:
            await http.post("https://api.anthropic.com/v1/messages", json=body, headers=retry)
        assert fake.calls == 2 and crossed.value.scope_value == "b"
        assert [row["tags"]["user_id"] for row in await table(tracker)] == ["a", "b"]


async def test_long_streams_renew_their_reservation_lease(url: str) -> None:
    """A stream that outlives the lease renewal period extends its reservation while it streams."""
    async with Tracker(url, budgets=[Budget.daily(10)], mode="block", reservation_ttl=600) as tracker:
        fake = FakeProviderTransport(usage=USAGE, delay=0.05, text="a b c d e")
        client = openai_client(tracker, fake, lease_renewal=0.01)
        chunks = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        renewed = False
        async for _ in chunks:
            for held in await table(tracker, reservations):
                renewed |= held["expires_at"] > held["created_at"] + timedelta(seconds=600)
        assert renewed
        [row] = await table(tracker)
        assert row["pricing_status"] == "priced" and await table(tracker, reservations) == []


async def test_include_stream_usage_can_be_turned_off(tracker: Tracker) -> None:
    """include_stream_usage=False sends the body as is; the stream then has no usage to record."""
    fake = FakeProviderTransport(usage=USAGE)
    client = openai_client(tracker, fake, include_stream_usage=False)
    assert [
        c
        async for c in await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        )
    ]  # type: ignore[arg-type]
    assert "stream_options" not in fake.requests[0].json
    [row] = await table(tracker)
    assert_unknown_usage(row)


async def test_openai_compatible_hosts_by_configuration(tracker: Tracker) -> None:
    """providers={...}: OpenRouter priced as "openrouter", an Azure deployment path names the model."""
    fake = FakeProviderTransport(usage=USAGE)
    options = CaptureOptions(
        providers={"openrouter.ai": "openai-compatible", "*.openai.azure.com": "openai-compatible"}
    )
    http = async_client(tracker, transport=fake, options=options)
    router = openai.AsyncOpenAI(api_key="test", base_url="https://openrouter.ai/api/v1", http_client=http)
    await router.chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    azure = openai.AsyncAzureOpenAI(
        api_key="test", azure_endpoint="https://acme.openai.azure.com", api_version="2024-10-21",
        azure_deployment="prod-4o", http_client=http,
    )  # fmt: skip
    await azure.chat.completions.create(model="prod-4o", messages=MESSAGES)  # type: ignore[arg-type]
    first, second = await table(tracker)
    assert (first["provider"], first["model"], first["pricing_status"]) == (
        "openrouter",
        "openai/gpt-4o-mini",
        "priced",
    )
    assert (second["provider"], second["model"]) == ("azure", "prod-4o")


_NO_LOOP = lambda: None  # noqa: E731 - the sync functions' loop getter
_SYNC, _ASYNC = httpx2.HTTPTransport, httpx2.AsyncHTTPTransport
BAD_CLIENT_ARGUMENTS: dict[str, tuple[str, Any]] = {
    # id: (the argument the error must name, building a client or transport with it from a tracker)
    "sync transport, async client": ("transport", lambda t: t.httpx_client(transport=_SYNC())),
    "httpx sync transport, async client": (
        "transport", lambda t: t.httpx_client(transport=httpx.HTTPTransport()),
    ),
    "async transport, sync client": ("transport", lambda t: t.httpx_sync_client(transport=_ASYNC())),
    "no transport at all": ("transport", lambda t: t.httpx_client(transport="https://x")),
    "sync inner, async transport": ("inner", lambda t: t.httpx_transport(_SYNC())),
    "async inner, sync transport": ("inner", lambda t: t.httpx_sync_transport(_ASYNC())),
    "mounts a list": ("mounts", lambda t: t.httpx_client(mounts=[("https://", _ASYNC())])),
    "mounts a list, sync": ("mounts", lambda t: t.httpx_sync_client(mounts=[("https://", _SYNC())])),
    "mounts an empty list": ("mounts", lambda t: t.httpx_client(mounts=[])),
    "mounts key not a string": ("mounts", lambda t: t.httpx_client(mounts={3: _ASYNC()})),
    "sync mount, async client": ("mounts", lambda t: t.httpx_client(mounts={"https://": _SYNC()})),
    "async mount, sync client": ("mounts", lambda t: t.httpx_sync_client(mounts={"https://": _ASYNC()})),
    "mount of the other package": (
        "mounts", lambda t: t.httpx_client(mounts={"https://": httpx.AsyncHTTPTransport()}),
    ),
    "options a dict": ("options", lambda t: async_client(t, options={"lease_renewal": 1})),
    "options a dict, sync": ("options", lambda t: sync_client(t, loop=_NO_LOOP, options={})),
    "options a dict, transport": ("options", lambda t: async_transport(t, options={})),
    "tracker None": ("tracker", lambda t: async_client(None)),
    "tracker None, sync": ("tracker", lambda t: sync_client(None, loop=_NO_LOOP)),
    "tracker None, transport": ("tracker", lambda t: async_transport(None)),
    "loop None": ("loop", lambda t: sync_client(t, loop=None)),
    "loop None, transport": ("loop", lambda t: sync_transport(t, loop=None)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_CLIENT_ARGUMENTS))
async def test_a_bad_client_argument_raises_value_error_naming_it_at_construction(
    tracker: Tracker, case: str
) -> None:
    """A transport of the wrong kind (sync for async) or package, mounts that are no mapping of
    transports, options that are no CaptureOptions, no tracker: refused when the client is built, not
    at its first request."""
    name, build = BAD_CLIENT_ARGUMENTS[case]
    with pytest.raises(ValueError, match=f"^{name}"):
        build(tracker)


async def test_a_hand_written_transport_on_httpx2s_base_class_is_taken(tracker: Tracker) -> None:
    """A sync test double derived from `httpx2.BaseTransport`, which openai re-exports as
    `openai.Transport` under its own module name: taken as httpx2's, and its calls recorded (it was
    refused as "no httpx or httpx2 transport" once openai was imported)."""
    assert httpx2.BaseTransport.__module__ == "openai"  # what openai does to the class
    fake = FakeProviderTransport(usage=USAGE)

    class Replaying(httpx2.BaseTransport):
        def handle_request(self, request: httpx2.Request) -> httpx2.Response:
            answer = asyncio.run_coroutine_threadsafe(fake.handle_async_request(request), loop).result()
            return httpx2.Response(answer.status_code, headers=answer.headers, content=answer.content)

    loop = asyncio.get_running_loop()
    client = openai.OpenAI(api_key="test", http_client=tracker.httpx_sync_client(transport=Replaying()))
    create = functools.partial(client.chat.completions.create, model="gpt-4o-mini", messages=MESSAGES)
    reply = await asyncio.to_thread(create)
    assert reply.usage is not None and reply.usage.prompt_tokens == USAGE.input_tokens
    assert [row["input_tokens"] for row in await table(tracker)] == [USAGE.input_tokens]


async def test_transports_and_mounts_of_the_clients_kind_and_package_are_captured(tracker: Tracker) -> None:
    """The documented forms still work: a fake (sync and async) as transport, httpx's or httpx2's,
    mounts of transports or None, sync clients alike; a mount's calls are recorded too."""
    loop = asyncio.get_running_loop()
    fake, mounted = FakeProviderTransport(usage=USAGE), FakeProviderTransport(usage=USAGE)
    request = {"model": "gpt-4o-mini", "messages": MESSAGES}
    mounts = {"https://api.openai.com": mounted, "http://": None}
    async with tracker.httpx_client(transport=fake, mounts=mounts) as http:
        assert isinstance(http, httpx2.AsyncClient)
        assert (await http.post(CHAT_URL, json=request)).status_code == 200
    sync_mounts = {"https://api.openai.com": mounted}
    with sync_client(tracker, loop=lambda: loop, transport=fake, mounts=sync_mounts) as client:
        assert isinstance(client, httpx2.Client)
        assert (await asyncio.to_thread(client.post, CHAT_URL, json=request)).status_code == 200
    legacy = FakeProviderTransport(package="httpx", usage=USAGE)
    async with tracker.httpx_client(transport=legacy, mounts={"https://api.openai.com": legacy}) as http:
        assert isinstance(http, httpx.AsyncClient)
        assert (await http.post(CHAT_URL, json=request)).status_code == 200
    assert isinstance(tracker.httpx_transport(legacy), httpx.AsyncBaseTransport)
    assert isinstance(tracker.httpx_sync_transport(legacy), httpx.BaseTransport)
    assert (fake.calls, mounted.calls, legacy.calls) == (0, 2, 1)
    assert len(await recorded(tracker, 3)) == 3


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("lease_renewal", 0),
        ("lease_renewal", -1),
        ("lease_renewal", float("nan")),
        ("lease_renewal", float("inf")),
        ("lease_renewal", True),
        ("lease_renewal", "60"),
        ("media_allowance_tokens", -1),
        ("media_allowance_tokens", 1.5),
        ("media_allowance_tokens", True),
        ("media_allowance_tokens", 10**9 + 1),
        ("include_stream_usage", "no"),
        ("include_stream_usage", 1),
        ("providers", [("x.ai", "openai")]),
    ],
)
def test_a_bad_capture_option_raises_value_error_naming_it(option: str, value: object) -> None:
    """lease_renewal is a finite number of seconds above 0 (NaN would never renew a stream's lease),
    media_allowance_tokens an int from 0 to 10**9, include_stream_usage a bool."""
    with pytest.raises(ValueError, match=f"^{option}"):
        CaptureOptions(**{option: value})  # type: ignore[arg-type]


def test_the_edges_of_the_capture_options_are_accepted() -> None:
    options = CaptureOptions(lease_renewal=0.001, media_allowance_tokens=0, include_stream_usage=False)
    assert (options.lease_renewal, options.media_allowance_tokens) == (0.001, 0)
    assert CaptureOptions(lease_renewal=1, media_allowance_tokens=10**9).lease_renewal == 1


@pytest.mark.parametrize(
    "providers",
    [
        {"x.com": "openai:bad id"},
        {"x.com": "openai:"},
        {"x.com": "openai: vllm"},
        {"x.com": "openai-compatible:a:b"},
        {"x.com": "ignore:foo"},
        {"x.com": "ignore:"},
        {"localhost:abc": "openai"},
        {"localhost:": "openai"},
        {"localhost:0": "openai"},
        {"localhost:08000": "openai"},
        {"localhost:65536": "openai"},
        {"*.x.com:8000": "openai"},
        {" api.x.com": "openai"},
        {"api.x.com ": "openai"},
        {"api x.com": "openai"},
        {"a..b": "openai"},
        {".x.com": "openai"},
        {"*x.com": "openai"},
        {"a.*.com": "openai"},
        {"*": "openai"},
        {"user@x.com": "openai"},
        {"https://x.com": "openai"},
        {"[::1]:8000": "openai"},
        {"x.com": "openai", "X.com": "anthropic"},
    ],
    ids=repr,
)
def test_a_malformed_providers_entry_raises_value_error_naming_it(providers: dict[str, str]) -> None:
    """A key that is no host, host:port or *.domain (a leading space never matches a request), a port
    out of range, an empty or spaced provider id, a provider id after "ignore": refused, naming
    `providers` and the entry."""
    entry = next(iter(providers)) if len(providers) == 1 else "x.com"
    with pytest.raises(ValueError, match=r"^providers") as refused:
        CaptureOptions(providers=providers)
    assert repr(entry).lower() in str(refused.value).lower()


def test_the_documented_providers_forms_route_as_documented() -> None:
    """Host, *.domain, host:port, an explicit id, "ignore", upper case and IPv4 hosts all still work."""
    options = CaptureOptions(
        providers={
            "OpenRouter.ai": "openai-compatible",
            "*.openai.azure.com": "openai-compatible",
            "localhost:8000": "openai-compatible:vllm",
            "127.0.0.1:11434": "openai-compatible:ollama_local",
            "llm-proxy.internal": "anthropic",
            "my_box": "gemini:google",
            "api.openai.com": "ignore",
        }
    )
    router = options.router
    route = router.match("openrouter.ai")
    assert route is not None and route.provider_for("openrouter.ai") == "openrouter"
    route = router.match("eu.openai.azure.com")
    assert route is not None and route.provider_for("eu.openai.azure.com") == "azure"
    route = router.match("localhost", 8000)
    assert route is not None and route.provider == "vllm"
    route = router.match("127.0.0.1", 11434)
    assert route is not None and route.provider == "ollama_local"
    assert router.match("localhost", 9000) is None
    route = router.match("llm-proxy.internal")
    assert route is not None and route.provider == "anthropic"
    route = router.match("my_box")
    assert route is not None and route.provider == "google"
    assert router.match("api.openai.com") is None
    route = router.match("api.anthropic.com")
    assert route is not None and route.provider == "anthropic"


async def test_sync_client_refuses_to_deadlock_on_the_trackers_loop(tracker: Tracker) -> None:
    """A sync client called on the tracker's loop thread raises instead of hanging; so does a stopped one."""
    loop = asyncio.get_running_loop()
    fake = FakeProviderTransport()
    client = openai.OpenAI(
        api_key="test", http_client=sync_client(tracker, loop=lambda: loop, transport=fake)
    )
    with pytest.raises(RuntimeError, match="deadlock"):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    stopped = openai.OpenAI(
        api_key="test", http_client=sync_client(tracker, loop=lambda: None, transport=fake)
    )
    with pytest.raises(RuntimeError, match="not running"):
        await asyncio.to_thread(stopped.chat.completions.create, model="gpt-4o-mini", messages=MESSAGES)
    assert fake.calls == 0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_an_async_client_refuses_a_call_before_the_tracker_is_entered(
    tmp_path: Path, stream: bool
) -> None:
    """Before the tracker is first entered (an app whose lifespan never ran), a captured call
    raises RuntimeError unsent, as a sync client's does: made, it would be billed and recorded
    nowhere. Once the tracker runs, the same client records."""
    fake = FakeProviderTransport(usage=USAGE)
    tracker = Tracker(f"sqlite+aiosqlite:///{tmp_path / 'l.db'}")
    client = openai.AsyncOpenAI(api_key="test", http_client=tracker.httpx_client(transport=fake))
    create = functools.partial(client.chat.completions.create, model="gpt-4o-mini", messages=MESSAGES)
    with pytest.raises(RuntimeError, match="the tracker is not running"):
        await create(stream=stream)  # type: ignore[call-overload]
    assert fake.calls == 0
    async with tracker:
        answer = await create(stream=stream)  # type: ignore[call-overload]
        if stream:
            async for _ in answer:
                pass
        report = await tracker.report(start=datetime(2000, 1, 1, tzinfo=UTC))
    assert fake.calls == 1 and [row.calls for row in report] == [1]


async def test_sync_stream_dropped_early_is_recorded(tracker: Tracker) -> None:
    """A sync stream left after one chunk (never closed) is recorded when it is collected."""
    loop = asyncio.get_running_loop()
    fake = FakeProviderTransport(usage=USAGE, text="a b c d")

    def work() -> None:
        http = sync_client(tracker, loop=lambda: loop, transport=fake)
        client = genai.Client(api_key="test", http_options=genai_types.HttpOptions(httpx_client=http))
        for _ in client.models.generate_content_stream(model="gemini-2.5-flash", contents="hi"):
            break
        gc.collect()

    await asyncio.to_thread(work)
    [row] = await recorded(tracker)
    assert_unknown_usage(row)


# -- bodies capture must still read, requests it must still send --------------------------------

CHAT_URL = "https://api.openai.com/v1/chat/completions"
STREAM_BODY = {"model": "gpt-4o-mini", "stream": True, "messages": MESSAGES, "max_tokens": 50}


def sse_final_chunk() -> bytes:
    final = {"id": "c", "model": "gpt-4o-mini", "choices": [], "usage": openai_chat_usage(USAGE)}
    return f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode()


class Chunks(httpx2.AsyncByteStream):
    """A body still to read, in chunks of `size` bytes, as a network transport hands it back."""

    def __init__(self, body: bytes, size: int) -> None:
        self._body, self._size = body, size

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self._body), self._size):
            yield self._body[start : start + self._size]


@pytest.mark.parametrize("zlib_header", [True, False], ids=["zlib deflate", "raw deflate"])
@pytest.mark.parametrize("read_in_full", [True, False], ids=["read in full", "from a stream"])
async def test_deflate_streams_with_or_without_the_zlib_header_are_read(
    url: str, zlib_header: bool, read_in_full: bool
) -> None:
    """`Content-Encoding: deflate` is sent both ways in the wild; httpx reads both, so capture does:
    the usage is recorded and the reservation settled, whoever read the body."""
    compressor = zlib.compressobj(wbits=zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS)
    body = compressor.compress(sse_final_chunk()) + compressor.flush()
    headers = {"content-type": "text/event-stream", "content-encoding": "deflate"}

    def handler(request: httpx2.Request) -> httpx2.Response:
        if read_in_full:
            return httpx2.Response(200, content=body, headers=headers)
        return httpx2.Response(200, stream=Chunks(body, 7), headers=headers)

    async with Tracker(url, budgets=[Budget.daily(5, mode="block")]) as tracker:
        http = async_client(tracker, transport=httpx2.MockTransport(handler))
        async with http, http.stream("POST", CHAT_URL, json=STREAM_BODY) as response:
            assert b"".join([chunk async for chunk in response.aiter_bytes()]) == sse_final_chunk()
        rows = await recorded(tracker)
        assert [(row["input_tokens"], row["output_tokens"], row["usage_source"]) for row in rows] == [
            (100, 20, "stream")
        ]
        assert await table(tracker, reservations) == []


class SyncChunks(httpx2.SyncByteStream):
    """`Chunks` for a sync client."""

    def __init__(self, body: bytes, size: int) -> None:
        self._body, self._size = body, size

    def __iter__(self) -> Iterator[bytes]:
        for start in range(0, len(self._body), self._size):
            yield self._body[start : start + self._size]


JSON_ANSWER = json.dumps({"id": "c", "model": "gpt-4o-mini", "usage": openai_chat_usage(USAGE)}).encode()
ENCODINGS: dict[str, Any] = {
    "identity": lambda body: body,
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "raw deflate": lambda body: (lambda c: c.compress(body) + c.flush())(zlib.compressobj(wbits=-15)),
}


async def post_for_no_stream(
    tracker: Tracker, handler: Any, *, sync: bool, options: CaptureOptions | None = None
) -> bytes:
    """POST a chat request that asks for no stream to `handler` through the async or the sync client
    (on a thread), and give back the body the client read."""
    request = {"model": "gpt-4o-mini", "messages": MESSAGES}
    transport = httpx2.MockTransport(handler)
    if sync:
        loop = asyncio.get_running_loop()

        def work() -> bytes:
            with sync_client(tracker, loop=lambda: loop, options=options, transport=transport) as http:
                return http.post(CHAT_URL, json=request).content

        return await asyncio.to_thread(work)
    async with async_client(tracker, options=options, transport=transport) as http:
        return (await http.post(CHAT_URL, json=request)).content


@pytest.mark.parametrize("answer", ["json", "sse"])
@pytest.mark.parametrize("encoding", list(ENCODINGS))
@pytest.mark.parametrize("read_in_full", [True, False], ids=["read in full", "from a stream"])
@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_an_answer_to_a_request_for_no_stream_is_read_however_it_comes(
    tracker: Tracker, answer: str, encoding: str, read_in_full: bool, sync: bool
) -> None:
    """A request that asks for no stream is read as JSON first, its headers only when that fails:
    still recorded with its usage when the host compresses it though identity was asked for, and
    when it streams SSE unasked; the client gets the answer as it came either way."""
    plain = JSON_ANSWER if answer == "json" else sse_final_chunk()
    body = ENCODINGS[encoding](plain)
    name = "deflate" if encoding == "raw deflate" else encoding
    content_type = "application/json" if answer == "json" else "text/event-stream"
    headers = (
        {"content-type": content_type, "content-encoding": name}
        if name != "identity"
        else {"content-type": content_type}
    )
    asked: list[str] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        asked.append(request.headers["accept-encoding"])
        if read_in_full:
            return httpx2.Response(200, content=body, headers=headers)
        return httpx2.Response(200, stream=(SyncChunks if sync else Chunks)(body, 9), headers=headers)

    received = await post_for_no_stream(tracker, handler, sync=sync)
    assert received == plain and asked == ["identity"]
    rows = await recorded(tracker)
    assert [(row["input_tokens"], row["output_tokens"], row["stream"]) for row in rows] == [
        (100, 20, answer == "sse")
    ]
    assert rows[0]["pricing_status"] == "priced"


def once(module: Any, body: bytes, size: int) -> Any:
    """A body still to read in chunks (async and sync), which fails if anything reads it twice."""

    class Once(module.AsyncByteStream, module.SyncByteStream):  # type: ignore[misc]
        reads = 0

        def _parts(self) -> list[bytes]:
            Once.reads += 1
            assert Once.reads == 1, "the provider's stream was read twice"
            return [body[start : start + size] for start in range(0, len(body), size)]

        async def __aiter__(self) -> AsyncIterator[bytes]:
            for part in self._parts():
                yield part

        def __iter__(self) -> Iterator[bytes]:
            yield from self._parts()

    return Once()


def watched(module: Any, stream: Any, seen: list[str]) -> Any:
    """`stream` wrapped as an SDK's tracing wraps a response's body: it notes whether the body was
    read to its end and whether it was closed."""

    class Watched(module.AsyncByteStream, module.SyncByteStream):  # type: ignore[misc]
        @property
        def elapsed(self) -> Any:  # httpx2 reads a response's elapsed time from its body
            return getattr(stream, "elapsed", None)

        async def __aiter__(self) -> AsyncIterator[bytes]:
            async for chunk in stream:
                yield chunk
            seen.append("read")

        def __iter__(self) -> Iterator[bytes]:
            yield from stream
            seen.append("read")

        async def aclose(self) -> None:
            seen.append("closed")
            await stream.aclose()

        def close(self) -> None:
            seen.append("closed")
            stream.close()

    return Watched()


def dropped(module: Any) -> Any:
    """A body whose connection drops before its first byte, as `module`'s network transport says it."""

    class Dropped(module.AsyncByteStream, module.SyncByteStream):  # type: ignore[misc]
        async def __aiter__(self) -> AsyncIterator[bytes]:
            raise module.ReadError("connection dropped")
            yield b""  # pragma: no cover

        def __iter__(self) -> Iterator[bytes]:
            raise module.ReadError("connection dropped")

    return Dropped()


def what_a_caller_sees(
    module: Any, tracker: Tracker | None, direct: bool, body: bytes, headers: dict[str, str], sync: bool
) -> Any:
    """What a caller sees of an answer to a request for no stream, through `module`'s client, with
    capture (`tracker`; `direct`: its package reads such a body with `identity_response`, else the
    package's own read) or without: a POST, the same request opened as a stream and read raw, read
    whole, and read whole through a wrapper around its body. A function of `sync` to call (async:
    to await)."""
    loop = asyncio.get_running_loop()  # the tracker's: a sync client records on it
    request = {"model": "gpt-4o-mini", "messages": MESSAGES}

    def handler(request: Any) -> Any:
        return module.Response(200, stream=once(module, body, 7), headers=headers)

    def client() -> Any:
        mock = module.MockTransport(handler)
        if tracker is None:
            return (module.Client if sync else module.AsyncClient)(transport=mock)
        package = bind(module.__name__)
        if not direct:
            package = package._replace(identity_response=None)
        if sync:
            transport = package.sync_transport(tracker, mock, CaptureOptions(), package, lambda: loop)
            return module.Client(transport=transport)
        return module.AsyncClient(transport=package.async_transport(tracker, mock, CaptureOptions(), package))

    def failed(error: Exception) -> str:
        return type(error).__name__

    def caught(action: Any) -> str:
        try:
            action()
        except Exception as error:
            return failed(error)
        return "nothing raised"

    def kept(response: Any) -> dict[str, Any]:  # as a cache keeps it: pickled, or copied
        pickled, copied = pickle.loads(pickle.dumps(response)), copy.copy(response)
        return {
            "pickled": (type(pickled), pickled.content, pickled.is_closed),
            "copied": (type(copied), copied.content, copied.is_closed),
        }

    def state(response: Any) -> dict[str, Any]:
        try:
            elapsed: bool | str = response.elapsed > timedelta(0)
        except RuntimeError as error:  # not closed (httpx leaves a body it failed to decode open)
            elapsed = failed(error)
        return {
            "closed": response.is_closed,
            "consumed": response.is_stream_consumed,
            "downloaded": response.num_bytes_downloaded,
            "elapsed": elapsed,
        }

    async def seen_async() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with client() as http:
            try:
                posted = await http.post(CHAT_URL, json=request)
                seen["direct read"] = type(posted) is not module.Response
                seen["post"] = state(posted) | {"content": posted.content} | kept(posted)
                seen["post"]["raw again"] = [part async for part in posted.aiter_raw()]
            except Exception as error:
                seen.setdefault("post", {})["error"] = failed(error)
            async with http.stream("POST", CHAT_URL, json=request) as raw:
                try:
                    seen["raw"] = {"content before": raw.content}
                except Exception as error:
                    seen["raw"] = {"content before": failed(error)}
                seen["raw"]["raw"] = b"".join([part async for part in raw.aiter_raw()])
            seen["raw"] |= state(raw)
            for name, wrap in (("read", False), ("read, watched", True)):
                notes: list[str] = []
                async with http.stream("POST", CHAT_URL, json=request) as whole:
                    if wrap:
                        whole.stream = watched(module, whole.stream, notes)
                    try:
                        seen[name] = {"content": await whole.aread(), "again": await whole.aread()}
                        seen[name]["bytes"] = [part async for part in whole.aiter_bytes()]
                    except Exception as error:
                        seen[name] = {"error": failed(error)}
                    seen[name] |= state(whole) | {"notes": notes}
            async with http.stream("POST", CHAT_URL, json=request) as whole:  # read the sync way
                seen["wrong read"] = {"error": caught(whole.read)}
                try:
                    seen["wrong read"]["then"] = await whole.aread()
                except Exception as error:
                    seen["wrong read"]["then"] = failed(error)
            async with http.stream("POST", CHAT_URL, json=request) as whole:
                whole.stream = dropped(module)
                with pytest.raises(module.ReadError) as cut:
                    await whole.aread()
                seen["dropped"] = {"request": str(cut.value.request.url)} | state(whole)
        return seen

    def seen_sync() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with client() as http:
            try:
                posted = http.post(CHAT_URL, json=request)
                seen["direct read"] = type(posted) is not module.Response
                seen["post"] = state(posted) | {"content": posted.content} | kept(posted)
                seen["post"]["raw again"] = list(posted.iter_raw())
            except Exception as error:
                seen.setdefault("post", {})["error"] = failed(error)
            with http.stream("POST", CHAT_URL, json=request) as raw:
                try:
                    seen["raw"] = {"content before": raw.content}
                except Exception as error:
                    seen["raw"] = {"content before": failed(error)}
                seen["raw"]["raw"] = b"".join(raw.iter_raw())
            seen["raw"] |= state(raw)
            for name, wrap in (("read", False), ("read, watched", True)):
                notes: list[str] = []
                with http.stream("POST", CHAT_URL, json=request) as whole:
                    if wrap:
                        whole.stream = watched(module, whole.stream, notes)
                    try:
                        seen[name] = {"content": whole.read(), "again": whole.read()}
                        seen[name]["bytes"] = list(whole.iter_bytes())
                    except Exception as error:
                        seen[name] = {"error": failed(error)}
                    seen[name] |= state(whole) | {"notes": notes}
            with http.stream("POST", CHAT_URL, json=request) as whole:  # read the async way
                wrong = caught(lambda: asyncio.run(whole.aread()))
                seen["wrong read"] = {"error": wrong}
                try:
                    seen["wrong read"]["then"] = whole.read()
                except Exception as error:
                    seen["wrong read"]["then"] = failed(error)
            with http.stream("POST", CHAT_URL, json=request) as whole:
                whole.stream = dropped(module)
                with pytest.raises(module.ReadError) as cut:
                    whole.read()
                seen["dropped"] = {"request": str(cut.value.request.url)} | state(whole)
        return seen

    return seen_sync if sync else seen_async


ANSWERS = {
    "identity": ({}, JSON_ANSWER),
    "gzip": ({"content-encoding": "gzip"}, gzip.compress(JSON_ANSWER)),
    "identity, named": ({"content-encoding": "identity"}, JSON_ANSWER),
    "JSON labelled gzip": ({"content-encoding": "gzip"}, JSON_ANSWER),
}


@pytest.mark.parametrize("answer", list(ANSWERS))
@pytest.mark.parametrize("package", ["httpx2", "httpx"])
@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_an_answer_capture_read_reads_for_the_caller_as_without_capture(
    tracker: Tracker, package: str, answer: str, sync: bool
) -> None:
    """Capture reads an answer to a request for no stream before the client does, and hands the
    client the body to read; one that is JSON with no Content-Encoding is read without the client's
    decoding layer. Either way the caller sees what a client without capture shows: the content or
    the error, the raw bytes, the state after the read (closed, consumed, bytes downloaded, the
    elapsed time), a wrapper around the body seeing it read then closed, the response pickled and
    copied, a read of the wrong kind (sync on an async client) refused and the right one then
    working, a connection dropped mid-read raising an error that names the request. The provider's stream is
    read once, and every call is recorded with its usage."""
    module = __import__(package)
    extra, body = ANSWERS[answer]
    headers = {"content-type": "application/json"} | extra
    assert bind(package).identity_response is not None  # the direct read is on for these releases
    seen: dict[str, Any] = {}
    for name, tracking, direct in (
        ("plain", None, False),
        ("direct", tracker, True),
        ("package's", tracker, False),
    ):
        run = what_a_caller_sees(module, tracking, direct, body, headers, sync)
        seen[name] = await asyncio.to_thread(run) if sync else await run()
    plain = seen["plain"]
    if answer == "JSON labelled gzip":
        assert plain["post"]["error"] == plain["read"]["error"] == "DecodingError"
    else:
        assert plain["post"]["content"] == plain["read"]["content"] == JSON_ANSWER
        assert plain["read, watched"]["notes"] == ["read", "closed"]
    assert plain["raw"]["raw"] == body and plain["raw"]["content before"] == "ResponseNotRead"
    direct = {name: case.pop("direct read", False) for name, case in seen.items()}
    assert direct == {"plain": False, "direct": answer.startswith("identity"), "package's": False}
    for case in seen.values():  # a read that failed counted the bytes up to the chunk it failed
        for observed in case.values():  # on: capture hands the body back in one chunk
            if "error" in observed:
                observed.pop("downloaded", None)
    assert seen["direct"] == plain and seen["package's"] == plain
    rows = await recorded(tracker, 12)  # six calls by each of the two capturing clients
    assert [(row["input_tokens"], row["output_tokens"]) for row in rows] == [(100, 20)] * 12


def test_a_release_whose_responses_keep_their_content_elsewhere_reads_as_it_does() -> None:
    """`identity_response` checks, once per package, that a response's own accessors give what its
    direct read sets; a release that keeps its content under another name is left to read a body
    its own way."""

    class Elsewhere(httpx2.Response):
        @property
        def content(self) -> bytes:
            return self.__dict__["body"]  # type: ignore[no-any-return]

    release = SimpleNamespace(
        Response=Elsewhere, SyncByteStream=httpx2.SyncByteStream, AsyncByteStream=httpx2.AsyncByteStream
    )
    assert identity_response(httpx2) is not None and identity_response(release) is None


@pytest.mark.parametrize("size", [1, 2, 4, 1_000], ids=lambda size: f"chunks of {size}")
async def test_a_stream_that_opens_with_a_byte_order_mark_is_read(tracker: Tracker, size: int) -> None:
    """The SSE specification drops one byte order mark at the start of a stream, however the
    chunks cut it."""
    body = b"\xef\xbb\xbf" + sse_final_chunk()

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, stream=Chunks(body, size), headers={"content-type": "text/event-stream"})

    http = async_client(tracker, transport=httpx2.MockTransport(handler))
    async with http, http.stream("POST", CHAT_URL, json=STREAM_BODY) as response:
        await response.aread()
    [row] = await recorded(tracker)
    assert (row["input_tokens"], row["output_tokens"], row["pricing_status"]) == (100, 20, "priced")


@pytest.mark.timeout(60)
async def test_a_sync_stream_read_on_the_loops_thread_renews_its_lease_without_blocking(
    tracker: Tracker,
) -> None:
    """A sync stream opened on a thread but read on the tracker's loop thread renews its lease
    without waiting on that loop (which would wait forever)."""
    fake = FakeProviderTransport(usage=USAGE, text="a b c d e f", delay=0.03)
    loop = asyncio.get_running_loop()
    http = sync_client(tracker, loop=lambda: loop, options=CaptureOptions(lease_renewal=0.01), transport=fake)
    request = http.build_request("POST", CHAT_URL, json=STREAM_BODY)
    response = await asyncio.to_thread(http.send, request, stream=True)
    chunks = list(response.iter_bytes())
    response.close()
    assert len(chunks) > 3
    [row] = await recorded(tracker)
    assert (row["input_tokens"], row["output_tokens"], row["stream"]) == (100, 20, True)


@pytest.mark.parametrize(
    "content",
    [
        '{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"cut \\ud83d"}]}',
        '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"x"}],"extra":'
        + "[" * 900
        + '"image"'
        + "]" * 900
        + "}",
    ],
    ids=["a lone surrogate escape, rewritten", "nested 900 deep with a media marker"],
)
async def test_requests_capture_reads_or_rewrites_are_sent_and_recorded(
    tracker: Tracker, content: str
) -> None:
    """Valid JSON that is awkward to read or write back (a lone surrogate escape, as `json.dumps`
    writes it; nesting deeper than the interpreter's stack) is sent as the caller meant it."""
    fake = FakeProviderTransport(usage=USAGE)
    async with async_client(tracker, transport=fake) as http:
        response = await http.post(CHAT_URL, content=content.encode())
        await response.aread()
    assert response.status_code == 200
    sent = fake.requests[-1].json
    assert sent["messages"] == json.loads(content)["messages"]
    [row] = await recorded(tracker)
    assert (row["input_tokens"], row["output_tokens"]) == (100, 20)


async def test_accept_encoding_given_twice_is_asked_as_identity_alone(tracker: Tracker) -> None:
    """Headers given twice by hand become one `Accept-Encoding: identity`: a second one left in
    place would let the server answer in an encoding capture cannot read."""
    asked: list[list[str]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        asked.append(request.headers.get_list("accept-encoding"))
        return httpx2.Response(200, content=JSON_ANSWER, headers={"content-type": "application/json"})

    headers = [("Accept-Encoding", "gzip"), ("Accept-Encoding", "br")]
    async with async_client(tracker, transport=httpx2.MockTransport(handler)) as http:
        await http.post(CHAT_URL, json={"model": "gpt-4o-mini", "messages": MESSAGES}, headers=headers)
    assert asked == [["identity"]]
    [row] = await recorded(tracker)
    assert (row["input_tokens"], row["output_tokens"]) == (100, 20)


class CutAfter(httpx2.AsyncByteStream, httpx2.SyncByteStream):
    """A body that breaks off with a read error after its first `events` SSE events (or bytes of
    JSON), as a dropped connection does."""

    def __init__(self, body: bytes, events: int) -> None:
        head = body.split(b"\n\n")[:events] if body.startswith(b"data:") else [body[:events]]
        self._parts = [part + b"\n\n" for part in head] if body.startswith(b"data:") else head

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self._parts:
            yield part
        raise httpx2.ReadError("connection dropped")

    def __iter__(self) -> Iterator[bytes]:
        yield from self._parts
        raise httpx2.ReadError("connection dropped")


@pytest.mark.parametrize(
    "answer", ["json", "sse"], ids=["json cut short", "sse sent unasked, cut after its usage"]
)
@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_an_answer_to_a_request_for_no_stream_cut_short_is_recorded_with_what_came(
    url: str, answer: str, sync: bool
) -> None:
    """A read error partway through an answer to a request for no stream reaches the caller, and
    the billed call is recorded once: with the usage an SSE stream sent unasked had shown before
    the cut, its reservation settled; with unknown usage for JSON cut short, its reservation held
    until the window ends."""
    content_type = "application/json" if answer == "json" else "text/event-stream"

    def handler(request: httpx2.Request) -> httpx2.Response:
        body = JSON_ANSWER if answer == "json" else sse_final_chunk()
        return httpx2.Response(200, stream=CutAfter(body, 1 if answer == "sse" else 20),
                               headers={"content-type": content_type})  # fmt: skip

    async with Tracker(url, budgets=[Budget.daily(10)], mode="block") as tracker:
        with pytest.raises(httpx2.ReadError):
            await post_for_no_stream(tracker, handler, sync=sync)
        [row] = await recorded(tracker)
        if answer == "sse":
            assert (row["input_tokens"], row["output_tokens"], row["usage_source"], row["stream"]) == (
                100, 20, "stream", True,
            )  # fmt: skip
            assert row["pricing_status"] == "priced"
        else:
            assert (row["usage_source"], row["pricing_status"], row["stream"]) == (
                "unknown", "unknown_usage", False,
            )  # fmt: skip
            await assert_held_until_the_day_ends(tracker)
            return
        assert await table(tracker, reservations) == []


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_an_answer_to_a_request_for_no_stream_read_slowly_renews_its_lease(
    url: str, sync: bool
) -> None:
    """A host streaming SSE slowly to a request that asked for no stream: the reservation's lease
    is renewed while the transport reads the answer, as a tapped stream renews it."""
    events = [part + b"\n\n" for part in sse_final_chunk().split(b"\n\n") if part]
    filler = [b": keep-alive\n\n"] * 4
    seen: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()

    async with Tracker(url, budgets=[Budget.daily(10)], mode="block", reservation_ttl=600) as tracker:

        class Slow(httpx2.AsyncByteStream, httpx2.SyncByteStream):
            async def __aiter__(self) -> AsyncIterator[bytes]:
                for part in filler:
                    yield part
                    await asyncio.sleep(0.03)
                seen.extend(await table(tracker, reservations))
                for part in events:
                    yield part

            def __iter__(self) -> Iterator[bytes]:
                for part in filler:
                    yield part
                    time.sleep(0.03)
                seen.extend(asyncio.run_coroutine_threadsafe(table(tracker, reservations), loop).result())
                yield from events

        def handler(request: httpx2.Request) -> httpx2.Response:
            return httpx2.Response(200, stream=Slow(), headers={"content-type": "text/event-stream"})

        options = CaptureOptions(lease_renewal=0.01)
        await post_for_no_stream(tracker, handler, sync=sync, options=options)
        [held] = seen
        assert held["expires_at"] > held["created_at"] + timedelta(seconds=600)
        [row] = await recorded(tracker)
        assert (row["input_tokens"], row["output_tokens"], row["stream"]) == (100, 20, True)
        assert await table(tracker, reservations) == []


class CloseFails(httpx2.AsyncByteStream, httpx2.SyncByteStream):
    """A body that comes whole, and whose connection then fails to close."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._body

    def __iter__(self) -> Iterator[bytes]:
        yield self._body

    async def aclose(self) -> None:
        raise httpx2.ReadError("closing the connection failed")

    def close(self) -> None:
        raise httpx2.ReadError("closing the connection failed")


@pytest.mark.parametrize("answer", ["json", "sse"])
@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_an_answer_whose_close_fails_is_recorded_with_its_usage(
    url: str, answer: str, sync: bool
) -> None:
    """An answer to a request for no stream that came whole, then failed to close: the error reaches
    the caller, and the billed call is recorded with its usage and its reservation settled."""
    body, content_type = (
        (JSON_ANSWER, "application/json") if answer == "json" else (sse_final_chunk(), "text/event-stream")
    )

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, stream=CloseFails(body), headers={"content-type": content_type})

    async with Tracker(url, budgets=[Budget.daily(10)], mode="block") as tracker:
        with pytest.raises(httpx2.ReadError):
            await post_for_no_stream(tracker, handler, sync=sync)
        [row] = await recorded(tracker)
        assert (row["input_tokens"], row["output_tokens"], row["stream"], row["pricing_status"]) == (
            100, 20, answer == "sse", "priced",
        )  # fmt: skip
        assert await table(tracker, reservations) == []


async def test_an_sse_answer_sent_unasked_is_recorded_before_it_is_returned(tracker: Tracker) -> None:
    """An SSE answer to a request for no stream is read whole by the transport, like a JSON one:
    recorded before the client has the response, even one the caller has not read yet."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(
            200, stream=Chunks(sse_final_chunk(), 9), headers={"content-type": "text/event-stream"}
        )

    request = {"model": "gpt-4o-mini", "messages": MESSAGES}
    http = async_client(tracker, transport=httpx2.MockTransport(handler))
    async with http, http.stream("POST", CHAT_URL, json=request) as response:
        [row] = await table(tracker)
        assert (row["input_tokens"], row["output_tokens"], row["stream"]) == (100, 20, True)
        assert await response.aread() == sse_final_chunk()
    assert len(await recorded(tracker)) == 1
