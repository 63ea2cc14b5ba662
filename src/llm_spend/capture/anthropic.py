"""Anthropic shapes: messages (beta messages too: same path, same payloads).

Usage, into the canonical convention: Anthropic's ``input_tokens`` EXCLUDES cache reads and cache
writes, so the canonical input is ``input_tokens + cache_creation_input_tokens +
cache_read_input_tokens``; cache writes are ``cache_creation_input_tokens``, of which
``cache_creation.ephemeral_1h_input_tokens`` were written with the 1-hour TTL (the rest with 5
minutes); ``output_tokens_details.thinking_tokens`` are the reasoning part of ``output_tokens``; the
service tier is ``usage.service_tier``.

Streams: ``message_start`` carries the input and cache counts (and an initial ``output_tokens``), each
``message_delta`` carries CUMULATIVE counts, ``output_tokens`` always and input/cache fields when they
changed; the LAST delta's values win over ``message_start``'s. A stream that ends before any
``message_delta`` has no final usage.

Budget errors through the SDK: anthropic wraps an exception raised by the HTTP transport in
``anthropic.APIConnectionError`` and RETRIES it (``max_retries``, 2 by default). A refused preflight
therefore surfaces as ``APIConnectionError`` whose ``__cause__`` is the `BudgetExceeded`, after every
attempt was refused (the provider is never reached). Add `budget_middleware` (sync clients) or
`async_budget_middleware` (async clients) to the client's ``middleware=[...]`` to get the
`BudgetExceeded` itself at once, with no retry.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypedDict, TypeVar

from ..exceptions import spend_error
from ..usage import Usage
from .base import (
    CallInfo,
    Count,
    Outcome,
    Text,
    View,
    event_type,
    integer,
    limit,
    load_json,
    make_outcome,
    make_usage,
    not_counted,
    text,
    view,
)

__all__ = ["ADAPTER", "AnthropicAdapter", "async_budget_middleware", "budget_middleware", "spend_error"]

_R = TypeVar("_R")


class _CacheCreation(TypedDict, total=False):
    ephemeral_1h_input_tokens: Count
    ephemeral_5m_input_tokens: Count


class _OutputDetails(TypedDict, total=False):
    thinking_tokens: Count


class _Usage(TypedDict, total=False):
    input_tokens: Count
    output_tokens: Count
    cache_read_input_tokens: Count
    cache_creation_input_tokens: Count
    cache_creation: _CacheCreation | None
    output_tokens_details: _OutputDetails | None
    service_tier: Text


class _Message(TypedDict, total=False):
    """What `AnthropicAdapter.outcome` reads of a response."""

    id: Text
    model: Text
    usage: _Usage | None


class AnthropicAdapter:
    """The messages API."""

    name = "anthropic"
    default_provider = "anthropic"
    response_view: View = view(_Message)

    def kind(self, method: str, path: str) -> str | None:
        return "messages" if method == "POST" and path.endswith("/messages") else None

    def call_info(self, kind: str, path: str, body: Mapping[str, Any]) -> CallInfo:
        return CallInfo(text(body.get("model")), body.get("stream") is True, limit(body.get("max_tokens")))

    def with_stream_usage(self, kind: str, body: dict[str, Any]) -> bool:
        return False  # message_start and message_delta always carry usage

    def set_max_output(self, kind: str, body: dict[str, Any], tokens: int) -> bool:
        thinking = body.get("thinking")
        budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
        if type(budget) is int and budget >= tokens:
            return False  # the thinking budget must stay below max_tokens
        body["max_tokens"] = tokens
        return True

    def outcome(self, kind: str, body: Any) -> Outcome:
        if not isinstance(body, dict):
            return Outcome()
        usage = body.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        return make_outcome(
            _usage(usage) if usage else None, body.get("model"), body.get("id"), usage.get("service_tier")
        )

    def accumulator(self, kind: str) -> MessagesStream:
        return MessagesStream()


class MessagesStream:
    """message_start's message, its usage updated by the last message_delta's."""

    __slots__ = ("_delta", "_start")

    def __init__(self) -> None:
        self._start = b""
        self._delta = b""

    def __call__(self, event: bytes, data: bytes) -> None:
        if not event:  # a proxy that drops `event:` lines: the type is the first field
            event = event_type(data)
        if event == b"message_delta":
            self._delta = data
        elif event == b"message_start":
            self._start = data

    def outcome(self) -> Outcome:
        start = load_json(self._start) if self._start else None
        message = start.get("message") if isinstance(start, dict) else None
        message = message if isinstance(message, dict) else {}
        delta = load_json(self._delta) if self._delta else None
        delta_usage = delta.get("usage") if isinstance(delta, dict) else None
        if not isinstance(delta_usage, dict) or type(delta_usage.get("output_tokens")) is not int:
            # cut short before the totals, or they lack the output (message_start's is a placeholder)
            return Outcome(None, text(message.get("model")), text(message.get("id")))
        usage = message.get("usage")
        merged = dict(usage) if isinstance(usage, dict) else {}
        merged.update((key, value) for key, value in delta_usage.items() if value is not None)
        return ADAPTER.outcome(kind="messages", body={**message, "usage": merged})


def _usage(usage: Mapping[str, Any]) -> Usage | None:
    if type(usage.get("input_tokens")) is not int or type(usage.get("output_tokens")) is not int:
        if usage.get("output_tokens") is not None:
            not_counted("anthropic")
        return None  # a count to trust is missing: unknown usage, never a cheaper call
    cache_read = integer(usage.get("cache_read_input_tokens"))
    creation = usage.get("cache_creation")
    creation = creation if isinstance(creation, dict) else {}
    write_1h = integer(creation.get("ephemeral_1h_input_tokens"))
    if usage.get("cache_creation_input_tokens") is not None:
        cache_write = integer(usage.get("cache_creation_input_tokens"))
    else:
        cache_write = write_1h + integer(creation.get("ephemeral_5m_input_tokens"))
    details = usage.get("output_tokens_details")
    thinking = details.get("thinking_tokens") if isinstance(details, dict) else 0
    return make_usage(
        "anthropic",
        input_tokens=integer(usage.get("input_tokens")) + cache_read + cache_write,
        output_tokens=integer(usage.get("output_tokens")),
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        cache_write_1h_tokens=min(write_1h, cache_write),
        reasoning_tokens=integer(thinking),
    )


def budget_middleware(request: Any, call_next: Callable[[Any], _R]) -> _R:
    """anthropic middleware (sync clients): raise llm-spend errors as they are, without retries.

    ``anthropic.Anthropic(http_client=tracker.httpx_sync_client(), middleware=[budget_middleware])``
    """
    try:
        return call_next(request)
    except Exception as error:
        found = spend_error(error)
        if found is None or found is error:
            raise
        raise found from None


async def async_budget_middleware(request: Any, call_next: Callable[[Any], Awaitable[_R]]) -> _R:
    """anthropic middleware (async clients): raise llm-spend errors as they are, without retries.

    ``anthropic.AsyncAnthropic(http_client=tracker.httpx_client(), middleware=[async_budget_middleware])``
    """
    try:
        return await call_next(request)
    except Exception as error:
        found = spend_error(error)
        if found is None or found is error:
            raise
        raise found from None


ADAPTER = AnthropicAdapter()
