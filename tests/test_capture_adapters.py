"""Provider adapters and routes: provider payloads in, canonical facts out (no network, no tracker)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llm_spend.capture import CaptureOptions, Outcome, SSEParser, provider_from_host, resolve_route
from llm_spend.capture.anthropic import ADAPTER as ANTHROPIC
from llm_spend.capture.base import MEDIA_ALLOWANCE, TOOLS_ALLOWANCE, input_bound
from llm_spend.capture.calls import plan_call
from llm_spend.capture.gemini import ADAPTER as GEMINI
from llm_spend.capture.openai import ADAPTER as OPENAI
from llm_spend.usage import Usage


def stream(adapter: object, kind: str, text: bytes) -> Outcome:
    accumulator = adapter.accumulator(kind)  # type: ignore[attr-defined]
    parser = SSEParser(accumulator)
    parser.feed(text)
    parser.close()
    outcome: Outcome = accumulator.outcome()
    return outcome


# -- OpenAI ------------------------------------------------------------------------------------------


def test_openai_chat_usage_keeps_cached_and_reasoning_as_subsets() -> None:
    """prompt_tokens already includes cached and cache-write tokens; completion includes reasoning."""
    body = {
        "id": "chatcmpl-1", "model": "gpt-4o-2024-08-06", "service_tier": "flex",
        "usage": {
            "prompt_tokens": 1000, "completion_tokens": 300,
            "prompt_tokens_details": {"cached_tokens": 600, "cache_write_tokens": 100},
            "completion_tokens_details": {"reasoning_tokens": 200},
        },
    }  # fmt: skip
    assert OPENAI.outcome("chat", body) == Outcome(
        Usage(input_tokens=1000, output_tokens=300, cache_read_tokens=600, cache_write_tokens=100,
              reasoning_tokens=200),
        "gpt-4o-2024-08-06", "chatcmpl-1", "flex",
    )  # fmt: skip


def test_openai_responses_and_embeddings_usage() -> None:
    """responses: input_tokens_details / output_tokens_details; embeddings: prompt_tokens only."""
    responses = {
        "input_tokens": 50, "output_tokens": 7, "input_tokens_details": {"cached_tokens": 10},
        "output_tokens_details": {"reasoning_tokens": 3},
    }  # fmt: skip
    assert OPENAI.outcome("responses", {"usage": responses}).usage == Usage(
        input_tokens=50, output_tokens=7, cache_read_tokens=10, reasoning_tokens=3
    )
    embeddings = {"model": "text-embedding-3-small", "usage": {"prompt_tokens": 8, "total_tokens": 8}}
    assert OPENAI.outcome("embeddings", embeddings).usage == Usage(input_tokens=8)


def test_openai_compatible_deepseek_cache_hits() -> None:
    """DeepSeek's prompt_cache_hit_tokens count as cache reads when cached_tokens is absent."""
    usage = {"prompt_tokens": 100, "completion_tokens": 5, "prompt_cache_hit_tokens": 64}
    assert OPENAI.outcome("chat", {"usage": usage}).usage == Usage(
        input_tokens=100, output_tokens=5, cache_read_tokens=64
    )


def test_payload_without_usage_or_with_contradictions_is_unknown_usage() -> None:
    """No usage block, or numbers that do not add up, give usage None (recorded as unknown, not $0)."""
    assert OPENAI.outcome("chat", {"model": "gpt-4o"}) == Outcome(None, "gpt-4o")
    bad = {"prompt_tokens": 5, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 9}}
    assert OPENAI.outcome("chat", {"usage": bad}).usage is None
    assert OPENAI.outcome("chat", ["not", "an", "object"]) == Outcome()


def test_openai_chat_stream_takes_the_usage_chunk_and_skips_null_usage() -> None:
    """The final chunk with empty choices carries usage; chunks with "usage": null are not it."""
    events = (
        b'data: {"id":"c1","model":"gpt-4o-mini-2024-07-18","choices":[{"delta":{"content":"\\"usage\\""}}],'
        b'"usage":null}\n\n'
        b'data: {"id":"c1","model":"gpt-4o-mini-2024-07-18","choices":[],"usage":{"prompt_tokens":9,'
        b'"completion_tokens":2}}\n\ndata: [DONE]\n\n'
    )
    assert stream(OPENAI, "chat", events) == Outcome(
        Usage(input_tokens=9, output_tokens=2), "gpt-4o-mini-2024-07-18", "c1"
    )
    cut = events.split(b"\n\n")[0] + b"\n\n"
    assert stream(OPENAI, "chat", cut) == Outcome(None, "gpt-4o-mini-2024-07-18", "c1")


