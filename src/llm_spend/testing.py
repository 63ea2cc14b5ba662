"""Test helpers for llm-spend users: a fake LLM provider to run your code offline.

`FakeProviderTransport` is an httpx2 (or, with ``package="httpx"``, an httpx) transport, sync and
async, that answers like OpenAI (chat completions, responses, embeddings), Anthropic (messages) and
Gemini (generateContent, streamGenerateContent with alt=sse), in JSON or as SSE streams, with the
usage you give it. Use it as the inner transport of the capturing client::

    fake = FakeProviderTransport(usage=Usage(input_tokens=1200, output_tokens=300))
    client = openai.AsyncOpenAI(api_key="test", http_client=tracker.httpx_client(transport=fake))
    await client.chat.completions.create(model="gpt-4o-mini", messages=[...])
    assert fake.calls == 1          # 0 when a budget refused the call before it went out

`usage` is given in llm-spend's canonical convention (input includes cache reads and writes, output
includes reasoning) and rendered in each provider's own shape (Anthropic's input without its cache
tokens, Gemini's thoughts apart from candidates). `usage=None` sends payloads without usage.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import importlib
import itertools
import json
import math
import struct
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .usage import Usage

__all__ = ["FakeProviderTransport", "FakeRequest"]


@dataclass(frozen=True, slots=True)
class FakeRequest:
    """A request the fake provider received."""

    provider: str
    """"openai", "anthropic", "gemini", or "unknown" (answered 404)."""
    path: str
    json: Any
    """The parsed request body (None when it was not JSON)."""


class FakeProviderTransport:
    """A fake OpenAI / Anthropic / Gemini API, as an httpx2 or httpx transport (sync and async)."""

    def __new__(cls, *args: Any, package: str = "httpx2", **kwargs: Any) -> FakeProviderTransport:
        instance: FakeProviderTransport = object.__new__(_bind(cls, package))
        return instance  # an instance of `cls` mixed with the package's base transports

    def __init__(
        self,
        *,
        package: str = "httpx2",
        usage: Usage | None = Usage(input_tokens=12, output_tokens=5),  # noqa: B008 - frozen
        model: str | None = None,
        text: str = "Hello from the fake provider.",
        chunk_size: int | None = None,
        statuses: Sequence[int] = (),
        truncate_after: int | None = None,
        delay: float = 0.0,
        service_tier: str | None = None,
    ) -> None:
        """
        usage: a `llm_spend.Usage` (a mapping is refused: build the Usage), or None for no usage.
        model: the model the responses name (default: the request's).
        text: the answer's text (streamed word by word).
        chunk_size: split the SSE byte stream into network chunks of this many bytes, at least 1
            (default: one chunk per event).
        statuses: the HTTP statuses (ints) of the first requests, in order (e.g. ``[429]`` then 200s):
            200 answers normally; 300 to 599 answer with that provider's error body. Other 1xx and 2xx
            statuses are refused, as the fake cannot answer them as a provider would.
        truncate_after: end streams after this many events (0 or more), before their final usage.
        delay: seconds (0 or more) to wait before each streamed chunk but the first (inside the body:
            a client's timeouts, which watch the network, never fire on it).
        service_tier: the service tier OpenAI's answers name (default: none, "default" in responses).

        Every option is checked here: a bad one raises ValueError naming it. Every request is kept in
        `requests` (parsed), for tests to look at: `requests.clear()` between the rounds of a long test
        keeps its memory flat.
        """
        if usage is not None and not isinstance(usage, Usage):
            raise ValueError(f"usage must be a llm_spend.Usage or None, got {usage!r}")
        for name, value in (("model", model), ("service_tier", service_tier)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string or None, got {value!r}")
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {text!r}")
        if chunk_size is not None and (type(chunk_size) is not int or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if truncate_after is not None and (type(truncate_after) is not int or truncate_after < 0):
            raise ValueError(f"truncate_after must be a non-negative int or None, got {truncate_after!r}")
        if isinstance(delay, bool) or not isinstance(delay, int | float) or not 0 <= delay < math.inf:
            raise ValueError(f"delay must be a finite non-negative number of seconds, got {delay!r}")
        self.usage = usage
        self.model = model
        self.text = text
        self.chunk_size = chunk_size
        self.truncate_after = truncate_after
        self.delay = delay
        self.service_tier = service_tier
        self.requests: list[FakeRequest] = []
        self._statuses = _statuses(statuses)
        self._module = importlib.import_module(package)
        self._ids = itertools.count(1)

    @property
    def calls(self) -> int:
        """How many requests reached the fake provider."""
        return len(self.requests)

    def handle_request(self, request: Any) -> Any:
        status, headers, chunks = self._answer(request.url.path, request.read())
        if len(chunks) > 1 or self.delay:
            return self._module.Response(status, headers=headers, content=self._slow(chunks))
        return self._module.Response(status, headers=headers, content=_body(chunks))

    async def handle_async_request(self, request: Any) -> Any:
        status, headers, chunks = self._answer(request.url.path, await request.aread())
        if len(chunks) > 1 or self.delay:
            return self._module.Response(status, headers=headers, content=self._aslow(chunks))
        return self._module.Response(status, headers=headers, content=_body(chunks))

    def _slow(self, chunks: list[bytes]) -> Iterator[bytes]:
        for index, chunk in enumerate(chunks):
            if index:
                time.sleep(self.delay)
            yield chunk

    async def _aslow(self, chunks: list[bytes]) -> AsyncIterator[bytes]:
        for index, chunk in enumerate(chunks):
            if index and self.delay:
                await asyncio.sleep(self.delay)
            yield chunk

    def _answer(self, path: str, raw: bytes) -> tuple[int, list[tuple[str, str]], list[bytes]]:
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        request = body if isinstance(body, dict) else {}
        provider, render = self._renderer(path)
        self.requests.append(FakeRequest(provider, path, body))
        try:  # one pop, not a check and a pop: clients in several threads share a fake
            status = self._statuses.pop(0)
        except IndexError:
            status = 404 if render is None else 200
        if render is None or status >= 300:
            headers = [("content-type", "application/json"), ("retry-after-ms", "1")]
            return status, headers, [_dumps(_error(provider, status))]
        model = self.model or _request_model(provider, path, request)
        stream = request.get("stream") is True or path.endswith(":streamGenerateContent")
        events = render(self, request, model, stream, f"fake{next(self._ids)}")
        if not stream:
            return 200, [("content-type", "application/json")], events
        if self.truncate_after is not None:
            events = events[: self.truncate_after]
        if self.chunk_size:
            joined = b"".join(events)
            events = [joined[i : i + self.chunk_size] for i in range(0, len(joined), self.chunk_size)]
        return 200, [("content-type", "text/event-stream; charset=utf-8")], events

    def _renderer(self, path: str) -> tuple[str, Any]:
        if path.endswith("/chat/completions"):
            return "openai", _openai_chat
        if path.endswith("/responses"):
            return "openai", _openai_responses
        if path.endswith("/embeddings"):
            return "openai", _openai_embeddings
        if path.endswith("/messages"):
            return "anthropic", _anthropic_messages
        if path.endswith((":generateContent", ":streamGenerateContent")):
            return "gemini", _gemini_generate
        return "unknown", None


def _statuses(statuses: object) -> list[int]:
    """`statuses` checked: a sequence of 200 or 300 to 599, the statuses the fake can answer."""
    if not isinstance(statuses, Sequence) or isinstance(statuses, str | bytes | bytearray):
        raise ValueError(f"statuses must be a sequence of HTTP statuses such as [429], got {statuses!r}")
    for status in statuses:
        if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
            raise ValueError(f"statuses must hold ints from 100 to 599, got {status!r} in {statuses!r}")
        if status < 300 and status != 200:
            raise ValueError(
                f"statuses: {status} cannot be answered; use 200 for a normal answer or 300 to 599 for an"
                f" error answer, got {statuses!r}"
            )
    return [int(status) for status in statuses]  # an HTTPStatus as its number


def _request_model(provider: str, path: str, request: dict[str, Any]) -> str:
    if provider == "gemini":
        return path.rpartition("/")[2].partition(":")[0]
    model = request.get("model")
    return model if isinstance(model, str) else "fake-model"


def _body(chunks: list[bytes]) -> bytes:
    return b"".join(chunks)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _sse(data: Any, event: str | None = None, newline: str = "\n") -> bytes:
    head = f"event: {event}{newline}" if event else ""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"{head}data: {payload}{newline}{newline}".encode()


_ERRORS: dict[int, tuple[str, str | None, str, str]] = {
    # status: OpenAI's error type and code, Anthropic's error type, Gemini's status
    400: ("invalid_request_error", None, "invalid_request_error", "INVALID_ARGUMENT"),
    401: ("invalid_request_error", "invalid_api_key", "authentication_error", "UNAUTHENTICATED"),
    403: ("invalid_request_error", None, "permission_error", "PERMISSION_DENIED"),
    404: ("invalid_request_error", "model_not_found", "not_found_error", "NOT_FOUND"),
    413: ("invalid_request_error", None, "request_too_large", "INVALID_ARGUMENT"),
    429: ("requests", "rate_limit_exceeded", "rate_limit_error", "RESOURCE_EXHAUSTED"),
    500: ("server_error", None, "api_error", "INTERNAL"),
    503: ("server_error", None, "overloaded_error", "UNAVAILABLE"),
    529: ("server_error", None, "overloaded_error", "UNAVAILABLE"),
}


def _error(provider: str, status: int) -> dict[str, Any]:
    """The error body each provider sends with `status` (so the SDKs' error fields are set as in
    production: `code`, `type`, `status`)."""
    kind, code, anthropic_kind, gemini_status = _ERRORS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None, "api_error", "UNKNOWN")
    )
    message = f"fake provider: status {status}"
    if provider == "anthropic":
        return {"type": "error", "error": {"type": anthropic_kind, "message": message}}
    if provider == "gemini":
        return {"error": {"code": status, "message": message, "status": gemini_status}}
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _words(text: str) -> list[str]:
    words = text.split(" ")
    return [word if i == 0 else " " + word for i, word in enumerate(words)] or [""]


# -- OpenAI ------------------------------------------------------------------------------------------


def openai_chat_usage(usage: Usage) -> dict[str, Any]:
    """`usage` as OpenAI's chat completions report it."""
    prompt: dict[str, int] = {"cached_tokens": usage.cache_read_tokens, "audio_tokens": 0}
    if usage.cache_write_tokens:
        prompt["cache_write_tokens"] = usage.cache_write_tokens
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": prompt,
        "completion_tokens_details": {
            "reasoning_tokens": usage.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def openai_responses_usage(usage: Usage) -> dict[str, Any]:
    """`usage` as OpenAI's responses API reports it."""
    return {
        "input_tokens": usage.input_tokens,
        "input_tokens_details": {
            "cached_tokens": usage.cache_read_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
        },
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.input_tokens + usage.output_tokens,
    }


def _openai_chat(
    fake: FakeProviderTransport, request: dict[str, Any], model: str, stream: bool, rid: str
) -> list[bytes]:
    head = {"id": f"chatcmpl-{rid}", "created": 1_700_000_000, "model": model}
    tier = {"service_tier": fake.service_tier} if fake.service_tier else {}
    if not stream:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": fake.text,
            "refusal": None,
            "annotations": [],
        }
        body = {
            **head, "object": "chat.completion", **tier, "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
        }  # fmt: skip
        if fake.usage is not None:
            body["usage"] = openai_chat_usage(fake.usage)
        return [_dumps(body)]
    options = request.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    chunk = {**head, "object": "chat.completion.chunk", **tier, "system_fingerprint": "fp_fake"}
    null_usage = {"usage": None} if include_usage else {}

    def delta(content: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}
        return _sse({**chunk, "choices": [choice], **null_usage})

    events = [delta({"role": "assistant", "content": "", "refusal": None})]
    events += [delta({"content": word}) for word in _words(fake.text)]
    events.append(delta({}, "stop"))
    if include_usage and fake.usage is not None:
        events.append(_sse({**chunk, "choices": [], "usage": openai_chat_usage(fake.usage)}))
    return [*events, _sse("[DONE]")]


def _openai_responses(
    fake: FakeProviderTransport, request: dict[str, Any], model: str, stream: bool, rid: str
) -> list[bytes]:
    item = {
        "type": "message", "id": f"msg_{rid}", "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": fake.text, "annotations": []}],
    }  # fmt: skip
    response: dict[str, Any] = {
        "id": f"resp_{rid}", "object": "response", "created_at": 1_700_000_000, "status": "completed",
        "model": model, "output": [item], "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
        "service_tier": fake.service_tier or "default",
        "usage": None if fake.usage is None else openai_responses_usage(fake.usage),
    }  # fmt: skip
    if not stream:
        return [_dumps(response)]
    # The events OpenAI sends, in its order: the SDK's `responses.stream()` builds the response from
    # the item and part events, and refuses a text delta before its item was added.
    created = {**response, "status": "in_progress", "output": [], "usage": None}
    opened = {**item, "status": "in_progress", "content": []}
    place = {"item_id": item["id"], "output_index": 0, "content_index": 0}
    part = {"type": "output_text", "text": fake.text, "annotations": []}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": created},
        {"type": "response.in_progress", "response": created},
        {"type": "response.output_item.added", "output_index": 0, "item": opened},
        {"type": "response.content_part.added", **place, "part": {**part, "text": ""}},
        *(
            {"type": "response.output_text.delta", **place, "delta": word, "logprobs": []}
            for word in _words(fake.text)
        ),
        {"type": "response.output_text.done", **place, "text": fake.text, "logprobs": []},
        {"type": "response.content_part.done", **place, "part": part},
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {"type": "response.completed", "response": response},
    ]
    return [_sse({**event, "sequence_number": number}, event["type"]) for number, event in enumerate(events)]


