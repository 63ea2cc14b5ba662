"""The capturing HTTP transport, for httpx and httpx2 alike, async and sync.

`clients.async_transport(tracker, inner)` wraps an ``AsyncBaseTransport`` of httpx or httpx2 (default: a new
``httpx2.AsyncHTTPTransport``) in a transport of the same package. Requests to hosts that no route
knows pass straight through (one dict lookup). For a provider request it reads the JSON body once
(`calls.plan_call`), sends ``Accept-Encoding: identity``, enters ``tracker.guard(...)`` (a refused
call raises `BudgetExceeded` before any byte leaves), sends, and then:

- non-2xx: leaves the guard without a record (the reservation is released) and returns the response;
- 2xx to a request for no stream: reads the body (renewing the reservation's lease while it comes,
  as a tap does), records its usage, and returns it with the body for the client to read (read
  without the client's decoding layer when it is JSON with no Content-Encoding:
  `handback.read_directly`). The other headers are read only when the body is not JSON (compressed,
  or SSE from a host that streams unasked, then read as a stream is). A read cut short is recorded
  with the usage such an SSE body had shown, else unknown;
- 2xx to a request for a stream: returns the response with its stream tapped (`streams`), recorded
  exactly once.

Each SDK retry is a separate request through here: each billed attempt is recorded. One is not sent:
the retry of a request whose billed answer raised `BudgetExceeded(stage="post")` (a raise-mode
budget crossed), which anthropic and openai 2.x wrap as a connection error and retry. The Stainless
SDKs mark a retry with ``x-stainless-retry-count``; such a request, with the same URL, body and tags
as one that crossed in the last `CROSSED_FOR` seconds, in the same budget window, raises a copy of
its `BudgetExceeded` at once, so the provider does not bill the call again. Neither bodies, headers
nor keys are ever stored or logged (a crossed request is kept as a 16-byte digest and the error's
facts, without its traceback).

The sync transport runs the guard and the record on the tracker's event loop (where its writer lives)
with `loops.run_on`, which waits in slices that never outlast the loop: a record the loop stopped
before starting is recorded by the calling thread instead (spooled). It must not be called from that
loop's thread, which would deadlock: it raises RuntimeError there instead (use the async client, or
``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
import operator
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ..context import current_tags
from ..exceptions import BudgetExceeded
from ..loops import run_after, run_on
from .base import Outcome, read
from .calls import (
    GuardedCallLike,
    Plan,
    TrackerLike,
    clamp,
    decode_body,
    leave,
    outcome_of,
    plan_call,
    record,
    settle,
)
from .handback import read_directly
from .options import CaptureOptions
from .streams import Finisher, renew

__all__ = ["LoopGetter", "SpendAsyncTransport", "SpendSyncTransport"]

logger = logging.getLogger("llm_spend")

LoopGetter = Callable[[], "asyncio.AbstractEventLoop | None"]

_now = time.perf_counter

_ROUTES_MAX = 512
"""Routes remembered per transport (host, port, method, path); past that many the memory starts over."""
_UNROUTED: Any = object()

CROSSED_FOR = 600.0
"""Seconds during which an SDK's retry of a request that crossed a budget is refused unsent."""
_CROSSED_MAX = 1_000


