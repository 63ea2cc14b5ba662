"""Hostile provider payloads and streams: never an exception into the app, never a negative cost.

Hypothesis generates response bodies around each provider's usage block (wrong types, negative,
huge, float, missing, contradictory counts) and arbitrary SSE byte streams cut anywhere. Every
adapter must answer with a valid canonical Usage or with "no usage" (recorded as unknown usage).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_spend.capture import anthropic, gemini, openai
from llm_spend.capture.sse import SSEParser
from llm_spend.pricing import Pricer
from llm_spend.usage import MAX_TOKENS, Usage

ADAPTERS = {
    "openai": (openai.ADAPTER, ("chat", "responses", "embeddings"), "gpt-4o-mini"),
    "anthropic": (anthropic.ADAPTER, ("messages",), "claude-sonnet-4-6"),
    "gemini": (gemini.ADAPTER, ("generate",), "gemini-2.5-flash"),
}
PRICER = Pricer()
NOW = datetime(2026, 11, 23, tzinfo=UTC)

counts = st.one_of(
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.none(),
    st.booleans(),
    st.just(MAX_TOKENS + 1),
)
usage_keys = st.sampled_from(
    [
        "prompt_tokens", "completion_tokens", "total_tokens", "input_tokens", "output_tokens",
        "cache_creation_input_tokens", "cache_read_input_tokens", "promptTokenCount",
        "candidatesTokenCount", "thoughtsTokenCount", "cachedContentTokenCount", "toolUsePromptTokenCount",
        "totalTokenCount", "cached_tokens", "reasoning_tokens", "ephemeral_1h_input_tokens",
        "ephemeral_5m_input_tokens",
    ]
)  # fmt: skip
leaf = st.one_of(counts, st.dictionaries(usage_keys, counts, max_size=4))
usage_blocks = st.dictionaries(usage_keys, leaf, max_size=8)
bodies = st.fixed_dictionaries(
    {},
    optional={
        "usage": st.one_of(usage_blocks, counts, st.lists(counts, max_size=3)),
        "usageMetadata": st.one_of(usage_blocks, counts),
        "model": st.one_of(st.text(max_size=20), counts),
        "modelVersion": st.text(max_size=20),
        "id": st.one_of(st.text(max_size=10), counts),
        "service_tier": st.one_of(st.text(max_size=10), counts),
        "response": st.dictionaries(
            st.sampled_from(["usage", "model", "id"]), st.one_of(usage_blocks, counts)
        ),
        "message": st.dictionaries(
            st.sampled_from(["usage", "model", "id"]), st.one_of(usage_blocks, counts)
        ),
    },
)
json_values: st.SearchStrategy[Any] = st.one_of(bodies, counts, st.lists(bodies, max_size=2))


def check(provider: str, usage: Usage | None) -> None:
    """A parsed usage is canonical and plausible, and prices to a non-negative cost or to unknown."""
    if usage is None:
        return
    assert isinstance(usage, Usage)
    for name in Usage.__slots__:
        assert 0 <= getattr(usage, name) <= MAX_TOKENS
    cost = PRICER.price(provider, ADAPTERS[provider][2], usage, at=NOW)
    assert cost.nanousd is None or cost.nanousd >= 0


@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(provider=st.sampled_from(sorted(ADAPTERS)), body=json_values)
def test_hostile_json_bodies_give_usage_or_unknown(provider: str, body: Any) -> None:
    """Any JSON body: each adapter returns a valid Usage or none, and never raises."""
    adapter, kinds, _ = ADAPTERS[provider]
    for kind in kinds:
        check(provider, adapter.outcome(kind, body).usage)


@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    provider=st.sampled_from(sorted(ADAPTERS)),
    events=st.lists(
        st.tuples(st.sampled_from([b"", b"message_delta", b"message_start"]), json_values), max_size=6
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=8),
)
def test_hostile_streams_give_usage_or_unknown(
    provider: str, events: list[tuple[bytes, Any]], cuts: list[int]
) -> None:
    """Any sequence of JSON events, cut into any chunks: a valid Usage or none, never a raise."""
    adapter, kinds, _ = ADAPTERS[provider]
    raw = b"".join(
        (b"event: " + name + b"\n" if name else b"") + b"data: " + json.dumps(value).encode() + b"\n\n"
        for name, value in events
    )
    for kind in kinds:
        accumulator = adapter.accumulator(kind)
        parser = SSEParser(accumulator)
        start = 0
        for cut in sorted(cuts):
            parser.feed(raw[start:cut])
            start = max(start, cut)
        parser.feed(raw[start:])
        parser.close()
        check(provider, accumulator.outcome().usage)


@settings(max_examples=5000, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=300), max_size=6))
def test_arbitrary_bytes_never_break_the_sse_parser(raw: bytes, cuts: list[int]) -> None:
    """Random bytes cut anywhere: the parser and every accumulator take them without raising."""
    for provider, (adapter, kinds, _) in ADAPTERS.items():
        for kind in kinds:
            accumulator = adapter.accumulator(kind)
            parser = SSEParser(accumulator)
            start = 0
            for cut in sorted(cuts):
                parser.feed(raw[start:cut])
                start = max(start, cut)
            parser.feed(raw[start:])
            parser.close()
            check(provider, accumulator.outcome().usage)
