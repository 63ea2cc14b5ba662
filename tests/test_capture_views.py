"""Views: a complete response read through its adapter's view gives what the whole body gives.

With msgspec installed (the `[fast]` extra, in the dev install), `read` decodes only the keys an
adapter reads (`Adapter.response_view`) and parses the whole body when the view refuses it. These
tests hold the two readings equal: on hostile bodies from Hypothesis, at every integer edge where
msgspec and orjson could differ, and on each provider's own answers from FakeProviderTransport; and
they check, key by key, that an adapter reads nothing its view leaves out.
"""

from __future__ import annotations

import json
import typing
from typing import Any

import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_spend.capture import anthropic, gemini, openai
from llm_spend.capture.base import Adapter, View, load_json, read
from llm_spend.testing import FakeProviderTransport
from llm_spend.usage import Usage

ADAPTERS: dict[str, tuple[Adapter, tuple[str, ...]]] = {
    "openai": (openai.ADAPTER, ("chat", "responses", "embeddings")),
    "anthropic": (anthropic.ADAPTER, ("messages",)),
    "gemini": (gemini.ADAPTER, ("generate",)),
}
SHAPES = {"openai": openai._Response, "anthropic": anthropic._Message, "gemini": gemini._Response}
GEMINI = "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent"
ENDPOINTS = [
    ("openai", "chat", "https://api.openai.com/v1/chat/completions", {"model": "gpt-4o-mini"}),
    ("openai", "responses", "https://api.openai.com/v1/responses", {"model": "gpt-4o-mini"}),
    ("openai", "embeddings", "https://api.openai.com/v1/embeddings", {"model": "text-embedding-3-small"}),
    ("anthropic", "messages", "https://api.anthropic.com/v1/messages", {"model": "claude-sonnet-4-6"}),
    ("gemini", "generate", GEMINI, {}),
]

# Every key the three providers put in a usage block or around it (and some they do not), so that
# an adapter reading a key its view leaves out would be caught by the recording below.
KEYS = [
    "prompt_tokens", "completion_tokens", "total_tokens", "input_tokens", "output_tokens",
    "prompt_cache_hit_tokens", "prompt_cache_miss_tokens", "prompt_tokens_details",
    "completion_tokens_details", "input_tokens_details", "output_tokens_details", "cached_tokens",
    "cache_write_tokens", "audio_tokens", "reasoning_tokens", "accepted_prediction_tokens",
    "cache_creation_input_tokens", "cache_read_input_tokens", "cache_creation",
    "ephemeral_1h_input_tokens", "ephemeral_5m_input_tokens", "thinking_tokens", "service_tier",
    "server_tool_use", "promptTokenCount", "candidatesTokenCount", "thoughtsTokenCount",
    "cachedContentTokenCount", "toolUsePromptTokenCount", "totalTokenCount", "promptTokensDetails",
]  # fmt: skip
TOP = ["id", "model", "service_tier", "usage", "usageMetadata", "modelVersion", "responseId", "choices",
       "object", "created", "system_fingerprint", "type", "role", "content", "stop_reason"]  # fmt: skip

EDGES = [2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, -(2**63), -(2**63) - 1, -(2**64), -(10**30)]
counts = st.one_of(
    st.integers(min_value=0, max_value=5_000_000),
    st.integers(min_value=-(10**6), max_value=-1),
    st.sampled_from(EDGES),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=4),
    st.none(),
    st.booleans(),
)
texts = st.one_of(st.text(max_size=8), st.sampled_from(["gpt-4o-mini", " ", "", "x" * 201]), counts)
blocks = st.recursive(
    st.dictionaries(st.sampled_from(KEYS), st.one_of(counts, texts), max_size=8),
    lambda inner: st.dictionaries(
        st.sampled_from(KEYS), st.one_of(counts, inner, st.lists(inner, max_size=2)), max_size=8
    ),
    max_leaves=20,
)
bodies = st.dictionaries(
    st.sampled_from(TOP), st.one_of(blocks, texts, counts, st.lists(blocks, max_size=2)), max_size=8
)


class Recording(dict[str, Any]):
    """A parsed JSON object that notes each key read from it (and from the objects inside it)."""

    def __init__(self, value: dict[str, Any], path: tuple[str, ...], seen: set[tuple[str, ...]]) -> None:
        super().__init__({key: wrap(item, (*path, key), seen) for key, item in value.items()})
        self._path, self._seen = path, seen

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self._seen.add((*self._path, key))
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self._seen.add((*self._path, key))
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self._seen.add((*self._path, str(key)))
        return super().__contains__(key)


