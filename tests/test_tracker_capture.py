"""The Tracker's capture methods: real SDK clients built on tracker.httpx_client() record every call."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import anthropic
import openai
import pytest
import sqlalchemy as sa
from google.genai import types
from sqlalchemy.ext.asyncio import create_async_engine

from llm_spend import Budget, BudgetExceeded, Tracker, Usage, with_tags
from llm_spend.storage.schema import calls
from llm_spend.testing import FakeProviderTransport


async def recorded(url: str) -> list[dict[str, object]]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(sa.select(calls).order_by(calls.c.id))
            return [dict(row) for row in result.mappings()]
    finally:
        await engine.dispose()


async def test_async_openai_client_records_through_httpx_client(tmp_path: Path) -> None:
    """openai.AsyncOpenAI(http_client=tracker.httpx_client()) records the call with its tags."""
    fake = FakeProviderTransport(usage=Usage(input_tokens=1200, output_tokens=300), model="gpt-4o-2024-08-06")
    async with Tracker(f"sqlite+aiosqlite:///{tmp_path / 'l.db'}") as tracker:
        client = openai.AsyncOpenAI(api_key="sk-test", http_client=tracker.httpx_client(transport=fake))
        with with_tags(feature="chat"):
            await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    [row] = await recorded(tracker.url)
    assert row["model"] == "gpt-4o-2024-08-06" and row["provider"] == "openai"
    assert row["input_tokens"] == 1200 and row["output_tokens"] == 300
    assert row["cost_nanousd"] and row["usage_source"] == "response"
    assert row["tags"] == {"feature": "chat"}


async def test_sync_anthropic_client_records_through_httpx_sync_client(tmp_path: Path) -> None:
    """anthropic.Anthropic(http_client=tracker.httpx_sync_client()) in a thread records the call."""
    fake = FakeProviderTransport(usage=Usage(input_tokens=500, output_tokens=50))
    async with Tracker(f"sqlite+aiosqlite:///{tmp_path / 'l.db'}") as tracker:
        client = anthropic.Anthropic(api_key="sk-test", http_client=tracker.httpx_sync_client(transport=fake))

        def call() -> None:
            client.messages.create(
                model="claude-sonnet-4-6", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
            )

        await asyncio.to_thread(call)
    [row] = await recorded(tracker.url)
    assert row["provider"] == "anthropic" and row["input_tokens"] == 500 and row["cost_nanousd"]


async def test_block_budget_refuses_before_the_fake_provider_is_reached(tmp_path: Path) -> None:
    """A block-mode budget too small for the request's bound: BudgetExceeded, and no request sent."""
    fake = FakeProviderTransport()
    tracker = Tracker(
        f"sqlite+aiosqlite:///{tmp_path / 'l.db'}", budgets=[Budget.daily("0.001", mode="block")]
    )
    async with tracker:
        client = openai.AsyncOpenAI(
            api_key="sk-test", http_client=tracker.httpx_client(transport=fake), max_retries=0
        )
        with pytest.raises(BudgetExceeded) as refused:
            await client.chat.completions.create(
                model="gpt-4o", max_tokens=100_000, messages=[{"role": "user", "content": "hi"}]
            )
    assert refused.value.stage == "preflight"
    assert fake.calls == 0
    assert await recorded(tracker.url) == []


async def test_configured_openai_compatible_host_is_captured(tmp_path: Path) -> None:
    """Tracker(providers={host: "openai-compatible"}) captures a host it would otherwise pass through."""
    fake = FakeProviderTransport(usage=Usage(input_tokens=100, output_tokens=10), model="deepseek-chat")
    tracker = Tracker(
        f"sqlite+aiosqlite:///{tmp_path / 'l.db'}", providers={"llm.internal": "openai-compatible"}
    )
    async with tracker:
        client = openai.AsyncOpenAI(
            api_key="sk-test",
            base_url="https://llm.internal/v1",
            http_client=tracker.httpx_client(transport=fake),
        )
        await client.chat.completions.create(
            model="deepseek-chat", messages=[{"role": "user", "content": "hi"}]
        )
    [row] = await recorded(tracker.url)
    assert row["model"] == "deepseek-chat" and row["input_tokens"] == 100