_EMBEDDING_SIZES = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}
"""The vector sizes of OpenAI's embedding models, when the request asks for no `dimensions`."""


def _openai_embeddings(
    fake: FakeProviderTransport, request: dict[str, Any], model: str, stream: bool, rid: str
) -> list[bytes]:
    inputs = request.get("input")
    count = len(inputs) if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else 1
    encoding = request.get("encoding_format")
    size = request.get("dimensions")
    if type(size) is not int or not 0 < size <= 8_192:
        size = _EMBEDDING_SIZES.get(model, 8)
    data = [{"object": "embedding", "index": i, "embedding": embedding(size, encoding)} for i in range(count)]
    body: dict[str, Any] = {"object": "list", "data": data, "model": model}
    if fake.usage is not None:
        body["usage"] = {"prompt_tokens": fake.usage.input_tokens, "total_tokens": fake.usage.input_tokens}
    return [_dumps(body)]


# -- Anthropic ---------------------------------------------------------------------------------------


def anthropic_usage(usage: Usage) -> dict[str, Any]:
    """`usage` as Anthropic reports it: input_tokens WITHOUT the cache reads and writes."""
    write_1h = usage.cache_write_1h_tokens
    reported: dict[str, Any] = {
        "input_tokens": usage.input_tokens - usage.cache_read_tokens - usage.cache_write_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens,
        "cache_read_input_tokens": usage.cache_read_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": usage.cache_write_tokens - write_1h,
            "ephemeral_1h_input_tokens": write_1h,
        },
        "output_tokens": usage.output_tokens,
        "service_tier": "standard",
    }
    if usage.reasoning_tokens:
        reported["output_tokens_details"] = {"thinking_tokens": usage.reasoning_tokens}
    return reported


