"""OpenAI (and OpenAI-compatible) shapes: chat completions, responses, embeddings.

Usage, into the canonical convention:

- chat: ``prompt_tokens`` already includes ``prompt_tokens_details.cached_tokens`` (cache reads) and
  ``cache_write_tokens``; ``completion_tokens`` includes ``completion_tokens_details.reasoning_tokens``.
  DeepSeek's ``prompt_cache_hit_tokens`` stands in for ``cached_tokens`` when that is absent.
- responses: ``input_tokens`` with ``input_tokens_details.cached_tokens`` / ``cache_write_tokens``,
  ``output_tokens`` with ``output_tokens_details.reasoning_tokens``.
- embeddings: ``prompt_tokens`` is all there is.

Streams. Chat completions report usage only when the request sets ``stream_options.include_usage``;
the transport adds it when absent (``include_stream_usage=True``), so the stream then ends with one
extra chunk whose ``choices`` list is EMPTY and whose ``usage`` holds the totals (code that reads
``chunk.choices[0]`` on every chunk must skip it). Every other chunk has ``"usage": null`` and is not
decoded. Responses streams end with ``response.completed``, ``response.incomplete`` or
``response.failed``, whose ``response.usage`` holds the totals.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypedDict

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

__all__ = ["ADAPTER", "OpenAIAdapter"]

_KINDS = (("/chat/completions", "chat"), ("/responses", "responses"), ("/embeddings", "embeddings"))
_DEPLOYMENT = re.compile(r"/deployments/([^/]+)/")
_TERMINAL = frozenset((b"response.completed", b"response.incomplete", b"response.failed"))
_USAGE = b'"usage":'
_NO_USAGE = b'"usage":null}'


class _InputDetails(TypedDict, total=False):
    cached_tokens: Count
    cache_write_tokens: Count


class _OutputDetails(TypedDict, total=False):
    reasoning_tokens: Count


class _Usage(TypedDict, total=False):
    prompt_tokens: Count
    completion_tokens: Count
    prompt_cache_hit_tokens: Count
    prompt_tokens_details: _InputDetails | None
    completion_tokens_details: _OutputDetails | None
    input_tokens: Count
    output_tokens: Count
    input_tokens_details: _InputDetails | None
    output_tokens_details: _OutputDetails | None


class _Response(TypedDict, total=False):
    """What `OpenAIAdapter.outcome` reads of a response (chat, responses, embeddings)."""

    id: Text
    model: Text
    service_tier: Text
    usage: _Usage | None


class OpenAIAdapter:
    """Chat completions, responses and embeddings, on api.openai.com or an OpenAI-compatible host."""

    name = "openai"
    default_provider = "openai"
    response_view: View = view(_Response)

    def kind(self, method: str, path: str) -> str | None:
        if method != "POST":
            return None
        for suffix, kind in _KINDS:
            if path.endswith(suffix):
                return kind
        return None

    def call_info(self, kind: str, path: str, body: Mapping[str, Any]) -> CallInfo:
        model = text(body.get("model"))
        if model is None and (deployment := _DEPLOYMENT.search(path)) is not None:
            model = text(deployment.group(1))  # Azure OpenAI names the deployment in the path
        if kind == "embeddings":
            return CallInfo(model, False, 0)
        if kind == "chat":
            most = limit(body.get("max_completion_tokens"))
            if most is None:
                most = limit(body.get("max_tokens"))
            choices = body.get("n")
            if type(choices) is int and choices > 1:
                if most is None:
                    return CallInfo(model, body.get("stream") is True, None, choices)
                most *= choices
        else:
            most = limit(body.get("max_output_tokens"))
        return CallInfo(model, body.get("stream") is True, most)

    def with_stream_usage(self, kind: str, body: dict[str, Any]) -> bool:
        if kind != "chat" or body.get("stream") is not True:
            return False
        options = body.get("stream_options")
        if isinstance(options, dict):
            if "include_usage" in options:
                return False  # the caller decided, either way
            body["stream_options"] = {**options, "include_usage": True}
        else:
            body["stream_options"] = {"include_usage": True}
        return True

    def set_max_output(self, kind: str, body: dict[str, Any], tokens: int) -> bool:
        if kind == "embeddings":
            return False
        if kind == "responses":
            body["max_output_tokens"] = tokens
            return True
        choices = body.get("n")
        per_choice = tokens // choices if type(choices) is int and choices > 1 else tokens
        key = "max_tokens" if "max_tokens" in body and "max_completion_tokens" not in body else None
        body[key or "max_completion_tokens"] = per_choice
        return True

    def outcome(self, kind: str, body: Any) -> Outcome:
        if not isinstance(body, dict):
            return Outcome()
        usage = body.get("usage")
        return make_outcome(
            _usage(kind, usage) if isinstance(usage, dict) else None,
            body.get("model"),
            body.get("id"),
            body.get("service_tier"),
        )

    def accumulator(self, kind: str) -> ChatStream | ResponsesStream:
        return ResponsesStream() if kind == "responses" else ChatStream()


class ChatStream:
    """A chat completions stream: the last chunk with a non-null usage, else the first chunk's ids."""

    __slots__ = ("_first", "_usage")

    def __init__(self) -> None:
        self._first = b""
        self._usage = b""

    def __call__(self, event: bytes, data: bytes) -> None:
        if not self._first and data[:1] == b"{":
            self._first = data
        if data[-13:] == _NO_USAGE:  # how OpenAI ends every chunk but the last (a slice: cheaper than rfind)
            return
        at = data.rfind(_USAGE)
        if at < 0 or data[at + 8 : at + 9] == b"n":  # no usage, or "usage":null (every chunk but the last)
            return
        if data[at + 8 : at + 24].lstrip(b" \t\r\n")[:1] == b"{":
            self._usage = data

    def outcome(self) -> Outcome:
        return ADAPTER.outcome("chat", load_json(self._usage or self._first))