@pytest.mark.parametrize("terminal", ["response.completed", "response.incomplete", "response.failed"])
def test_openai_responses_stream_terminal_events_carry_usage(terminal: str) -> None:
    """Each terminal responses event carries response.usage; with or without `event:` lines."""
    created = {"type": "response.created", "response": {"id": "r1", "model": "o3", "usage": None}}
    usage = {"input_tokens": 5, "output_tokens": 4, "output_tokens_details": {"reasoning_tokens": 4}}
    done = {"type": terminal, "response": {"id": "r1", "model": "o3-2025-04-16", "usage": usage}}
    named = (
        f"event: response.created\ndata: {json.dumps(created)}\n\n"
        f"event: {terminal}\ndata: {json.dumps(done)}\n\n"
    )
    bare = f"data: {json.dumps(created)}\n\ndata: {json.dumps(done)}\n\n"
    expected = Outcome(Usage(input_tokens=5, output_tokens=4, reasoning_tokens=4), "o3-2025-04-16", "r1")
    assert stream(OPENAI, "responses", named.encode()) == expected
    assert stream(OPENAI, "responses", bare.encode()) == expected


def test_openai_request_facts() -> None:
    """Model, stream flag and max output (times n choices) from the body; Azure names the deployment."""
    body = {"model": "gpt-4o", "stream": True, "max_completion_tokens": 100, "max_tokens": 5, "n": 3}
    info = OPENAI.call_info("chat", "/v1/chat/completions", body)
    assert (info.model, info.stream, info.max_output_tokens) == ("gpt-4o", True, 300)
    unbounded = OPENAI.call_info("chat", "/v1/chat/completions", {"model": "gpt-4o", "n": 3})
    assert (unbounded.max_output_tokens, unbounded.choices) == (None, 3)  # each may fill the window
    azure = OPENAI.call_info("chat", "/openai/deployments/prod-4o/chat/completions", {"max_tokens": 9})
    assert (azure.model, azure.max_output_tokens) == ("prod-4o", 9)
    assert OPENAI.call_info("responses", "/v1/responses", {"max_output_tokens": 7}).max_output_tokens == 7
    assert OPENAI.call_info("embeddings", "/v1/embeddings", {"model": "e"}).max_output_tokens == 0
    assert OPENAI.kind("GET", "/v1/responses") is None  # retrieving a response is not a call


def test_include_usage_is_added_to_chat_streams_only_when_absent() -> None:
    """stream_options.include_usage is added (keeping other options) unless the caller set it."""
    plan = plan_call(OPENAI, "chat", "openai", "/v1/chat/completions", b'{"model":"m","stream":true}',
                     include_stream_usage=True, media_allowance=0)  # fmt: skip
    assert plan.rewritten is not None and json.loads(plan.rewritten)["stream_options"] == {
        "include_usage": True
    }
    kept = b'{"model":"m","stream":true,"stream_options":{"include_obfuscation":false}}'
    plan = plan_call(OPENAI, "chat", "openai", "/", kept, include_stream_usage=True, media_allowance=0)
    assert plan.rewritten is not None
    assert json.loads(plan.rewritten)["stream_options"] == {
        "include_obfuscation": False,
        "include_usage": True,
    }
    refused = b'{"model":"m","stream":true,"stream_options":{"include_usage":false}}'
    assert (
        plan_call(
            OPENAI, "chat", "openai", "/", refused, include_stream_usage=True, media_allowance=0
        ).rewritten
        is None
    )
    off = b'{"model":"m","stream":true}'
    assert (
        plan_call(OPENAI, "chat", "openai", "/", off, include_stream_usage=False, media_allowance=0).rewritten
        is None
    )


# -- Anthropic ---------------------------------------------------------------------------------------


def test_anthropic_input_adds_cache_reads_and_writes_and_keeps_the_1h_part() -> None:
    """Anthropic's input_tokens excludes cache tokens: they are added in; 1h writes kept apart."""
    usage = {
        "input_tokens": 10, "cache_creation_input_tokens": 300, "cache_read_input_tokens": 2000,
        "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
        "output_tokens": 50, "output_tokens_details": {"thinking_tokens": 30}, "service_tier": "priority",
    }  # fmt: skip
    body = {"id": "msg_1", "model": "claude-sonnet-4-5-20250929", "usage": usage}
    assert ANTHROPIC.outcome("messages", body) == Outcome(
        Usage(input_tokens=2310, output_tokens=50, cache_read_tokens=2000, cache_write_tokens=300,
              cache_write_1h_tokens=200, reasoning_tokens=30),
        "claude-sonnet-4-5-20250929", "msg_1", "priority",
    )  # fmt: skip