def _anthropic_messages(
    fake: FakeProviderTransport, request: dict[str, Any], model: str, stream: bool, rid: str
) -> list[bytes]:
    usage = None if fake.usage is None else anthropic_usage(fake.usage)
    message: dict[str, Any] = {
        "id": f"msg_{rid}", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": fake.text}], "stop_reason": "end_turn", "stop_sequence": None,
    }  # fmt: skip
    if not stream:
        return [_dumps({**message, **({"usage": usage} if usage else {})})]
    start_usage = None if usage is None else {**usage, "output_tokens": 1}
    started = {**message, "content": [], "stop_reason": None, **({"usage": start_usage} if usage else {})}
    events = [
        _sse({"type": "message_start", "message": started}, "message_start"),
        _sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
             "content_block_start"),
        _sse({"type": "ping"}, "ping"),
    ]  # fmt: skip
    for word in _words(fake.text):
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}}
        events.append(_sse(delta, "content_block_delta"))
    events.append(_sse({"type": "content_block_stop", "index": 0}, "content_block_stop"))
    final: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
    }
    if usage is not None:
        keys = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens")
        final["usage"] = {key: usage[key] for key in keys}
    events.append(_sse(final, "message_delta"))
    return [*events, _sse({"type": "message_stop"}, "message_stop")]