class ResponsesStream:
    """A responses stream: the terminal event's response, else the first event's response ids."""

    __slots__ = ("_first", "_last")

    def __init__(self) -> None:
        self._first = b""
        self._last = b""

    def __call__(self, event: bytes, data: bytes) -> None:
        if not event:  # a host that sends no `event:` lines: the type is the first field
            event = event_type(data)
        if event in _TERMINAL:
            self._last = data
        elif not self._first and event == b"response.created":
            self._first = data

    def outcome(self) -> Outcome:
        event = load_json(self._last or self._first)
        response = event.get("response") if isinstance(event, dict) else None
        return ADAPTER.outcome("responses", response)


_CHAT_KEYS = ("prompt_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details")
_RESPONSES_KEYS = ("input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details")


def _usage(kind: str, usage: Mapping[str, Any]) -> Usage | None:
    input_key, output_key, details_key, output_details_key = (
        _RESPONSES_KEYS if kind == "responses" else _CHAT_KEYS
    )
    input_tokens, output_tokens = usage.get(input_key), usage.get(output_key)
    if type(input_tokens) is not int or (type(output_tokens) is not int and kind != "embeddings"):
        if output_tokens is not None:
            not_counted("openai")
        return None  # a count to trust is missing: unknown usage, never a cheaper call
    details, output_details = usage.get(details_key), usage.get(output_details_key)
    cache_read = cache_write = reasoning = None
    if isinstance(details, dict):
        cache_read, cache_write = details.get("cached_tokens"), details.get("cache_write_tokens")
    if cache_read is None:
        cache_read = usage.get("prompt_cache_hit_tokens")  # DeepSeek
    if isinstance(output_details, dict):
        reasoning = output_details.get("reasoning_tokens")
    return make_usage(
        "openai",
        integer(input_tokens),
        integer(output_tokens),
        integer(cache_read),
        integer(cache_write),
        0,
        integer(reasoning),
    )


ADAPTER = OpenAIAdapter()
