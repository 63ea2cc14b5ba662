"""The real openai, anthropic and google-genai SDKs through the capturing transport and the fake provider.

Each call must land in llm_calls once, with the canonical usage, the response's model and id, and a
cost equal to genai-prices' own extract_usage + calc_price on the same provider payload.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anthropic
import genai_prices
import httpx2
import openai
import pytest
import sqlalchemy as sa
from google import genai
from google.genai import types as genai_types
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy.ext.asyncio import create_async_engine

from llm_spend import Tracker, Usage, with_tags
from llm_spend.capture import async_client, sync_client
from llm_spend.money import to_nanousd
from llm_spend.storage.schema import calls
from llm_spend.testing import (
    FakeProviderTransport,
    anthropic_usage,
    gemini_usage,
    openai_chat_usage,
    openai_responses_usage,
)

LEGACY_OPENAI = Path(os.environ.get("LLM_SPEND_LEGACY_OPENAI", Path(sys.prefix) / "legacy" / "openai2"))
MESSAGES = [{"role": "user", "content": "Say hello"}]
OPENAI_USAGE = Usage(input_tokens=1200, output_tokens=300, cache_read_tokens=1024, reasoning_tokens=64)
ANTHROPIC_USAGE = Usage(
    input_tokens=5000, output_tokens=400, cache_read_tokens=3000, cache_write_tokens=1500,
    cache_write_1h_tokens=1000, reasoning_tokens=100,
)  # fmt: skip
GEMINI_USAGE = Usage(input_tokens=2000, output_tokens=700, cache_read_tokens=500, reasoning_tokens=200)


@pytest.fixture
async def tracker(tmp_path: Path) -> AsyncIterator[Tracker]:
    async with Tracker(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}") as running:
        yield running


async def rows(tracker: Tracker) -> list[dict[str, Any]]:
    engine = create_async_engine(tracker.url)
    try:
        async with engine.connect() as connection:
            result = await connection.execute(sa.select(calls).order_by(calls.c.id))
            return [dict(row) for row in result.mappings()]
    finally:
        await engine.dispose()


def genai_cost(payload: dict[str, Any], provider: str, flavor: str, model: str) -> int:
    """What genai-prices itself says the payload costs, in nano-USD."""
    extracted = genai_prices.extract_usage(payload, provider_id=provider, api_flavor=flavor)
    price = genai_prices.calc_price(extracted.usage, model_ref=model, provider_id=provider)
    return to_nanousd(price.total_price)


def assert_row(
    row: dict[str, Any], usage: Usage, *, provider: str, model: str, stream: bool, cost: int
) -> None:
    """One ledger row as a captured call must leave it (embeddings carry no response id)."""
    assert (row["provider"], row["model"], row["stream"]) == (provider, model, stream)
    assert row["usage_source"] == ("stream" if stream else "response")
    assert Usage(**{field: row[field] for field in Usage.__slots__}) == usage
    assert row["pricing_status"] == "priced"
    assert row["cost_nanousd"] == cost
    assert row["provider_response_id"] or usage.output_tokens == 0
    assert row["latency_ms"] is not None and row["latency_ms"] >= 0


# -- OpenAI ------------------------------------------------------------------------------------------

SNAPSHOT = "gpt-4o-mini-2024-07-18"
CHAT_COST = genai_cost(
    {"model": SNAPSHOT, "usage": openai_chat_usage(OPENAI_USAGE)}, "openai", "chat", SNAPSHOT
)
RESPONSES_COST = genai_cost(
    {"model": SNAPSHOT, "usage": openai_responses_usage(OPENAI_USAGE)}, "openai", "responses", SNAPSHOT
)


async def openai_async_call(client: openai.AsyncOpenAI, kind: str) -> None:
    if kind == "chat":
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=500)  # type: ignore[arg-type]
    elif kind == "chat-stream":
        chunks = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        assert [chunk async for chunk in chunks][-1].choices == []  # the documented extra usage chunk
    elif kind == "responses":
        await client.responses.create(model="gpt-4o-mini", input="Say hello", max_output_tokens=500)
    elif kind == "responses-stream":
        events = await client.responses.create(model="gpt-4o-mini", input="Say hello", stream=True)
        assert [event.type async for event in events][-1] == "response.completed"
    elif kind == "responses-helper-stream":  # the SDK's helper builds the response from the events
        async with client.responses.stream(model="gpt-4o-mini", input="Say hello") as stream:
            deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
            final = await stream.get_final_response()
        assert "".join(deltas) == final.output_text == "Hello from the fake provider."
    else:
        result = await client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
        assert len(result.data) == 2


def openai_sync_call(client: openai.OpenAI, kind: str) -> None:
    if kind == "chat":
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=500)  # type: ignore[arg-type]
    elif kind == "chat-stream":
        assert list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))  # type: ignore[arg-type]
    elif kind == "responses":
        client.responses.create(model="gpt-4o-mini", input="Say hello")
    elif kind == "responses-stream":
        assert list(client.responses.create(model="gpt-4o-mini", input="Say hello", stream=True))
    elif kind == "responses-helper-stream":
        with client.responses.stream(model="gpt-4o-mini", input="Say hello") as stream:
            assert stream.get_final_response().output_text == "Hello from the fake provider."
    else:
        client.embeddings.create(model="text-embedding-3-small", input="a")


def openai_expected(kind: str) -> tuple[Usage, int]:
    if kind == "embeddings":
        usage = Usage(input_tokens=OPENAI_USAGE.input_tokens)
        payload = {"model": SNAPSHOT, "usage": {"prompt_tokens": usage.input_tokens}}
        return usage, genai_cost(payload, "openai", "embeddings", SNAPSHOT)
    return OPENAI_USAGE, CHAT_COST if kind.startswith("chat") else RESPONSES_COST


OPENAI_KINDS = [
    "chat", "chat-stream", "responses", "responses-stream", "responses-helper-stream", "embeddings"
]  # fmt: skip


@pytest.mark.parametrize("kind", OPENAI_KINDS)
async def test_openai_async_calls_are_recorded(tracker: Tracker, kind: str) -> None:
    """openai (httpx2) async: JSON and streams recorded once, dated model, genai-prices' cost."""
    fake = FakeProviderTransport(usage=OPENAI_USAGE, model=SNAPSHOT)
    client = openai.AsyncOpenAI(api_key="test", http_client=async_client(tracker, transport=fake))
    with with_tags(user_id="u1"):
        await openai_async_call(client, kind)
    [row] = await rows(tracker)
    usage, cost = openai_expected(kind)
    assert_row(row, usage, provider="openai", model=SNAPSHOT, stream=kind.endswith("stream"), cost=cost)
    assert row["tags"] == {"user_id": "u1"}


