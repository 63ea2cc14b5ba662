"""llm_spend.testing: the fake provider users run their code against, offline."""

from __future__ import annotations

import json
from http import HTTPStatus

import httpx
import httpx2
import pytest

from llm_spend.testing import FakeProviderTransport, anthropic_usage, gemini_usage
from llm_spend.usage import Usage

CHAT = "https://api.openai.com/v1/chat/completions"


def test_it_is_a_transport_of_the_package_asked_for() -> None:
    """Default httpx2; package="httpx" gives a plain-httpx transport, sync and async alike."""
    assert isinstance(FakeProviderTransport(), httpx2.BaseTransport | httpx2.AsyncBaseTransport)
    legacy = FakeProviderTransport(package="httpx")
    assert isinstance(legacy, httpx.BaseTransport) and isinstance(legacy, httpx.AsyncBaseTransport)
    assert isinstance(legacy, FakeProviderTransport)
    with pytest.raises(ValueError, match="package"):
        FakeProviderTransport(package="requests")


def test_json_answer_with_the_usage_and_model_given() -> None:
    """A chat completion JSON with the configured usage; the model defaults to the request's."""
    fake = FakeProviderTransport(usage=Usage(input_tokens=7, output_tokens=3, cache_read_tokens=2))
    with httpx2.Client(transport=fake) as client:
        body = client.post(CHAT, json={"model": "gpt-x", "messages": []}).json()
    assert body["model"] == "gpt-x"
    assert (
        body["usage"]["prompt_tokens"] == 7 and body["usage"]["prompt_tokens_details"]["cached_tokens"] == 2
    )
    assert (
        fake.calls == 1
        and fake.requests[0].provider == "openai"
        and fake.requests[0].json["model"] == "gpt-x"
    )