# -- Gemini ------------------------------------------------------------------------------------------


def gemini_usage(usage: Usage, *, final: bool = True) -> dict[str, Any]:
    """`usage` as Gemini's usageMetadata: thoughts apart from candidates; an early chunk has no output."""
    reported: dict[str, Any] = {"promptTokenCount": usage.input_tokens}
    if usage.cache_read_tokens:
        reported["cachedContentTokenCount"] = usage.cache_read_tokens
    if final:
        reported["candidatesTokenCount"] = usage.output_tokens - usage.reasoning_tokens
        if usage.reasoning_tokens:
            reported["thoughtsTokenCount"] = usage.reasoning_tokens
    reported["totalTokenCount"] = usage.input_tokens + (usage.output_tokens if final else 0)
    reported["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": usage.input_tokens}]
    return reported


def _gemini_generate(
    fake: FakeProviderTransport, request: dict[str, Any], model: str, stream: bool, rid: str
) -> list[bytes]:
    def chunk(text: str, final: bool) -> dict[str, Any]:
        candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
        if final:
            candidate["finishReason"] = "STOP"
        body: dict[str, Any] = {"candidates": [candidate]}
        if fake.usage is not None:
            body["usageMetadata"] = gemini_usage(fake.usage, final=final)
        return {**body, "modelVersion": model, "responseId": f"resp-{rid}"}

    if not stream:
        return [_dumps(chunk(fake.text, True))]
    words = _words(fake.text)
    return [_sse(chunk(word, i == len(words) - 1), newline="\r\n") for i, word in enumerate(words)]