@pytest.mark.parametrize("kind", OPENAI_KINDS)
async def test_openai_sync_calls_are_recorded(tracker: Tracker, kind: str) -> None:
    """openai sync client: recorded on the tracker's loop, with the calling thread's tags."""
    loop = asyncio.get_running_loop()
    fake = FakeProviderTransport(usage=OPENAI_USAGE, model=SNAPSHOT)

    def work() -> None:
        client = openai.OpenAI(
            api_key="test", http_client=sync_client(tracker, loop=lambda: loop, transport=fake)
        )
        with with_tags(user_id="u2"):
            openai_sync_call(client, kind)

    await asyncio.to_thread(work)
    [row] = await rows(tracker)
    usage, cost = openai_expected(kind)
    assert_row(row, usage, provider="openai", model=SNAPSHOT, stream=kind.endswith("stream"), cost=cost)
    assert row["tags"] == {"user_id": "u2"}


LEGACY_SCRIPT = """
import asyncio, json, sys
import httpx, openai
from llm_spend import Budget, Tracker, Usage
from llm_spend.capture import async_client
from llm_spend.testing import FakeProviderTransport

async def main(url):
    out = {"openai": openai.__version__}
    async with Tracker(url, budgets=[Budget.daily(1, per="user_id")], mode="block") as tracker:
        fake = FakeProviderTransport(package="httpx", usage=Usage(input_tokens=1200, output_tokens=300),
                                     model="gpt-4o-mini-2024-07-18")
        http = async_client(tracker, transport=fake)
        out["client"] = type(http).__module__.partition(".")[0]
        client = openai.AsyncOpenAI(api_key="test", http_client=http, max_retries=2)
        messages = [{"role": "user", "content": "hi"}]
        await client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True)
        out["chunks"] = len([chunk async for chunk in stream])
        from llm_spend import with_tags
        with with_tags(user_id="big"):
            try:
                await client.with_options(max_retries=1).chat.completions.create(
                    model="gpt-4o", max_tokens=200_000, messages=[{"role": "user", "content": "hi"}])
            except Exception as error:
                out["refused"] = [type(error).__name__, type(error.__cause__).__name__]
        out["provider_calls"] = fake.calls
    print(json.dumps(out))

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.skipif(
    not (LEGACY_OPENAI / "openai").is_dir(), reason=f"no pre-httpx2 openai at {LEGACY_OPENAI}"
)
async def test_legacy_openai_through_plain_httpx(tracker: Tracker, tmp_path: Path) -> None:
    """openai 2.x (plain httpx): recorded the same; a refusal surfaces as APIConnectionError.

    openai 2.x wraps and retries any transport exception: each retry is refused again (the provider
    is never reached), then the caller gets APIConnectionError whose __cause__ is the BudgetExceeded.
    """
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(LEGACY_OPENAI), os.environ.get("PYTHONPATH", "")]),
    }
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", LEGACY_SCRIPT, tracker.url], env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["openai"].startswith("2.") and out["client"] == "httpx"
    assert out["refused"] == ["APIConnectionError", "BudgetExceeded"]
    assert out["provider_calls"] == 2
    chat, stream = await rows(tracker)
    usage = Usage(input_tokens=1200, output_tokens=300)
    cost = genai_cost({"model": SNAPSHOT, "usage": openai_chat_usage(usage)}, "openai", "chat", SNAPSHOT)
    assert_row(chat, usage, provider="openai", model=SNAPSHOT, stream=False, cost=cost)
    assert stream["stream"] and stream["cost_nanousd"] == chat["cost_nanousd"]


# -- Anthropic ---------------------------------------------------------------------------------------

CLAUDE = "claude-sonnet-4-6"
CLAUDE_COST = genai_cost(
    {"model": CLAUDE, "usage": anthropic_usage(ANTHROPIC_USAGE)}, "anthropic", "default", CLAUDE
)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_anthropic_async_messages_with_5m_and_1h_cache_writes(tracker: Tracker, stream: bool) -> None:
    """anthropic async: input gets cache reads and writes added; the 1-hour writes are kept apart."""
    fake = FakeProviderTransport(usage=ANTHROPIC_USAGE)
    client = anthropic.AsyncAnthropic(api_key="test", http_client=async_client(tracker, transport=fake))
    if stream:
        events = await client.messages.create(model=CLAUDE, max_tokens=1000, messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        assert [event.type async for event in events][-1] == "message_stop"
    else:
        message = await client.messages.create(model=CLAUDE, max_tokens=1000, messages=MESSAGES)  # type: ignore[arg-type]
        assert message.usage.cache_creation is not None
    [row] = await rows(tracker)
    assert_row(row, ANTHROPIC_USAGE, provider="anthropic", model=CLAUDE, stream=stream, cost=CLAUDE_COST)
    assert row["service_tier"] == "standard"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_anthropic_sync_messages(tracker: Tracker, stream: bool) -> None:
    """anthropic sync client, JSON and the stream helper."""
    loop = asyncio.get_running_loop()
    fake = FakeProviderTransport(usage=ANTHROPIC_USAGE)

    def work() -> None:
        http = sync_client(tracker, loop=lambda: loop, transport=fake)
        client = anthropic.Anthropic(api_key="test", http_client=http)
        if stream:
            with client.messages.stream(model=CLAUDE, max_tokens=1000, messages=MESSAGES) as events:  # type: ignore[arg-type]
                assert events.get_final_message().usage.output_tokens == ANTHROPIC_USAGE.output_tokens
        else:
            client.messages.create(model=CLAUDE, max_tokens=1000, messages=MESSAGES)  # type: ignore[arg-type]

    await asyncio.to_thread(work)
    [row] = await rows(tracker)
    assert_row(row, ANTHROPIC_USAGE, provider="anthropic", model=CLAUDE, stream=stream, cost=CLAUDE_COST)


class Unread(httpx2.AsyncBaseTransport):
    """The fake provider's answers as a network transport hands them back: the body still to read."""

    def __init__(self, fake: FakeProviderTransport) -> None:
        self._fake = fake

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        answer = await self._fake.handle_async_request(request)
        return httpx2.Response(answer.status_code, headers=answer.headers, stream=_Body(answer.content))