async def test_async_streams_with_plain_httpx() -> None:
    """An async httpx client gets an SSE stream that ends with the usage chunk and [DONE]."""
    fake = FakeProviderTransport(package="httpx", model="gpt-x-2025")
    request = {"model": "gpt-x", "stream": True, "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient(transport=fake) as client:
        response = await client.post(CHAT, json=request)
    events = [line for line in response.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["usage"]["completion_tokens"] == 5


def test_chat_streams_carry_usage_only_when_asked_for() -> None:
    """Like OpenAI: without stream_options.include_usage there is no usage chunk."""
    fake = FakeProviderTransport()
    with httpx2.Client(transport=fake) as client:
        text = client.post(CHAT, json={"model": "m", "stream": True}).text
    assert '"usage"' not in text


def test_chunking_and_truncation() -> None:
    """chunk_size splits the same bytes into network chunks; truncate_after stops before the end."""
    whole = FakeProviderTransport()
    split = FakeProviderTransport(chunk_size=7)
    cut = FakeProviderTransport(truncate_after=2)
    request = {"model": "claude-x", "max_tokens": 5, "stream": True}
    url = "https://api.anthropic.com/v1/messages"
    with (
        httpx2.Client(transport=whole) as a,
        httpx2.Client(transport=split) as b,
        httpx2.Client(transport=cut) as c,
    ):
        full = a.post(url, json=request).content
        with b.stream("POST", url, json=request) as response:
            pieces = list(response.iter_raw())
        short = c.post(url, json=request).text
    assert b"".join(pieces) == full and all(len(piece) <= 7 for piece in pieces) and len(pieces) > 10
    assert short.count("event:") == 2 and "message_delta" not in short


def test_statuses_then_success_and_unknown_paths() -> None:
    """statuses answer the first requests in order; an unknown path is a 404; all are counted."""
    fake = FakeProviderTransport(statuses=[429])
    with httpx2.Client(transport=fake) as client:
        assert client.post(CHAT, json={"model": "m"}).status_code == 429
        assert client.post(CHAT, json={"model": "m"}).status_code == 200
        assert client.post("https://api.openai.com/v1/files", json={}).status_code == 404
    assert fake.calls == 3 and fake.requests[-1].provider == "unknown"


def test_usage_none_sends_payloads_without_usage() -> None:
    """usage=None: a 2xx without a usage block, as some providers and proxies send."""
    fake = FakeProviderTransport(usage=None)
    url = "https://generativelanguage.googleapis.com/v1beta/models/gemini-x:generateContent"
    with httpx2.Client(transport=fake) as client:
        body = client.post(url, json={"contents": []}).json()
    assert "usageMetadata" not in body and body["modelVersion"] == "gemini-x"


def test_provider_shapes_follow_each_providers_convention() -> None:
    """Anthropic's input excludes cache tokens; Gemini reports thoughts apart from candidates."""
    usage = Usage(input_tokens=100, output_tokens=40, cache_read_tokens=30, cache_write_tokens=20,
                  cache_write_1h_tokens=5, reasoning_tokens=10)  # fmt: skip
    claude = anthropic_usage(usage)
    assert (claude["input_tokens"], claude["cache_creation"]) == (
        50,
        {"ephemeral_5m_input_tokens": 15, "ephemeral_1h_input_tokens": 5},
    )
    gemini = gemini_usage(usage)
    assert (gemini["candidatesTokenCount"], gemini["thoughtsTokenCount"]) == (30, 10)


def test_embeddings_have_the_size_the_model_or_the_request_gives() -> None:
    """`dimensions` when asked for, else the model's own size (1536 for text-embedding-3-small), else 8:
    code that stores vectors in a fixed-size column meets the size it will meet in production."""
    fake = FakeProviderTransport()
    url = "https://api.openai.com/v1/embeddings"
    with httpx2.Client(transport=fake) as client:

        def size(**request: object) -> int:
            body = client.post(url, json={"input": "a", "encoding_format": "float", **request}).json()
            return len(body["data"][0]["embedding"])

        assert size(model="text-embedding-3-small", dimensions=256) == 256
        assert size(model="text-embedding-3-small") == 1536
        assert size(model="text-embedding-3-large") == 3072
        assert size(model="my-local-embedder") == 8


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("usage", {"input_tokens": 5}),
        ("usage", 5),
        ("model", 3),
        ("model", ""),
        ("text", None),
        ("statuses", 429),
        ("statuses", "429"),
        ("statuses", ["429"]),
        ("statuses", [True]),
        ("statuses", [429.0]),
        ("statuses", [99]),
        ("statuses", [600]),
        ("statuses", [101]),
        ("statuses", [201]),
        ("statuses", [429, 204]),
        ("chunk_size", -1),
        ("chunk_size", 0),
        ("chunk_size", 1.5),
        ("chunk_size", True),
        ("truncate_after", -1),
        ("truncate_after", 1.5),
        ("truncate_after", False),
        ("delay", -0.1),
        ("delay", float("nan")),
        ("delay", float("inf")),
        ("delay", "1"),
        ("delay", True),
        ("service_tier", 3),
        ("service_tier", ""),
    ],
)
def test_a_bad_option_raises_value_error_naming_it_at_construction(option: str, value: object) -> None:
    """Each option is checked when the fake is built, not at its first request: a status it cannot
    answer as a provider would (1xx, or 2xx but 200) included."""
    with pytest.raises(ValueError, match=f"^{option}"):
        FakeProviderTransport(**{option: value})  # type: ignore[arg-type]


def test_the_edges_of_each_option_are_accepted_and_honoured() -> None:
    """200 and 300 to 599 answer with that status; truncate_after=0 ends a stream before any event;
    chunk_size=1 sends it byte by byte; a generator of statuses is not a sequence, a tuple is."""
    fake = FakeProviderTransport(statuses=(200, 301, 599), delay=0)
    with httpx2.Client(transport=fake) as client:
        assert [client.post(CHAT, json={"model": "m"}).status_code for _ in range(4)] == [200, 301, 599, 200]
    request = {"model": "m", "stream": True}
    with (
        httpx2.Client(transport=FakeProviderTransport(truncate_after=0)) as empty,
        httpx2.Client(transport=FakeProviderTransport(chunk_size=1, text="hi")) as bytewise,
    ):
        assert empty.post(CHAT, json=request).content == b""
        with bytewise.stream("POST", CHAT, json=request) as response:
            assert {len(piece) for piece in response.iter_raw()} == {1}
    with pytest.raises(ValueError, match="statuses"):
        FakeProviderTransport(statuses=(status for status in [429]))  # type: ignore[arg-type]
    with httpx2.Client(transport=FakeProviderTransport(statuses=[HTTPStatus.TOO_MANY_REQUESTS])) as client:
        assert client.post(CHAT, json={"model": "m"}).status_code == 429  # an HTTPStatus is a status