def test_anthropic_stream_last_message_delta_wins() -> None:
    """message_start gives input and cache counts; the LAST cumulative message_delta gives output."""
    start = {
        "type": "message_start",
        "message": {
            "id": "m1",
            "model": "claude-x",
            "usage": {
                "input_tokens": 10,
                "cache_read_input_tokens": 5,
                "cache_creation_input_tokens": 0,
                "output_tokens": 1,
            },
        },
    }
    delta1 = {"type": "message_delta", "usage": {"output_tokens": 7}}
    delta2 = {"type": "message_delta", "usage": {"output_tokens": 40, "input_tokens": 12,
                                                  "cache_read_input_tokens": None}}  # fmt: skip
    events = (
        "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in (start, delta1, delta2))
        + 'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    assert stream(ANTHROPIC, "messages", events.encode()) == Outcome(
        Usage(input_tokens=17, output_tokens=40, cache_read_tokens=5), "claude-x", "m1"
    )
    only_start = f"event: message_start\ndata: {json.dumps(start)}\n\n".encode()
    assert stream(ANTHROPIC, "messages", only_start) == Outcome(None, "claude-x", "m1")


def test_anthropic_routes_messages_but_not_count_tokens_or_batches() -> None:
    """Only POST .../messages is a billed call."""
    assert ANTHROPIC.kind("POST", "/v1/messages") == "messages"
    assert ANTHROPIC.kind("POST", "/v1/messages/count_tokens") is None
    assert ANTHROPIC.kind("POST", "/v1/messages/batches") is None


# -- Gemini ------------------------------------------------------------------------------------------


def test_gemini_thoughts_are_output_and_tool_prompt_is_input() -> None:
    """candidates + thoughts = output (thoughts = reasoning); toolUsePrompt is input; cached is a subset."""
    body = {"modelVersion": "gemini-2.5-pro", "responseId": "r", "usageMetadata": {
        "promptTokenCount": 100, "cachedContentTokenCount": 40, "candidatesTokenCount": 20,
        "thoughtsTokenCount": 30, "toolUsePromptTokenCount": 5}}  # fmt: skip
    assert GEMINI.outcome("generate", body) == Outcome(
        Usage(input_tokens=105, output_tokens=50, cache_read_tokens=40, reasoning_tokens=30),
        "gemini-2.5-pro",
        "r",
    )


@pytest.mark.parametrize(
    "metadata",
    [{}, {"totalTokenCount": 120}, {"promptTokenCount": None, "candidatesTokenCount": 20}],
    ids=["empty", "total only", "no prompt count"],
)
def test_gemini_usage_without_a_prompt_count_is_unknown_never_zero(metadata: dict[str, object]) -> None:
    """As for the other providers: usage without its input count is unknown (NULL cost), not $0."""
    body = {"modelVersion": "gemini-2.5-pro", "responseId": "r", "usageMetadata": metadata}
    assert GEMINI.outcome("generate", body) == Outcome(None, "gemini-2.5-pro", "r")