def wrap(value: Any, path: tuple[str, ...], seen: set[tuple[str, ...]]) -> Any:
    if isinstance(value, dict):
        return Recording(value, path, seen)
    if isinstance(value, list):
        return [wrap(item, (*path, "[]"), seen) for item in value]
    return value


def view_paths(shape: Any, path: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every key path a view's TypedDict names, nested ones included."""
    found: set[tuple[str, ...]] = set()
    for key, hint in typing.get_type_hints(shape).items():
        found.add((*path, key))
        for option in typing.get_args(hint) or (hint,):
            if typing.is_typeddict(option):
                found |= view_paths(option, (*path, key))
    return found


def readings(provider: str, raw: bytes) -> list[tuple[Any, Any]]:
    """(through the view, from the whole body) outcome pairs, one per kind of the provider."""
    adapter, kinds = ADAPTERS[provider]
    viewed, whole = read(raw, adapter.response_view), load_json(raw)
    return [(adapter.outcome(kind, viewed), adapter.outcome(kind, whole)) for kind in kinds]


def fake_answer(provider: str, url: str, body: dict[str, Any], usage: Usage, tier: str | None) -> bytes:
    fake = FakeProviderTransport(usage=usage, service_tier=tier)
    with httpx2.Client(transport=fake) as client:
        response = client.post(url, json=body)
    assert response.status_code == 200
    return response.content


def test_every_adapter_has_a_view_with_the_dev_install() -> None:
    for provider, (adapter, _) in ADAPTERS.items():
        assert adapter.response_view is not None, provider


@pytest.mark.parametrize(("provider", "kind", "url", "body"), ENDPOINTS)
@pytest.mark.parametrize("tier", [None, "default"])
def test_each_providers_answer_reads_the_same_through_the_view(
    provider: str, kind: str, url: str, body: dict[str, Any], tier: str | None
) -> None:
    usage = Usage(input_tokens=3000, output_tokens=700, cache_read_tokens=1024, reasoning_tokens=300)
    if provider == "anthropic":
        usage = Usage(3000, 700, 1024, 600, 200, 0)
    elif kind == "embeddings":
        usage = Usage(input_tokens=40)
    raw = fake_answer(provider, url, body, usage, tier)
    adapter = ADAPTERS[provider][0]
    assert adapter.response_view is not None
    viewed = adapter.response_view(raw)  # the view itself reads it: nothing to fall back on
    assert "choices" not in viewed and "content" not in viewed and "candidates" not in viewed
    through_view = adapter.outcome(kind, viewed)
    assert through_view == adapter.outcome(kind, load_json(raw))
    assert through_view.usage == usage and through_view.model is not None


@pytest.mark.parametrize("count", EDGES)
@pytest.mark.parametrize("provider", sorted(ADAPTERS))
def test_counts_past_64_bits_or_below_zero_read_as_the_whole_body_reads_them(
    provider: str, count: int
) -> None:
    block = {
        "prompt_tokens": count, "completion_tokens": 5, "input_tokens": count, "output_tokens": 5,
        "promptTokenCount": count, "candidatesTokenCount": 5,
    }  # fmt: skip
    cached = {"cache_read_input_tokens": count, "prompt_tokens_details": {"cached_tokens": count}}
    small = {**block, "prompt_tokens": 9, "input_tokens": 9, **cached}
    for raw in (
        json.dumps({"model": "m", "usage": block, "usageMetadata": block}).encode(),
        json.dumps({"model": "m", "usage": small}).encode(),
    ):
        for through_view, whole in readings(provider, raw):
            assert through_view == whole


@pytest.mark.parametrize(
    "raw",
    [
        b"<html>502 Bad Gateway</html>",
        b"",
        b'{"model": "m", "usage": {"prompt_tokens": NaN}}',
        b'\xef\xbb\xbf{"model": "m", "usage": {"prompt_tokens": 4, "completion_tokens": 1}}',
        b'{"model": "\\ud800", "usage": {"prompt_tokens": 4, "completion_tokens": 1}}',
        b'{"model": "m", "choices": ' + b"[" * 3000 + b"]" * 3000 + b"}",
        b'{"model": "m", "usage": {"prompt_tokens": 1e400}}',
        b'{"usage": {"prompt_tokens": 4, "completion_tokens": 1}, "usage": null}',
        b'{"usage": null, "usage": {"prompt_tokens": 4, "completion_tokens": 1}}',
        b'[{"model": "m"}]',
    ],
)
def test_bodies_a_view_refuses_read_as_the_whole_body_reads_them(raw: bytes) -> None:
    for provider in ADAPTERS:
        for through_view, whole in readings(provider, raw):
            assert through_view == whole


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(provider=st.sampled_from(sorted(ADAPTERS)), body=bodies)
def test_any_body_reads_the_same_through_the_view_and_the_adapter_reads_only_its_keys(
    provider: str, body: dict[str, Any]
) -> None:
    raw = json.dumps(body).encode()
    for through_view, whole in readings(provider, raw):
        assert through_view == whole
    adapter, kinds = ADAPTERS[provider]
    allowed = view_paths(SHAPES[provider])
    for kind in kinds:
        seen: set[tuple[str, ...]] = set()
        adapter.outcome(kind, wrap(json.loads(raw), (), seen))
        assert seen <= allowed, f"{provider} {kind} reads {sorted(seen - allowed)}, not in its view"


DETAILS = {
    "prompt_tokens_details", "completion_tokens_details", "input_tokens_details", "output_tokens_details",
    "cache_creation",
}  # fmt: skip


def full_block(depth: int) -> dict[str, Any]:
    return {key: full_block(depth - 1) if key in DETAILS and depth else 1 for key in KEYS}


FULL = {"id": "r", "model": "m", "service_tier": "default", "modelVersion": "m", "responseId": "r",
        "usage": full_block(1), "usageMetadata": full_block(1)}  # fmt: skip


def without(body: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    head, *rest = path
    if not rest:
        return {key: value for key, value in body.items() if key != head}
    return {**body, head: without(body[head], tuple(rest))}


def key_paths(body: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for key, value in body.items():
        found.append((*path, key))
        if isinstance(value, dict):
            found += key_paths(value, (*path, key))
    return found


@pytest.mark.parametrize("provider", sorted(ADAPTERS))
def test_with_every_key_present_or_any_one_missing_an_adapter_reads_only_its_view(provider: str) -> None:
    """Every branch of an adapter that a key's presence decides (DeepSeek's cache hits when
    ``cached_tokens`` is missing, Anthropic's 5-minute writes when the total is) is taken once."""
    adapter, kinds = ADAPTERS[provider]
    allowed = view_paths(SHAPES[provider])
    for body in [FULL, *(without(FULL, path) for path in key_paths(FULL))]:
        for kind in kinds:
            seen: set[tuple[str, ...]] = set()
            adapter.outcome(kind, wrap(body, (), seen))
            assert seen <= allowed, f"{provider} {kind} reads {sorted(seen - allowed)}, not in its view"
        for through_view, whole in readings(provider, json.dumps(body).encode()):
            assert through_view == whole


ANSWER = (
    b'{"id":"r1","model":"m","choices":[{"message":{"content":"TEXT"}}],'
    b'"usage":{"prompt_tokens":40,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":8}},'
    b'"usageMetadata":{"promptTokenCount":40,"candidatesTokenCount":5}}'
)


@settings(max_examples=3000, deadline=None)
@given(
    provider=st.sampled_from(sorted(ADAPTERS)),
    inside=st.binary(max_size=12),
    at=st.integers(min_value=0, max_value=len(ANSWER)),
    cut=st.integers(min_value=0, max_value=3),
)
def test_bytes_put_anywhere_in_an_answer_read_the_same_through_the_view(
    provider: str, inside: bytes, at: int, cut: int
) -> None:
    """Bytes the view skips are checked as the whole parse checks them: invalid UTF-8, control
    characters, bad escapes or numbers in the text make both refuse the body, or both read it."""
    for raw in (
        ANSWER.replace(b"TEXT", inside),
        ANSWER[:at] + inside + ANSWER[at + cut :],
    ):
        for through_view, whole in readings(provider, raw):
            assert through_view == whole, raw


@pytest.mark.parametrize(
    "text",
    [b"\xff", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\x01", b"\\x", b"\\ud800", "“curly” — ok".encode()],
    ids=["0xff", "cut", "overlong", "surrogate", "control", "bad escape", "lone surrogate", "valid"],
)
def test_an_answer_whose_text_is_invalid_reads_as_the_whole_body_reads_it(text: bytes) -> None:
    raw = ANSWER.replace(b"TEXT", text)
    for provider in ADAPTERS:
        for through_view, whole in readings(provider, raw):
            assert through_view == whole
    assert (readings("openai", raw)[0][1].usage is None) == (
        text in (b"\xff", b"\xc3", b"\xc0\xaf", b"\x01", b"\\x")
    )


def test_without_a_view_the_whole_body_is_read() -> None:
    raw = b'{"model": "m", "id": "r1", "usage": {"prompt_tokens": 4, "completion_tokens": 1}, "choices": []}'
    nothing: View = None
    assert read(raw, nothing) == json.loads(raw)
    assert openai.ADAPTER.outcome("chat", read(raw, nothing)).usage == Usage(4, 1)