async def test_clamp_max_tokens_lowers_the_request_to_what_the_budget_can_pay(tmp_path: Path) -> None:
    """clamp_max_tokens=True: a request asking more output than the budget pays for is sent with less."""
    fake = FakeProviderTransport(usage=Usage(input_tokens=20, output_tokens=10))
    tracker = Tracker(
        f"sqlite+aiosqlite:///{tmp_path / 'l.db'}",
        budgets=[Budget.daily("0.01", mode="block")],
        clamp_max_tokens=True,
    )
    async with tracker:
        client = openai.AsyncOpenAI(api_key="sk-test", http_client=tracker.httpx_client(transport=fake))
        await client.chat.completions.create(
            model="gpt-4o-mini", max_tokens=1_000_000, messages=[{"role": "user", "content": "hi"}]
        )
        granted = fake.requests[0].json["max_tokens"]
        assert 256 <= granted < 1_000_000
        at = datetime.now(UTC)
        bound = tracker.pricer.bound("openai", "gpt-4o-mini", input_tokens=0, output_tokens=granted, at=at)
        assert bound.nanousd is not None and bound.nanousd <= 10_000_000  # $0.01
    assert len(await recorded(tracker.url)) == 1


async def test_clamp_refuses_when_not_even_the_minimum_fits(tmp_path: Path) -> None:
    """When fewer than clamp_min_output_tokens are affordable, the call is refused as without clamping."""
    fake = FakeProviderTransport()
    tracker = Tracker(
        f"sqlite+aiosqlite:///{tmp_path / 'l.db'}",
        budgets=[Budget.daily("0.0001", mode="block")],
        clamp_max_tokens=True,
        clamp_min_output_tokens=10_000,
    )
    async with tracker:
        client = openai.AsyncOpenAI(
            api_key="sk-test", http_client=tracker.httpx_client(transport=fake), max_retries=0
        )
        with pytest.raises(BudgetExceeded):
            await client.chat.completions.create(
                model="gpt-4o-mini", max_tokens=1_000_000, messages=[{"role": "user", "content": "hi"}]
            )
    assert fake.calls == 0


async def test_track_stream_reads_provider_events(tmp_path: Path) -> None:
    """track_stream with OpenAI chunks and with Anthropic events: the final usage, recorded once."""
    async with Tracker(f"sqlite+aiosqlite:///{tmp_path / 'l.db'}") as tracker:
        async with tracker.track_stream(provider="openai", model="gpt-4o-mini") as s:
            s.event(
                {"id": "c1", "model": "gpt-4o-mini-2024-07-18", "choices": [{"delta": {"content": "hi"}}]}
            )
            s.event(
                {
                    "id": "c1",
                    "model": "gpt-4o-mini-2024-07-18",
                    "choices": [],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 20},
                }
            )
        async with tracker.track_stream(provider="anthropic", model="claude-sonnet-4-6") as s:
            s.event(
                {
                    "type": "message_start",
                    "message": {
                        "id": "m1",
                        "model": "claude-sonnet-4-6",
                        "usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 1},
                    },
                }
            )
            s.event({"type": "message_delta", "usage": {"output_tokens": 12}})
            s.event({"type": "message_delta", "usage": {"output_tokens": 30}})
    chat, claude = await recorded(tracker.url)
    assert (chat["model"], chat["input_tokens"], chat["output_tokens"]) == ("gpt-4o-mini-2024-07-18", 100, 20)
    assert chat["stream"] and chat["usage_source"] == "stream" and chat["cost_nanousd"]
    assert (claude["input_tokens"], claude["cache_read_tokens"], claude["output_tokens"]) == (15, 5, 30)