_NOT_COUNTS = {
    "openai-output": (OPENAI, "chat", {"prompt_tokens": 10, "completion_tokens": "BAD"}),
    "openai-cached": (OPENAI, "chat", {
        "prompt_tokens": 10, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": "BAD"}}),
    "responses-reasoning": (OPENAI, "responses", {
        "input_tokens": 10, "output_tokens": 2, "output_tokens_details": {"reasoning_tokens": "BAD"}}),
    "anthropic-output": (ANTHROPIC, "messages", {"input_tokens": 10, "output_tokens": "BAD"}),
    "anthropic-1h": (ANTHROPIC, "messages", {
        "input_tokens": 10, "output_tokens": 2, "cache_creation": {"ephemeral_1h_input_tokens": "BAD"}}),
    "gemini-thoughts": (GEMINI, "generate", {
        "promptTokenCount": 10, "candidatesTokenCount": 2, "thoughtsTokenCount": "BAD"}),
}  # fmt: skip


@pytest.mark.parametrize(
    "bad", [5.0, -5, "5", [5], True], ids=["float", "negative", "string", "list", "bool"]
)
@pytest.mark.parametrize(("adapter", "kind", "usage"), _NOT_COUNTS.values(), ids=_NOT_COUNTS)
def test_a_count_that_is_not_a_count_makes_the_usage_unknown_never_cheaper(
    adapter: Any, kind: str, usage: dict[str, Any], bad: object, caplog: pytest.LogCaptureFixture
) -> None:
    """A token count that is a float, a string, a negative number (or anything but an int, or null
    for an absent one) makes the call's usage unknown (NULL cost), as a missing input count does:
    read as 0 it would record a cheaper call than the one billed. The model and id are kept."""
    if adapter is GEMINI:
        body = {"modelVersion": "m", "responseId": "r", "usageMetadata": usage}
    else:
        body = {"model": "m", "id": "r", "usage": usage}
    payload = json.loads(json.dumps(body).replace('"BAD"', json.dumps(bad)))
    assert adapter.outcome(kind, payload) == Outcome(None, "m", "r")
    assert "reported a token count that is not one; usage unknown" in caplog.text


@pytest.mark.parametrize(
    "text",
    ["gpt\x00-4o", "\ud800", "", "   ", "m" * 201, 5],
    ids=["nul", "surrogate", "empty", "blank", "long", "int"],
)
def test_a_model_or_id_the_database_cannot_store_is_left_out(text: object) -> None:
    """NUL and lone surrogates (which no database stores: the write was set aside, the call lost
    from the ledger), empty, blank, too long or not text: left out, so the request's model and no
    response id are recorded."""
    body = {"model": text, "id": text, "usage": {"prompt_tokens": 10, "completion_tokens": 2}}
    assert OPENAI.outcome("chat", body) == Outcome(Usage(input_tokens=10, output_tokens=2))
    body = {
        "model": "ok",
        "id": "ré",
        "service_tier": text,
        "usage": {"prompt_tokens": 10, "completion_tokens": 2},
    }
    assert OPENAI.outcome("chat", body) == Outcome(Usage(input_tokens=10, output_tokens=2), "ok", "ré")


def test_gemini_stream_takes_the_last_chunk_never_a_sum() -> None:
    """The last chunk's usageMetadata is the total; a stream without a finishReason has none."""
    first = {"candidates": [{"content": {}}], "usageMetadata": {"promptTokenCount": 9}, "modelVersion": "g"}
    last = {"candidates": [{"finishReason": "STOP"}], "modelVersion": "g",
            "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 4}}  # fmt: skip
    both = f"data: {json.dumps(first)}\r\n\r\ndata: {json.dumps(last)}\r\n\r\n".encode()
    assert stream(GEMINI, "generate", both).usage == Usage(input_tokens=9, output_tokens=4)
    cut = f"data: {json.dumps(first)}\r\n\r\n".encode()
    assert stream(GEMINI, "generate", cut) == Outcome(None, "g")


def test_gemini_model_and_stream_come_from_the_path() -> None:
    """models/<m>:streamGenerateContent names the model and streams; Vertex paths too."""
    path = "/v1/projects/p/locations/us/publishers/google/models/gemini-2.0-flash:streamGenerateContent"
    assert GEMINI.kind("POST", path) == "generate"
    info = GEMINI.call_info(
        "generate", path, {"generationConfig": {"maxOutputTokens": 10, "candidateCount": 2}}
    )
    assert (info.model, info.stream, info.max_output_tokens) == ("gemini-2.0-flash", True, 20)
    unbounded = GEMINI.call_info("generate", path, {"generationConfig": {"candidateCount": 4}})
    assert (unbounded.max_output_tokens, unbounded.choices) == (None, 4)
    assert GEMINI.kind("POST", "/v1beta/models/gemini-2.0-flash:countTokens") is None


# -- Preflight bound and routes ----------------------------------------------------------------------


def test_input_bound_is_the_body_bytes_with_allowances_for_tools_and_media() -> None:
    """UTF-8 JSON bytes bound the text; tools add an allowance; a media part counts as the allowance."""
    text = {"model": "m", "messages": [{"role": "user", "content": "héllo wörld"}]}
    raw = json.dumps(text, ensure_ascii=False).encode()
    assert input_bound(raw, text, MEDIA_ALLOWANCE) == len(raw) + 16
    tools = {**text, "tools": [{"type": "function", "function": {"name": "f"}}]}
    raw_tools = json.dumps(tools).encode()
    assert input_bound(raw_tools, tools, MEDIA_ALLOWANCE) == len(raw_tools) + 16 + TOOLS_ALLOWANCE
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 100_000}}
    media = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}]}
    raw_media = json.dumps(media).encode()
    bound = input_bound(raw_media, media, 500)
    assert bound < 1_000 and bound >= len(raw_media) - 100_000 + 500 - 200


