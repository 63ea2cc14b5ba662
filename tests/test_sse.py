"""The incremental SSE parser: events come out whole, however the network splits the bytes."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_spend.capture import Outcome
from llm_spend.capture.anthropic import ADAPTER as ANTHROPIC
from llm_spend.capture.gemini import ADAPTER as GEMINI
from llm_spend.capture.openai import ADAPTER as OPENAI
from llm_spend.capture.sse import SSEParser
from llm_spend.testing import FakeProviderTransport
from llm_spend.usage import Usage


def parse(*chunks: bytes, close: bool = True) -> list[tuple[bytes, bytes]]:
    events: list[tuple[bytes, bytes]] = []
    parser = SSEParser(lambda event, data: events.append((event, data)))
    for chunk in chunks:
        parser.feed(chunk)
    if close:
        parser.close()
    return events


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def test_events_with_names_and_data() -> None:
    """Each blank line ends an event; `event:` names it; a missing name is b''."""
    assert parse(b"event: a\ndata: 1\n\ndata: 2\n\n") == [(b"a", b"1"), (b"", b"2")]


def test_multi_line_data_is_joined_with_newlines() -> None:
    """Several data lines make one event's data, joined with LF."""
    assert parse(b"data: {\ndata: }\n\n") == [(b"", b"{\n}")]


def test_crlf_and_lone_cr_line_endings() -> None:
    """CRLF and CR end lines like LF."""
    assert parse(b"data: 1\r\n\r\ndata: 2\r\rdata: 3\n\n") == [(b"", b"1"), (b"", b"2"), (b"", b"3")]


def test_crlf_split_across_chunks_counts_once() -> None:
    """A CR at the end of one chunk and LF at the start of the next are one line end, not two."""
    assert parse(b"data: 1\r", b"\ndata: 2\r\n\r\n") == [(b"", b"1\n2")]


def test_comments_and_other_fields_are_ignored() -> None:
    """Keep-alive comments, id: and retry: do not make events."""
    assert parse(b": ping\n\nid: 7\nretry: 10\ndata: x\n\n: bye\n\n") == [(b"", b"x")]


def test_value_without_space_and_field_without_colon() -> None:
    """`data:x` is x; a bare `data` line is empty data."""
    assert parse(b"data:x\n\ndata\n\n") == [(b"", b"x"), (b"", b"")]


def test_done_marker_is_an_ordinary_event() -> None:
    """OpenAI's [DONE] arrives as data; adapters decide what it means."""
    assert parse(b"data: [DONE]\n\n") == [(b"", b"[DONE]")]


def test_close_delivers_a_last_event_without_its_blank_line() -> None:
    """A stream closed right after its last event (no trailing newline) still yields it."""
    assert parse(b"data: 1\n\ndata: last", close=False) == [(b"", b"1")]
    assert parse(b"data: 1\n\ndata: last") == [(b"", b"1"), (b"", b"last")]


def test_event_split_byte_by_byte() -> None:
    """One byte per network chunk gives the same events."""
    stream = b'event: message_delta\r\ndata: {"a": 1}\r\n\r\n'
    assert parse(*(stream[i : i + 1] for i in range(len(stream)))) == [(b"message_delta", b'{"a": 1}')]


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
def test_any_chunking_gives_the_same_events(cuts: list[int]) -> None:
    """Property: splitting a stream anywhere (CRLF, comments, multi-line data) changes no event."""
    stream = (
        b': keep-alive\r\n\r\nevent: one\r\ndata: {"x":\r\ndata: 1}\r\n\r\n'
        b"data: plain\n\nevent: two\rdata: cr\r\rdata: [DONE]\n\n"
    )
    assert parse(*split(stream, cuts)) == parse(stream)


def reference(stream: bytes) -> list[tuple[bytes, bytes]]:
    """The events the SSE specification gives, read line by line (and the last event even without
    its blank line, as `SSEParser.close` delivers it)."""
    events: list[tuple[bytes, bytes]] = []
    event, data = b"", []
    for line in re.split(rb"\r\n|\r|\n", stream):
        if not line:
            if data:
                events.append((event, b"\n".join(data)))
            event, data = b"", []
            continue
        if line.startswith(b":"):
            continue
        name, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value
    if data:
        events.append((event, b"\n".join(data)))
    return events


_VALUE = st.binary(max_size=12).map(lambda value: value.replace(b"\r", b"").replace(b"\n", b""))
_LINE = st.one_of(
    st.tuples(st.sampled_from([b"data: ", b"data:", b"event: ", b": ", b"id: "]), _VALUE).map(b"".join),
    st.just(b"data"),
)
_END_OF_LINE = st.sampled_from([b"\n", b"\r\n", b"\r"])
_EVENT = st.tuples(
    st.lists(st.tuples(_LINE, _END_OF_LINE).map(b"".join), min_size=1, max_size=3), _END_OF_LINE
).map(lambda parts: b"".join(parts[0]) + parts[1])


@settings(max_examples=500, deadline=None)
@given(events=st.lists(_EVENT, max_size=8), cuts=st.lists(st.integers(0, 400), max_size=6))
def test_the_parser_gives_the_events_of_the_specification(events: list[bytes], cuts: list[int]) -> None:
    """Property: one event per chunk (the shapes the fast path takes), or the stream cut anywhere,
    gives the events the specification reads from the same bytes."""
    stream = b"".join(events)
    assert parse(*events) == reference(stream)
    assert parse(*split(stream, cuts)) == reference(stream)


def fake_stream(path: str, body: bytes, usage: Usage) -> bytes:
    """The SSE bytes the fake provider sends for one streamed request."""
    import httpx2

    fake = FakeProviderTransport(usage=usage, model="m-2025")
    with httpx2.Client(transport=fake) as client:
        return client.post(f"https://api.example.com{path}", content=body).content


USAGE = Usage(
    input_tokens=1234, output_tokens=321, cache_read_tokens=200, cache_write_tokens=100,
    cache_write_1h_tokens=40, reasoning_tokens=21,
)  # fmt: skip
STREAMS = {
    "openai-chat": (
        OPENAI, "chat", "/v1/chat/completions",
        b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}',
    ),
    "openai-responses": (OPENAI, "responses", "/v1/responses", b'{"model":"m","stream":true}'),
    "anthropic": (ANTHROPIC, "messages", "/v1/messages", b'{"model":"m","stream":true,"max_tokens":9}'),
    "gemini": (GEMINI, "generate", "/v1beta/models/m:streamGenerateContent", b"{}"),
}  # fmt: skip


def collect(adapter: object, kind: str, chunks: list[bytes]) -> Outcome:
    accumulator = adapter.accumulator(kind)  # type: ignore[attr-defined]
    parser = SSEParser(accumulator)
    for chunk in chunks:
        parser.feed(chunk)
    parser.close()
    outcome: Outcome = accumulator.outcome()
    return outcome


@pytest.mark.parametrize("name", sorted(STREAMS))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(min_value=0, max_value=100_000), max_size=40))
def test_random_chunkings_of_a_provider_stream_give_the_same_usage(name: str, cuts: list[int]) -> None:
    """Property: however a provider stream is chunked, its accumulated usage and ids are the same."""
    adapter, kind, path, body = STREAMS[name]
    stream = fake_stream(path, body, USAGE)
    whole = collect(adapter, kind, [stream])
    assert whole.usage is not None and whole.usage.output_tokens == USAGE.output_tokens
    assert whole.model == "m-2025"
    assert collect(adapter, kind, split(stream, cuts)) == whole