async def test_track_stream_reads_gemini_chunks_dumped_by_google_genai(tmp_path: Path) -> None:
    """google-genai's `chunk.model_dump()` names the fields the Python way (`usage_metadata`,
    `prompt_token_count`, `finish_reason`): read as the wire's camelCase, with or without aliases."""

    def chunk(text: str, prompt: int, out: int, finish: str | None) -> types.GenerateContentResponse:
        return types.GenerateContentResponse(
            candidates=[
                types.Candidate(
                    content=types.Content(role="model", parts=[types.Part(text=text)]), finish_reason=finish
                )
            ],
            usage_metadata=types.GenerateContentResponseUsageMetadata(
                prompt_token_count=prompt,
                candidates_token_count=out,
                thoughts_token_count=4,
                cached_content_token_count=20,
            ),
            model_version="gemini-2.5-flash",
            response_id="r1",
        )

    chunks = [chunk("Hel", 100, 1, None), chunk("lo", 100, 9, "STOP")]
    async with Tracker(f"sqlite+aiosqlite:///{tmp_path / 'l.db'}") as tracker:
        for dump in ({}, {"by_alias": True, "mode": "json"}, {"exclude_none": True}):
            async with tracker.track_stream(provider="google", model="gemini-2.5-flash") as s:
                for c in chunks:
                    s.event(c.model_dump(**dump))  # type: ignore[arg-type]
        async with tracker.track_stream(provider="google", model="gemini-2.5-flash") as s:
            s.event(chunks[0].model_dump())  # the stream stopped before its last chunk
    *whole, cut = await recorded(tracker.url)
    for row in whole:
        assert (row["model"], row["provider_response_id"]) == ("gemini-2.5-flash", "r1")
        assert (row["input_tokens"], row["output_tokens"]) == (100, 13)
        assert (row["cache_read_tokens"], row["reasoning_tokens"]) == (20, 4)
        assert row["pricing_status"] == "priced" and row["cost_nanousd"]
    assert len({row["cost_nanousd"] for row in whole}) == 1
    assert cut["pricing_status"] == "unknown_usage" and cut["cost_nanousd"] is None


async def test_track_stream_with_totals_and_with_an_error(tmp_path: Path) -> None:
    """s.usage(...) records the totals; a block that raises is recorded once, tagged, and re-raises."""
    async with Tracker(f"sqlite+aiosqlite:///{tmp_path / 'l.db'}") as tracker:
        async with tracker.track_stream(provider="openai", model="gpt-4o", tags={"feature": "x"}) as s:
            s.usage(input_tokens=50, output_tokens=5)
        with pytest.raises(ConnectionError):
            async with tracker.track_stream(provider="openai", model="gpt-4o"):
                raise ConnectionError("stream cut")
    totals, cut = await recorded(tracker.url)
    assert (
        totals["usage_source"] == "manual"
        and totals["input_tokens"] == 50
        and totals["tags"] == {"feature": "x"}
    )
    assert cut["tags"] == {"stream_errored": "true"}
    assert cut["usage_source"] == "unknown" and cut["pricing_status"] == "unknown_usage"
    assert cut["cost_nanousd"] is None


@pytest.mark.parametrize(
    "path",
    [
        "/v1beta/models/" + "m" * 250 + ":generateContent",
        "/v1beta/models/gem%00ini:generateContent",
    ],
    ids=["model-too-long", "model-with-nul"],
)
async def test_a_call_whose_path_names_a_model_the_ledger_cannot_store_is_recorded_as_unknown(
    tmp_path: Path, path: str
) -> None:
    """Gemini names the model in the path; one too long or with NUL, from an answer that names none,
    is recorded as model "unknown" (the call was dropped, its record refused, before)."""
    import httpx2

    def answer(request: httpx2.Request) -> httpx2.Response:
        usage = {"promptTokenCount": 10, "candidatesTokenCount": 2}
        return httpx2.Response(200, json={"candidates": [], "usageMetadata": usage})

    async with Tracker(f"sqlite+aiosqlite:///{tmp_path / 'l.db'}") as tracker:
        async with tracker.httpx_client(transport=httpx2.MockTransport(answer)) as http:
            response = await http.post(
                "https://generativelanguage.googleapis.com" + path, json={"contents": []}
            )
        assert response.status_code == 200
    [row] = await recorded(tracker.url)
    assert (row["model"], row["input_tokens"], row["output_tokens"]) == ("unknown", 10, 2)