_BLOB = "QUJD" * 5_000  # 20 kB of base64: far more bytes than the allowance


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _BLOB}},  # OpenAI chat
        {"type": "input_audio", "input_audio": {"data": _BLOB, "format": "wav"}},
        {"type": "file", "file": {"file_data": _BLOB}},
        {"type": "input_image", "image_url": "data:image/png;base64," + _BLOB},  # Responses
        {"type": "input_file", "file_data": _BLOB},
        {"type": "image", "source": {"type": "base64", "data": _BLOB}},  # Anthropic
        {"type": "document", "source": {"type": "base64", "data": _BLOB}},
        {"inlineData": {"mimeType": "image/png", "data": _BLOB}},  # Gemini
        {"inline_data": {"mime_type": "image/png", "data": _BLOB}},
        {"fileData": {"fileUri": "gs://b/" + _BLOB}},
        {"file_data": {"file_uri": "gs://b/" + _BLOB}},
    ],
)
@pytest.mark.parametrize("indent", [None, 2])
def test_every_media_shape_counts_as_the_allowance(part: dict[str, object], indent: int | None) -> None:
    """Each provider's media part, compact or pretty-printed, counts as the allowance, not its bytes:
    its strings' characters come off (the quotes, colons and braces around them stay counted)."""
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}]}
    raw = json.dumps(body, indent=indent).encode()
    part_bytes = len(json.dumps(part, separators=(",", ":")).encode())
    bound = input_bound(raw, body, 500)
    assert len(raw) + 16 + 500 - part_bytes < bound <= len(raw) + 16 + 500 - part_bytes + 40


def test_media_in_a_long_body_is_found_without_searching_its_bytes() -> None:
    """A body past the searched size is walked: its media parts count, text full of quotes does not."""
    quoted = 'say "yes" or "no", "image" or "file" ' * 3_000
    text = {"model": "m", "messages": [{"role": "user", "content": quoted}]}
    raw = json.dumps(text).encode()
    assert input_bound(raw, text, 500) == len(raw) + 16
    parts = [{"type": "text", "text": quoted}, {"type": "input_image", "image_url": "data:," + _BLOB}] * 3
    media = {"model": "m", "input": [{"role": "user", "content": parts}]}
    raw = json.dumps(media, ensure_ascii=False).encode()
    image_characters = len("type") + len("input_image") + len("image_url") + len("data:," + _BLOB)
    assert input_bound(raw, media, 500) == len(raw) + 16 + 3 * (500 - image_characters)


@pytest.mark.parametrize("size", [200, 3_000])  # searched, then walked; walked at once
def test_a_tool_schema_whose_type_is_a_list_or_an_object_is_no_media(size: int) -> None:
    """JSON schemas use "type" for a list of types, and may name a property "type": no error, no media."""
    schema = {
        "type": "object",
        "properties": {"type": {"type": ["string", "null"], "description": "image or file"}, "x": {}},
    }
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * size}], "tools": tools}
    raw = json.dumps(body).encode()
    assert input_bound(raw, body, 500) == len(raw) + 16 + TOOLS_ALLOWANCE


def test_the_input_bound_never_falls_below_the_text_bytes() -> None:
    """Characters that take several bytes (escapes, emoji, accents) keep a media part's subtraction
    below its bytes: what remains still bounds the text around it."""
    part = {"type": "image", "source": {"type": "base64", "data": 'é\\n"😀' * 2_000}}
    content = [{"type": "text", "text": "x" * 5_000}, part]
    body = {"model": "m", "messages": [{"role": "user", "content": content}]}
    for ensure_ascii in (True, False):
        raw = json.dumps(body, ensure_ascii=ensure_ascii).encode()
        part_bytes = len(json.dumps(part, ensure_ascii=ensure_ascii).encode())
        assert input_bound(raw, body, 0) >= len(raw) - part_bytes + 16 >= 5_000


