"""What the capturing transport adds: µs per non-streaming call and per streamed chunk.

Run: .venv/bin/python bench/capture.py. The same fake provider transport (llm_spend.testing) answers
with and without the capture wrapper, in the same run, through an httpx2.AsyncClient (the SDKs' own
work is the same either way and is left out). "capture only" uses a stub tracker whose guard and
record do nothing, so it measures parsing, routing and tapping, as for a tracker without a block-mode
budget; "capture, reserving" the same stub saying that it reserves (capture then reads every request
before it is sent, as for a block-mode budget); "+ SQLite ledger" uses a real Tracker
writing every call to a SQLite file (group-committed by its writer), timed against plain runs of
its own so that its writer's work does not land in the other rows. Medians over several rounds; what
a setup adds is the median of its differences with plain in the same round.
Figures only, no assertions: they depend on the machine. `bench/capture.py direct` measures only
what the direct read of an answer handed back to the client saves (see `direct_read`).
"""

from __future__ import annotations

import asyncio
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2

from llm_spend import Tracker, Usage
from llm_spend.capture import CaptureOptions, async_transport
from llm_spend.capture.clients import bind
from llm_spend.testing import FakeProviderTransport

CALLS, CALL_RUNS = 1_000, 15
LEDGER = "+ SQLite ledger"
LARGE_CALLS = 100
CHUNKS, STREAM_RUNS = 2_000, 21
USAGE = Usage(input_tokens=1200, output_tokens=300, cache_read_tokens=1024)
CHAT = "https://api.openai.com/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper. " * 4}]
LARGE = {
    "96 kB of quoted text": [{"role": "user", "content": 'say "yes" or "no" to "this" ' * 3_400}],
    "1 MB base64 image": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "QUJD" * 250_000}},
            ],
        }
    ],
}
STREAMS = {
    "openai chat": (CHAT, {"model": "gpt-4o-mini", "stream": True, "messages": MESSAGES}),
    "openai responses": (
        "https://api.openai.com/v1/responses",
        {"model": "gpt-4o-mini", "stream": True, "input": "x"},
    ),
    "anthropic": (
        "https://api.anthropic.com/v1/messages",
        {"model": "claude-sonnet-4-6", "stream": True, "max_tokens": 4000, "messages": MESSAGES},
    ),
    "gemini": (
        "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:streamGenerateContent",
        {},
    ),
}


class _Done:
    def __await__(self) -> Any:
        return iter(())


class _StubCall:
    """What a GuardedCall offers (its signatures too), doing nothing."""

    max_output_tokens = None  # as a GuardedCall that was granted what it asked for

    def record(
        self,
        usage: Usage | None,
        *,
        model: str | None = None,
        usage_source: str = "manual",
        stream: bool = False,
        latency_ms: int | None = None,
        service_tier: str | None = None,
        provider_response_id: str | None = None,
    ) -> _Done:
        return _Done()

    async def extend(self) -> None:
        return None


class _StubGuard:
    async def __aenter__(self) -> _StubCall:
        return _StubCall()

    async def __aexit__(self, *exc: object) -> None:
        return None


class StubTracker:
    """Guard and record that do nothing: the transport's own cost, without a ledger. Like a Tracker
    without a block-mode budget, it does not reserve, unless `reserves` (then capture reads every
    request before sending it, for the input bound and the max output tokens a reservation needs)."""

    def __init__(self, reserves: bool = False) -> None:
        self.reserves = reserves

    def guard(
        self,
        *,
        provider: str,
        model: str,
        input_tokens: int,
        max_output_tokens: int | None = None,
        tags: Any = None,
    ) -> _StubGuard:
        return _StubGuard()


def paired(runs: dict[str, list[float]], base: str = "plain") -> dict[str, tuple[float, float]]:
    """(median, added) of each setup's runs: added is the median of its differences with the `base`
    run of the same round, which a slow moment of the machine shifts alike (the difference of two
    medians would take each from another round)."""
    plain = runs[base]
    return {
        name: (
            statistics.median(values),
            statistics.median(a - b for a, b in zip(values, plain, strict=True)),
        )
        for name, values in runs.items()
    }


