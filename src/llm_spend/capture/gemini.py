"""Gemini shapes (Gemini API and Vertex AI): generateContent and streamGenerateContent with alt=sse.

Usage, into the canonical convention: ``promptTokenCount`` already includes
``cachedContentTokenCount`` (cache reads); ``toolUsePromptTokenCount`` is input too; output is
``candidatesTokenCount + thoughtsTokenCount`` and the thoughts are its reasoning part. The model is
the response's ``modelVersion``, the id its ``responseId``.

Streams: every chunk carries a ``usageMetadata``, and the LAST one holds the totals (chunks are never
added up). A stream that ends before a chunk with a ``finishReason`` (or a prompt ``blockReason``)
has no final usage. streamGenerateContent without ``alt=sse`` answers a JSON array, which is passed
through untapped and recorded with unknown usage.

google-genai does not wrap transport errors and does not retry them: `BudgetExceeded` reaches the
caller as it is.
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
    integer,
    limit,
    load_json,
    make_outcome,
    make_usage,
    text,
    view,
)

__all__ = ["ADAPTER", "GeminiAdapter"]

_PATH = re.compile(r"/(?:models|tunedModels)/([^/:]+):(generateContent|streamGenerateContent)$")
_USAGE = b'"usageMetadata"'
_FINAL = (b'"finishReason"', b'"blockReason"')
_REASON = b'Reason"'
"""In both keys above: one scan of each chunk finds neither, the common case."""


class _UsageMetadata(TypedDict, total=False):
    promptTokenCount: Count
    toolUsePromptTokenCount: Count
    candidatesTokenCount: Count
    thoughtsTokenCount: Count
    cachedContentTokenCount: Count


class _Response(TypedDict, total=False):
    """What `GeminiAdapter.outcome` reads of a response."""

    modelVersion: Text
    responseId: Text
    usageMetadata: _UsageMetadata | None


class GeminiAdapter:
    """generateContent and streamGenerateContent; the model is named in the path."""

    name = "gemini"
    default_provider = "google"
    response_view: View = view(_Response)

    def kind(self, method: str, path: str) -> str | None:
        if method != "POST" or not path.endswith("Content"):
            return None
        found = _PATH.search(path)
        return None if found is None else "generate"

    def call_info(self, kind: str, path: str, body: Mapping[str, Any]) -> CallInfo:
        found = _PATH.search(path)
        config = body.get("generationConfig", body.get("generation_config"))
        config = config if isinstance(config, dict) else {}
        most = limit(config.get("maxOutputTokens", config.get("max_output_tokens")))
        candidates = config.get("candidateCount", config.get("candidate_count"))
        choices = candidates if type(candidates) is int and candidates > 1 else 1
        if most is not None:
            most *= choices
        stream = found is not None and found.group(2) == "streamGenerateContent"
        return CallInfo(text(found.group(1)) if found else None, stream, most, choices)

    def with_stream_usage(self, kind: str, body: dict[str, Any]) -> bool:
        return False  # every chunk carries usageMetadata

    def set_max_output(self, kind: str, body: dict[str, Any], tokens: int) -> bool:
        key = "generation_config" if "generation_config" in body else "generationConfig"
        config = body.get(key)
        config = dict(config) if isinstance(config, dict) else {}
        candidates = config.get("candidateCount", config.get("candidate_count"))
        per_candidate = tokens // candidates if type(candidates) is int and candidates > 1 else tokens
        config.pop("max_output_tokens", None)
        config["maxOutputTokens"] = per_candidate
        body[key] = config
        return True

    def outcome(self, kind: str, body: Any) -> Outcome:
        if not isinstance(body, dict):
            return Outcome()
        usage = body.get("usageMetadata")
        return make_outcome(
            _usage(usage) if isinstance(usage, dict) else None,
            body.get("modelVersion"),
            body.get("responseId"),
            None,
        )

    def accumulator(self, kind: str) -> GenerateStream:
        return GenerateStream()


class GenerateStream:
    """The last chunk's usageMetadata, once a chunk said the generation finished."""

    __slots__ = ("_final", "_first", "_last")

    def __init__(self) -> None:
        self._first = b""
        self._last = b""
        self._final = False

    def __call__(self, event: bytes, data: bytes) -> None:
        # `rfind`, not `in` (for a bytes needle `in` goes through the buffer protocol, twice the
        # cost) nor `find`: both keys come late in a chunk, and a search for an absent one takes
        # rfind 150 ns here against 260 for `find` (CPython 3.11, a 325-byte chunk)
        if data.rfind(_USAGE) >= 0:
            self._last = data
        elif not self._first:
            self._first = data
        if not self._final and data.rfind(_REASON) >= 0 and (_FINAL[0] in data or _FINAL[1] in data):
            self._final = True

    def outcome(self) -> Outcome:
        found = ADAPTER.outcome("generate", load_json(self._last or self._first))
        if self._final:
            return found
        return Outcome(None, found.model, found.response_id)


def _usage(usage: Mapping[str, Any]) -> Usage | None:
    if type(usage.get("promptTokenCount")) is not int:
        return None  # no count to trust: unknown usage, never $0
    thoughts = integer(usage.get("thoughtsTokenCount"))
    return make_usage(
        "google",
        input_tokens=integer(usage.get("promptTokenCount")) + integer(usage.get("toolUsePromptTokenCount")),
        output_tokens=integer(usage.get("candidatesTokenCount")) + thoughts,
        cache_read_tokens=integer(usage.get("cachedContentTokenCount")),
        reasoning_tokens=thoughts,
    )


ADAPTER = GeminiAdapter()