def test_resolve_route_builtin_and_configured_hosts() -> None:
    """Official hosts are built in; configured hosts (exact, host:port, *.suffix) pick adapter and id."""
    providers = {
        "openrouter.ai": "openai-compatible", "*.openai.azure.com": "openai-compatible",
        "localhost:8000": "openai-compatible:vllm", "proxy.internal": "anthropic", "api.openai.com": "ignore",
    }  # fmt: skip
    route = resolve_route(providers, "https://openrouter.ai/api/v1/chat/completions")
    assert route is not None and route[1] == "openrouter" and route[0] is OPENAI
    assert resolve_route(providers, "https://eu.openai.azure.com/openai/deployments/x/chat/completions") == (
        OPENAI,
        "azure",
    )
    assert resolve_route(providers, "http://localhost:8000/v1/chat/completions") == (OPENAI, "vllm")
    assert resolve_route(providers, "http://localhost:9000/v1/chat/completions") is None
    assert resolve_route(providers, "https://proxy.internal/v1/messages") == (ANTHROPIC, "anthropic")
    assert resolve_route(providers, "https://api.openai.com/v1/chat/completions") is None
    assert resolve_route(
        None, "https://generativelanguage.googleapis.com/v1beta/models/g:generateContent"
    ) == (GEMINI, "google")
    assert resolve_route(None, "https://example.com/v1/chat/completions") is None
    assert provider_from_host("my-vllm.lan") == "my-vllm.lan"


@pytest.mark.parametrize(
    "providers",
    [{"x.ai": "bogus"}, {"x.ai": 3}, {"https://x.ai/v1": "openai"}, {"x.ai": "openai:" + "p" * 65}],
)
def test_bad_provider_configuration_is_refused_at_construction(providers: dict[str, object]) -> None:
    """A wrong mapping fails when the options are built, naming the key, not at request time."""
    with pytest.raises(ValueError, match="providers"):
        CaptureOptions(providers=providers)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("adapter", "kind", "usage"),
    [
        (OPENAI, "chat", {"prompt_tokens": 10, "completion_tokens": None}),
        (OPENAI, "chat", {"prompt_tokens": 10}),
        (OPENAI, "responses", {"input_tokens": 10, "output_tokens": None}),
        (ANTHROPIC, "messages", {"input_tokens": 10, "output_tokens": None}),
        (ANTHROPIC, "messages", {"input_tokens": 10}),
    ],
    ids=["chat-null", "chat-missing", "responses-null", "anthropic-null", "anthropic-missing"],
)
def test_an_answer_without_its_output_count_has_unknown_usage(
    adapter: Any, kind: str, usage: dict[str, Any]
) -> None:
    """Read as 0, a missing or null output count recorded a cheaper call than the one billed. (An
    embeddings answer has none: its output is 0.)"""
    assert adapter.outcome(kind, {"model": "m", "id": "r", "usage": usage}) == Outcome(None, "m", "r")
    embeddings = OPENAI.outcome(
        "embeddings", {"model": "m", "usage": {"prompt_tokens": 10, "total_tokens": 10}}
    )
    assert embeddings.usage == Usage(input_tokens=10)


def test_an_anthropic_stream_whose_last_delta_has_no_output_count_has_unknown_usage() -> None:
    """message_start's output count (1) is a placeholder: the totals are the last delta's."""
    start = {"type": "message_start", "message": {"id": "m1", "model": "claude-sonnet-4-6",
             "usage": {"input_tokens": 10, "output_tokens": 1}}}  # fmt: skip
    delta = {"type": "message_delta", "usage": {"output_tokens": None}}
    body = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in (start, delta)).encode()
    assert stream(ANTHROPIC, "messages", body) == Outcome(None, "claude-sonnet-4-6", "m1")


def test_an_anthropic_null_cache_write_total_takes_its_breakdown() -> None:
    """`cache_creation_input_tokens: null` beside a breakdown is read from the breakdown, as when
    the total is absent (it was read as 0: input 10 instead of 1,010)."""
    usage = {"input_tokens": 10, "output_tokens": 2, "cache_creation_input_tokens": None,
             "cache_creation": {"ephemeral_1h_input_tokens": 1000}}  # fmt: skip
    found = ANTHROPIC.outcome("messages", {"model": "m", "id": "r", "usage": usage}).usage
    assert found == Usage(
        input_tokens=1010, output_tokens=2, cache_write_tokens=1000, cache_write_1h_tokens=1000
    )


def test_an_answer_claiming_the_batch_tier_is_priced_as_the_live_call_it_is() -> None:
    """ "batch" priced a call at Batch API rates (half); a call through the transport is live."""
    body = {
        "model": "m",
        "id": "r",
        "service_tier": "batch",
        "usage": {"prompt_tokens": 10, "completion_tokens": 2},
    }
    assert OPENAI.outcome("chat", body).service_tier is None
    assert OPENAI.outcome("chat", {**body, "service_tier": "flex"}).service_tier == "flex"