class _Body(httpx2.AsyncByteStream):
    def __init__(self, body: bytes) -> None:
        self._body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._body[:50]
        yield self._body[50:]


def finished(exporter: InMemorySpanExporter) -> list[tuple[str, dict[str, Any]]]:
    """The spans ended so far: status and attributes (but the response id, which the fake numbers)."""
    return [
        (
            span.status.status_code.name,
            {k: v for k, v in (span.attributes or {}).items() if k != "gen_ai.response.id"},
        )
        for span in exporter.get_finished_spans()
    ]


async def test_anthropic_tracing_spans_end_as_without_capture(tracker: Tracker) -> None:
    """anthropic's own OpenTelemetry span of a call (on once it has a tracer provider) ends when the
    SDK has read the answer, with status OK and the usage: through capture, which reads the answer
    first and lets the client read it again, as without it."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    fake = FakeProviderTransport(usage=ANTHROPIC_USAGE)
    ended: dict[str, list[list[tuple[str, dict[str, Any]]]]] = {}
    for name, http in (
        ("plain", httpx2.AsyncClient(transport=Unread(fake))),
        ("capture", async_client(tracker, transport=Unread(fake))),
    ):
        client = anthropic.AsyncAnthropic(
            api_key="test", http_client=http, max_retries=0, open_telemetry={"tracer_provider": provider}
        )
        seen = ended[name] = []
        await client.messages.create(model=CLAUDE, max_tokens=1000, messages=MESSAGES)  # type: ignore[arg-type]
        seen.append(finished(exporter))
        exporter.clear()
        async with client.messages.with_streaming_response.create(
            model=CLAUDE,
            max_tokens=1000,
            messages=MESSAGES,  # type: ignore[arg-type]
        ) as response:
            await response.parse()
            seen.append(finished(exporter))
        exporter.clear()
        await client.close()
    [[(status, attributes)], [(streamed_status, _)]] = ended["plain"]
    assert status == streamed_status == "OK"
    assert attributes["gen_ai.usage.output_tokens"] == ANTHROPIC_USAGE.output_tokens
    assert ended["capture"] == ended["plain"]
    assert len(await rows(tracker)) == 2


# -- Gemini ------------------------------------------------------------------------------------------

GEMINI = "gemini-2.5-flash"
GEMINI_COST = genai_cost(
    {"modelVersion": GEMINI, "usageMetadata": gemini_usage(GEMINI_USAGE)}, "google", "default", GEMINI
)


def gemini_client(http: Any, *, sync: bool) -> genai.Client:
    key = "httpx_client" if sync else "httpx_async_client"
    return genai.Client(api_key="test", http_options=genai_types.HttpOptions(**{key: http}))


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_gemini_async_generate_content(tracker: Tracker, stream: bool) -> None:
    """google-genai async: thoughts are output, the last chunk's usage is the total (not a sum)."""
    fake = FakeProviderTransport(usage=GEMINI_USAGE)
    client = gemini_client(async_client(tracker, transport=fake), sync=False)
    config = genai_types.GenerateContentConfig(max_output_tokens=1000)
    if stream:
        chunks = await client.aio.models.generate_content_stream(model=GEMINI, contents="hi", config=config)
        assert len([chunk async for chunk in chunks]) > 1
    else:
        await client.aio.models.generate_content(model=GEMINI, contents="hi", config=config)
    [row] = await rows(tracker)
    assert_row(row, GEMINI_USAGE, provider="google", model=GEMINI, stream=stream, cost=GEMINI_COST)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_gemini_sync_generate_content(tracker: Tracker, stream: bool) -> None:
    """google-genai sync client."""
    loop = asyncio.get_running_loop()
    fake = FakeProviderTransport(usage=GEMINI_USAGE)

    def work() -> None:
        client = gemini_client(sync_client(tracker, loop=lambda: loop, transport=fake), sync=True)
        if stream:
            assert list(client.models.generate_content_stream(model=GEMINI, contents="hi"))
        else:
            client.models.generate_content(model=GEMINI, contents="hi")

    await asyncio.to_thread(work)
    [row] = await rows(tracker)
    assert_row(row, GEMINI_USAGE, provider="google", model=GEMINI, stream=stream, cost=GEMINI_COST)