class _Base:
    """What the async and sync transports share: routing and planning."""

    def __init__(self, tracker: TrackerLike, inner: Any, options: CaptureOptions, package: Any) -> None:
        self._tracker = tracker
        self._inner = inner
        self._options = options
        self._router = options.router
        self._routes: dict[tuple[str, int | None, str, str], tuple[Any, str, str, str] | None] = {}
        """What `_route` found for each (host, port, method, path) seen: one lookup, not four calls."""
        self._package = package
        self._media_allowance = options.media_allowance_tokens if getattr(tracker, "reserves", True) else None
        """None when the tracker never reserves: no input bound is worked out for it."""
        self._stream_usage = options.include_stream_usage
        self._background: set[asyncio.Task[None]] = set()
        """Recordings under way that nobody awaits (shielded or collected streams)."""
        self._crossed: dict[bytes, tuple[float, BudgetExceeded]] = {}
        """Digest of (URL, body) -> (when, error) of requests whose answer raised stage "post"."""

    @property
    def inner(self) -> Any:
        return self._inner

    def _route(self, request: Any) -> tuple[Any, str, str, str] | None:
        """(adapter, kind, provider id, path) of a request to a billed endpoint, else None.

        Remembered by the URL's host, port and path as httpx parsed them (`_uri_reference`: the
        host IDNA-encoded, the path percent-encoded), a third of the cost of its `host` and `path`
        properties, which decode them on every call; each key still maps to one route, found from
        the decoded values. A release that parses URLs otherwise is keyed by the properties."""
        url = request.url
        try:
            parsed = url._uri_reference
            key = (parsed.host, parsed.port, request.method, parsed.path)
        except AttributeError:
            key = (url.host, url.port, request.method, url.path)
        found = self._routes.get(key, _UNROUTED)
        if found is _UNROUTED:
            if len(self._routes) >= _ROUTES_MAX:
                self._routes.clear()
            found = self._routes[key] = self._find_route(url.host, url.port, request.method, url.path)
        return found  # type: ignore[no-any-return]

    def _find_route(
        self, host: str, port: int | None, method: str, path: str
    ) -> tuple[Any, str, str, str] | None:
        route = self._router.match(host, port)
        if route is None:
            return None
        kind = route.adapter.kind(method, path)
        if kind is None:
            return None
        return route.adapter, kind, route.provider_for(host), path

    def _prepared(self, request: Any, plan: Plan, call: GuardedCallLike) -> Any:
        """The request to send: identity encoding, and the rewritten body if the plan changed it."""
        clamp(plan, call)
        _ask_identity(request.headers)
        if plan.rewritten is None:
            return request
        headers = request.headers.copy()
        headers["Content-Length"] = str(len(plan.rewritten))
        return self._package.module.Request(
            request.method,
            request.url,
            headers=headers,
            content=plan.rewritten,
            extensions=request.extensions,
        )

    def _retry_of_crossed(self, request: Any, raw: bytes) -> BudgetExceeded | None:
        """The error of the request this one retries, when that one crossed a budget (see above)."""
        count = request.headers.get("x-stainless-retry-count")
        if count is None or count == "0":
            return None
        found = self._crossed.get(_digest(request, raw))
        if found is None or found[0] < time.monotonic() - CROSSED_FOR:
            return None
        crossed = found[1]
        if crossed.window_end is not None and crossed.window_end <= datetime.now(UTC):
            return None  # a new window: the call may be made again
        return copy.copy(crossed)

    def _cross(self, request: Any, raw: bytes, exceeded: BudgetExceeded) -> None:
        now = time.monotonic()
        if len(self._crossed) >= _CROSSED_MAX:  # the expired ones go; if none has, the oldest
            stale = [key for key, (when, _) in list(self._crossed.items()) if when < now - CROSSED_FOR]
            for key in stale or list(self._crossed)[: _CROSSED_MAX // 10]:
                self._crossed.pop(key, None)
        self._crossed[_digest(request, raw)] = (now, copy.copy(exceeded))  # the facts, not the frames

    def _read_directly(self, response: Any) -> None:
        """Let the client read an answer that came as JSON without the package's decoding layer
        (`handback`), unless it names a Content-Encoding (which the client decodes, or refuses)."""
        identity = self._package.identity_response
        if identity is not None and _unencoded(response):
            read_directly(response, identity)

    def _guard(self, plan: Plan) -> Any:
        model = plan.model or "unknown"  # None: not read, nor needed before the answer
        if plan.choices != 1:  # named only then: a guard of an older signature serves the rest
            return self._tracker.guard(
                provider=plan.provider, model=model, input_tokens=plan.input_bound,
                max_output_tokens=plan.max_output_tokens, choices=plan.choices,
            )  # fmt: skip
        return self._tracker.guard(
            provider=plan.provider,
            model=model,
            input_tokens=plan.input_bound,
            max_output_tokens=plan.max_output_tokens,
        )

    def _finisher(
        self, plan: Plan, coding: str | None, sse: bool, guard: Any, call: Any, started: float, loop: Any
    ) -> Finisher:
        return Finisher(
            guard,
            call,
            plan,
            plan.adapter.accumulator(plan.kind) if sse else None,
            encoding=coding,
            started=started,
            loop=loop,
            background=self._background,
            renewal=self._options.lease_renewal,
        )

    async def _cut(
        self, guard: Any, call: GuardedCallLike, plan: Plan, response: Any, parts: list[bytes], started: float
    ) -> None:
        """Record an answer to a request for no stream whose read or close failed (on the tracker's
        loop) with what came: its usage when the body came whole (its close failed) or is an SSE
        stream sent unasked that showed it before the cut, else unknown usage."""
        outcome, _ = _answer(plan, response, b"".join(parts), True)
        if outcome is not None:
            await settle(
                guard, call, plan, outcome, source="response", stream=False,
                latency_ms=_elapsed_ms(started), raise_budget=False,
            )  # fmt: skip
            return
        sse, coding = _content(response)
        finisher = self._finisher(plan, coding, sse, guard, call, started, asyncio.get_running_loop())
        finisher.feed_all(parts)
        await finisher.finish()


_IDENTITY = (b"Accept-Encoding", b"accept-encoding", b"identity")
_KEY = operator.itemgetter(1)


def _entries(headers: Any) -> list[tuple[bytes, bytes, bytes]] | None:
    """The (raw key, lower-case key, value) triples httpx and httpx2 keep a `Headers` in (`_list`),
    or None if a release keeps them otherwise. One pass over them costs a fifth of what the public
    methods do, which encode the key, lower-case it and build a list on every call."""
    entries = getattr(headers, "_list", None)
    return entries if type(entries) is list and (not entries or len(entries[0]) == 3) else None


def _ask_identity(headers: Any) -> None:
    """Set ``Accept-Encoding: identity`` on a request's headers: on the first such triple (the third of
    httpx's default headers) when it is the only one, else the public way, which drops the others."""
    entries = _entries(headers)
    if entries is not None:
        keys = list(map(_KEY, entries))  # counted and found in C, not by a loop of Python
        if keys.count(b"accept-encoding") == 1:
            entries[keys.index(b"accept-encoding")] = _IDENTITY
            return
    headers["Accept-Encoding"] = "identity"


def _content(response: Any, stream: bool = False) -> tuple[bool, str | None]:
    """(is an SSE stream, Content-Encoding) of a response, in one pass over its headers. A response
    to a request for a stream is one unless it says it is JSON: a host (a proxy) may send it with
    no Content-Type or another, as the SDKs read it all the same. Media types are case-insensitive."""
    headers = response.headers
    entries = _entries(headers)
    if entries is None:
        entries = [(key, key.lower(), value) for key, value in headers.raw]
    keys = list(map(_KEY, entries))
    kind = entries[keys.index(b"content-type")][2].lower() if b"content-type" in keys else b""
    sse = kind.lstrip().startswith(b"text/event-stream") or (stream and b"json" not in kind)
    if b"content-encoding" not in keys:
        return sse, None
    codings = [
        value.decode("latin-1").strip().lower() for _, key, value in entries if key == b"content-encoding"
    ]
    return sse, ", ".join(codings)  # as httpx reads it


def _unencoded(response: Any) -> bool:
    """Whether a response has no Content-Encoding (or identity): a body that is JSON as it came is
    then its content. One that names another encoding is the client's to decode, or to refuse."""
    entries = _entries(response.headers)
    if entries is not None and b"content-encoding" not in map(_KEY, entries):
        return True
    return _content(response)[1] in (None, "identity")


def _answer(plan: Plan, response: Any, body: bytes, encoded: bool) -> tuple[Outcome | None, bool]:
    """The outcome of a complete answer to a request that asked for no stream, None when it is an
    SSE stream all the same (a host streaming unasked: the caller reads it as a stream); and whether
    the body was JSON as it came (then it needs no decoding, and is its own content).

    Its headers are read only when the body is not JSON: identity was asked for, and compressed
    bytes (gzip, zlib) are never JSON, so a parse that succeeds needs neither the Content-Type nor
    the Content-Encoding, a pass over every header (a provider sends twenty or more). `encoded`: the
    body is as it came (from a network transport), not decoded by the client (a mock's content)."""
    view = plan.adapter.response_view
    parsed = read(body, view)
    if parsed is not None:
        return outcome_of(plan, parsed), True
    sse, coding = _content(response)
    if sse:
        return None, False
    if encoded and coding:
        decoded = decode_body(body, coding)  # None (logged) when it cannot be decoded
        if decoded is None:
            return Outcome(), False
        parsed = read(decoded, view)
    return outcome_of(plan, parsed), False


def _digest(request: Any, raw: bytes) -> bytes:
    """What tells one call from another: its URL, its tags (the budgets' scopes) and its body."""
    digest = hashlib.blake2b(str(request.url).encode(), digest_size=16)
    digest.update(repr(sorted(current_tags().items())).encode("utf-8", "surrogatepass"))
    digest.update(raw)
    return digest.digest()


async def _entered_for_a_thread(guard: Any) -> Any:
    """A sync client's guard, entered on the tracker's loop: its call belongs to the client's
    thread, not to the task that entered it (which ends now), and the tracker's exit waits for it
    as for any call still out (`GuardedCall.task`)."""
    call = await guard.__aenter__()
    if getattr(call, "task", None) is not None:
        call.task = None
    return call


def _elapsed_ms(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)


class SpendAsyncTransport(_Base):
    """Captures LLM calls made through an async httpx/httpx2 client (mixed with its base transport)."""

    async def handle_async_request(self, request: Any) -> Any:
        found = self._route(request)
        if found is None:
            return await self._inner.handle_async_request(request)
        raw = await request.aread()
        if self._crossed and (crossed := self._retry_of_crossed(request, raw)) is not None:
            raise crossed
        plan = plan_call(*found, raw, self._stream_usage, self._media_allowance)
        guard = self._guard(plan)
        call = await guard.__aenter__()
        started = time.perf_counter()
        try:
            response = await self._inner.handle_async_request(self._prepared(request, plan, call))
        except BaseException as error:
            await leave(guard, error)
            raise
        if not 200 <= response.status_code < 300:
            await leave(guard, None)
            return response
        if not plan.stream:  # an answer in one piece, read here and recorded before it is returned
            if response.is_closed:  # read in full already (a mock transport): its content is decoded
                body, encoded = response.content, False
            else:
                parts: list[bytes] = []
                renew_at = started + self._options.lease_renewal
                try:
                    try:
                        async for chunk in response.stream:  # not a comprehension: one more coroutine
                            parts.append(chunk)
                            if _now() >= renew_at:  # a host streaming slowly, unasked
                                renew_at = _now() + self._options.lease_renewal
                                await renew(call)
                    finally:
                        await response.stream.aclose()
                except BaseException as error:  # billed, but cut short (or its close failed)
                    await self._cut(guard, call, plan, response, parts, started)
                    raise error
                body, encoded = b"".join(parts), True
                response.stream = self._package.read_body(body)
            outcome, as_is = _answer(plan, response, body, encoded)
            if outcome is not None:
                if as_is and encoded:
                    self._read_directly(response)
                record(call, plan, outcome, source="response", stream=False, latency_ms=_elapsed_ms(started))
                try:  # `leave` inline (one coroutine fewer): no cost unless something is raised
                    await guard.__aexit__(None, None, None)
                except BudgetExceeded as exceeded:  # stage "post": a window crossed, the caller's to handle
                    self._cross(request, raw, exceeded)
                    raise
                except Exception:  # a failure to record must not fail the caller's call
                    logger.exception("llm-spend: recording a captured call failed")
                return response
        sse, coding = _content(response, plan.stream)  # a stream asked for, or one sent unasked
        finisher = self._finisher(plan, coding, sse, guard, call, started, asyncio.get_running_loop())
        if response.is_closed or not plan.stream:  # read in full already: nothing left to tap
            finisher.feed_all([chunk async for chunk in response.stream])
            try:
                await finisher.finish(raise_budget=True)
            except BudgetExceeded as exceeded:
                self._cross(request, raw, exceeded)
                raise
            return response
        response.stream = self._package.async_stream(response.stream, finisher)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


class SpendSyncTransport(_Base):
    """Captures LLM calls made through a sync httpx/httpx2 client; records on the tracker's loop."""

    def __init__(
        self, tracker: TrackerLike, inner: Any, options: CaptureOptions, package: Any, loop: LoopGetter
    ) -> None:
        super().__init__(tracker, inner, options, package)
        self._loop = loop

    def handle_request(self, request: Any) -> Any:
        found = self._route(request)
        if found is None:
            return self._inner.handle_request(request)
        loop = self._tracker_loop()
        raw = request.read()
        if self._crossed and (crossed := self._retry_of_crossed(request, raw)) is not None:
            raise crossed
        plan = plan_call(*found, raw, self._stream_usage, self._media_allowance)
        guard = self._guard(plan)
        call = run_on(loop, _entered_for_a_thread(guard), here=False)
        started = time.perf_counter()
        try:
            response = self._inner.handle_request(self._prepared(request, plan, call))
        except BaseException as error:
            run_after(loop, leave(guard, error))
            raise
        if not 200 <= response.status_code < 300:
            run_after(loop, leave(guard, None))
            return response
        if not plan.stream:  # an answer in one piece, read here and recorded before it is returned
            if response.is_closed:  # read in full already (a mock transport): its content is decoded
                body, encoded = response.content, False
            else:
                parts: list[bytes] = []
                renew_at = started + self._options.lease_renewal
                try:
                    try:
                        for chunk in response.stream:
                            parts.append(chunk)
                            if _now() >= renew_at:  # a host streaming slowly, unasked
                                renew_at = _now() + self._options.lease_renewal
                                run_after(loop, renew(call))
                    finally:
                        response.stream.close()
                except BaseException:  # billed, but cut short (or its close failed)
                    run_after(loop, self._cut(guard, call, plan, response, parts, started))
                    raise
                body, encoded = b"".join(parts), True
                response.stream = self._package.read_body(body)
            outcome, as_is = _answer(plan, response, body, encoded)
            if outcome is not None:
                if as_is and encoded:
                    self._read_directly(response)
                try:
                    run_after(
                        loop,
                        settle(
                            guard, call, plan, outcome, source="response", stream=False,
                            latency_ms=_elapsed_ms(started), raise_budget=True,
                        ),
                    )  # fmt: skip
                except BudgetExceeded as exceeded:
                    self._cross(request, raw, exceeded)
                    raise
                return response
        sse, coding = _content(response, plan.stream)  # a stream asked for, or one sent unasked
        finisher = self._finisher(plan, coding, sse, guard, call, started, loop)
        if response.is_closed or not plan.stream:  # read in full already: nothing left to tap
            finisher.feed_all(list(response.stream))
            try:
                run_after(loop, finisher.finish(raise_budget=True))
            except BudgetExceeded as exceeded:
                self._cross(request, raw, exceeded)
                raise
            return response
        response.stream = self._package.sync_stream(response.stream, finisher)
        return response

    def _tracker_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop()
        if loop is None or loop.is_closed() or not loop.is_running():
            raise RuntimeError(
                "llm-spend: the tracker is not running; enter it (`async with tracker:` or its lifespan) "
                "on an event loop before making calls with a sync client"
            )
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise RuntimeError(
                "llm-spend: a sync client was called on the tracker's event loop thread, which would "
                "deadlock: use the async client there, or run the sync call with asyncio.to_thread"
            )
        return loop

    def close(self) -> None:
        self._inner.close()