async def per_call(
    clients: dict[str, httpx2.AsyncClient], messages: Any = MESSAGES, calls: int = CALLS
) -> dict[str, list[float]]:
    """µs per call of each non-streaming chat client in each of CALL_RUNS rounds of `calls` calls,
    the clients taking turns within a round, in an order that rotates."""
    body = {"model": "gpt-4o-mini", "messages": messages, "max_tokens": 500}
    runs: dict[str, list[float]] = {name: [] for name in clients}
    names = list(clients)
    for client in clients.values():
        for _ in range(calls // 10):
            await client.post(CHAT, json=body)
    for round_ in range(CALL_RUNS):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            client = clients[name]
            started = time.perf_counter()
            for _ in range(calls):
                await client.post(CHAT, json=body)
            runs[name].append((time.perf_counter() - started) / calls * 1e6)
    return runs


async def apart(
    setups: dict[str, Any], make: Any, messages: Any = MESSAGES, calls: int = CALLS
) -> dict[str, tuple[float, float]]:
    """(µs per call, µs added over plain) of each setup: the clients that do no I/O in one set of
    rounds, then the ledger's client with a plain client of its own. The ledger's writer leaves work
    behind it (commits on its thread, objects for the garbage collector) that lands in whichever
    runs follow, and would scatter the capture rows."""
    found = paired(
        await per_call(
            {name: make(guard) for name, guard in setups.items() if name != LEDGER}, messages, calls
        )
    )
    ledger = await per_call({"plain": make(None), LEDGER: make(setups[LEDGER])}, messages, calls)
    found[LEDGER] = paired(ledger)[LEDGER]
    return found


async def per_chunk(
    clients: dict[str, httpx2.AsyncClient], url: str, body: dict[str, Any]
) -> tuple[dict[str, tuple[float, float]], int]:
    """(median µs per streamed chunk, µs added over plain) of each client (one SSE event a chunk),
    reading the raw stream as an SDK does, the clients' streams taking turns in an order that rotates."""
    runs: dict[str, list[float]] = {name: [] for name in clients}
    names = list(clients)
    chunks = 0
    for round_ in range(STREAM_RUNS):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:  # an order that rotates
            client = clients[name]
            started = time.perf_counter()
            async with client.stream("POST", url, json=body) as response:
                chunks = 0
                async for _ in response.aiter_raw():
                    chunks += 1
            runs[name].append((time.perf_counter() - started) / chunks * 1e6)
    return paired(runs), chunks


class _SocketBody(httpx2.AsyncByteStream):
    """A body still to be read, through an async generator, as httpx2's network transport returns it."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    async def __aiter__(self) -> Any:
        yield self._body


class Unread(httpx2.AsyncBaseTransport):
    """The fake provider's answer, unread: the fake (like httpx's MockTransport) hands back a body read
    in full, which a client then never reads again; a network transport hands back a stream."""

    def __init__(self, fake: FakeProviderTransport) -> None:
        self._fake = fake

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self._fake.handle_async_request(request)
        return httpx2.Response(
            response.status_code, headers=response.headers, stream=_SocketBody(response.content)
        )


def client(fake: Any, tracker: Any | None) -> httpx2.AsyncClient:
    transport = fake if tracker is None else async_transport(tracker, fake)
    return httpx2.AsyncClient(transport=transport)


def _fake(wrap: type[Unread] | None) -> Any:
    fake = FakeProviderTransport(usage=USAGE)
    return fake if wrap is None else wrap(fake)


async def direct_read() -> None:
    """What reading the body handed back without the package's decoding layer saves (`python
    bench/capture.py direct`): capture with and without `identity_response`, a body to read."""
    package = bind("httpx2")
    clients = {"plain": httpx2.AsyncClient(transport=_fake(Unread))}
    for name, identity in (("direct read", package.identity_response), ("package's read", None)):
        chosen = package._replace(identity_response=identity)
        transport = chosen.async_transport(StubTracker(), _fake(Unread), CaptureOptions(), chosen)
        clients[name] = httpx2.AsyncClient(transport=transport)
    runs = await per_call(clients)
    print(f"capture only, body read from a stream, µs per call (median of {CALL_RUNS} x {CALLS})")
    for name, (micros, added) in paired(runs).items():
        print(f"  {name:16} {micros:8.1f}   added {added:7.1f}")
    saved = paired(runs, base="package's read")["direct read"][1]
    print(f"  direct read against the package's read, paired: {saved:+.1f}")


async def main() -> None:
    print(f"python {platform.python_version()} on {platform.machine()}, httpx2 {httpx2.__version__}")
    text = " ".join(f"w{i}" for i in range(CHUNKS))
    with tempfile.TemporaryDirectory() as folder:
        async with Tracker(f"sqlite+aiosqlite:///{Path(folder) / 'bench.db'}") as tracker:
            setups = {
                "plain": None,
                "capture only": StubTracker(),
                "capture, reserving": StubTracker(reserves=True),
                LEDGER: tracker,
            }
            for body, wrap in (("body read by the transport", None), ("body read from a stream", Unread)):
                print(f"\nnon-streaming chat call, {body}, µs per call (median of {CALL_RUNS} x {CALLS})")
                calls = await apart(setups, lambda guard, wrap=wrap: client(_fake(wrap), guard))
                for name, (micros, added) in calls.items():
                    print(f"  {name:18} {micros:8.1f}   added {added:7.1f}")
            print(f"\nlarge requests, µs per call (median of {CALL_RUNS} x {LARGE_CALLS})")
            for label, messages in LARGE.items():
                large = await apart(setups, lambda guard: client(_fake(None), guard), messages, LARGE_CALLS)
                for name, (micros, added) in large.items():
                    print(f"  {label:20} {name:16} {micros:9.1f}   added {added:7.1f}")
            print(f"\nstreamed chunk, µs per chunk (median of {STREAM_RUNS} streams of ~{CHUNKS} events)")
            for stream, (url, body) in STREAMS.items():
                streaming = {
                    name: client(FakeProviderTransport(usage=USAGE, text=text), guard)
                    for name, guard in list(setups.items())[:2]
                }
                chunk_us, chunks = await per_chunk(streaming, url, body)
                for name, (micros, added) in chunk_us.items():
                    print(f"  {stream:17} {name:13} {micros:7.2f}   added {added:5.2f}   ({chunks} chunks)")


if __name__ == "__main__":
    asyncio.run(direct_read() if sys.argv[1:] == ["direct"] else main())