def embedding(dimensions: int = 8, encoding: str | None = "base64") -> Any:
    """A fake embedding vector, base64 float32 as the OpenAI SDK asks for, or a list."""
    values = [round(0.1 * (i + 1), 3) for i in range(dimensions)]
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{dimensions}f", *values)).decode()
    return values


def _bind(cls: type[FakeProviderTransport], package: str) -> type[FakeProviderTransport]:
    """`cls` mixed with the package's sync and async base transports (built once per package)."""
    if package not in ("httpx", "httpx2"):
        raise ValueError(f"package must be 'httpx' or 'httpx2', got {package!r}")
    if any((base.__module__ or "").partition(".")[0] == package for base in cls.__mro__):
        return cls  # mixed already
    return _mixed(package) if cls is FakeProviderTransport else _mix(cls, package)


@functools.cache
def _mixed(package: str) -> type[FakeProviderTransport]:
    return _mix(FakeProviderTransport, package)


def _mix(cls: type[FakeProviderTransport], package: str) -> type[FakeProviderTransport]:
    module = importlib.import_module(package)
    bases = (cls, module.BaseTransport, module.AsyncBaseTransport)
    mixed: type[FakeProviderTransport] = type(cls.__name__, bases, {"__module__": cls.__module__})
    return mixed