def test_costs_compared_are_not_trivially_zero() -> None:
    """The oracle prices something: every compared cost is positive."""
    costs: list[Callable[[], int] | int] = [CHAT_COST, RESPONSES_COST, CLAUDE_COST, GEMINI_COST]
    assert all(isinstance(cost, int) and cost > 0 for cost in costs)


async def test_the_fake_providers_errors_read_as_each_providers(tracker: Tracker) -> None:
    """A status the fake is told to send comes with that provider's error body, so code that tells a
    rate limit from a quota or an overload by the SDK's error fields can be tested; none is recorded."""
    openai_client = openai.AsyncOpenAI(
        api_key="test",
        http_client=async_client(tracker, transport=FakeProviderTransport(statuses=[429])),
        max_retries=0,
    )
    with pytest.raises(openai.RateLimitError) as limited:
        await openai_client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert (limited.value.code, limited.value.type) == ("rate_limit_exceeded", "requests")
    claude = anthropic.AsyncAnthropic(
        api_key="test",
        http_client=async_client(tracker, transport=FakeProviderTransport(statuses=[529])),
        max_retries=0,
    )
    with pytest.raises(anthropic.APIStatusError) as overloaded:
        await claude.messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=MESSAGES)  # type: ignore[arg-type]
    assert overloaded.value.status_code == 529
    assert overloaded.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    gemini = gemini_client(async_client(tracker, transport=FakeProviderTransport(statuses=[429])), sync=False)
    with pytest.raises(genai.errors.ClientError) as exhausted:
        await gemini.aio.models.generate_content(model=GEMINI, contents="hi")
    assert (exhausted.value.code, exhausted.value.status) == (429, "RESOURCE_EXHAUSTED")
    assert await rows(tracker) == []
