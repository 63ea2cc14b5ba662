"""Tapped response streams: chunks pass through as they arrive, and the call is recorded exactly once.

Each chunk is handed to the caller unchanged after `SSEParser.feed` has looked at it (no buffering
beyond the current line). The call is recorded when the stream ends, when the caller closes it early
(``break`` then ``aclose()``, or the SDK closing its response), when the read is cancelled or fails
(a client disconnect in an ASGI StreamingResponse cancels it), and, as a last resort, when the stream
object is garbage collected without being closed. Whatever comes first records; the rest do nothing.
A stream that ended without its final usage event is recorded with unknown usage (usage=None).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any

from ..loops import run_after, running_loop
from .base import Accumulator, Outcome
from .calls import Guard, GuardedCallLike, Plan, settle
from .sse import SSEParser

__all__ = ["Finisher", "TappedAsyncStream", "TappedSyncStream", "renew"]

logger = logging.getLogger("llm_spend")
_monotonic = time.monotonic
_BOM = b"\xef\xbb\xbf"


class _Nothing:
    """The accumulator of a stream that cannot be read (not SSE, or an unknown encoding)."""

    def __call__(self, event: bytes, data: bytes) -> None:
        pass

    def outcome(self) -> Outcome:
        return Outcome()


class Finisher:
    """Records one streamed call exactly once, from whichever path ends the stream first."""

    __slots__ = (
        "_accumulator",
        "_background",
        "_call",
        "_context",
        "_decoding",
        "_done",
        "_guard",
        "_head",
        "_parse",
        "_parser",
        "_plan",
        "_renewal",
        "_started",
        "feed",
        "loop",
        "renew_at",
    )  # fmt: skip

    def __init__(
        self,
        guard: Guard,
        call: GuardedCallLike,
        plan: Plan,
        accumulator: Accumulator | None,
        *,
        encoding: str | None,
        started: float,
        loop: asyncio.AbstractEventLoop,
        background: set[asyncio.Task[None]],
        renewal: float,
    ) -> None:
        self._guard, self._call, self._plan, self.loop, self._background = guard, call, plan, loop, background
        self._started, self._renewal = started, renewal
        self.renew_at = _monotonic() + renewal
        """When to renew the reservation's lease (`extend`): the tap compares it with the clock."""
        self._context = contextvars.copy_context()
        self._done = False
        self._accumulator: Accumulator = accumulator or _Nothing()
        self._parser = SSEParser(self._accumulator)
        self._head = b""
        self._parse: Callable[[bytes], None] = self._opening
        """Where the body's (decoded) bytes go: `_opening` for the first ones, then the parser."""
        self._decoding = accumulator is not None and encoding not in (None, "identity")
        self.feed: Callable[[bytes], None] = self._opening
        """Look at one raw chunk of the body."""
        if self._decoding:
            self.feed = self._decoding_feed(encoding)

    def _opening(self, chunk: bytes) -> None:
        """The body's first bytes: a byte order mark is dropped (the SSE specification), and every
        later chunk goes straight to the parser."""
        head = self._head + chunk
        if len(head) < 3 and _BOM.startswith(head):
            self._head = head  # what may be the start of a mark: wait for more
            return
        self._head = b""
        self._parse = self._parser.feed
        if not self._decoding:
            self.feed = self._parse
        self._parse(head[3:] if head[:3] == _BOM else head)

    def _decoding_feed(self, encoding: str | None) -> Callable[[bytes], None]:
        if encoding not in ("gzip", "deflate"):
            logger.warning("llm-spend: cannot read a %s-encoded stream; its usage is unknown", encoding)
            self._accumulator = _Nothing()
            return _ignore
        # deflate: with its zlib header, else raw, as httpx reads it
        decoder = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
        first = encoding == "deflate"

        def decoding_feed(chunk: bytes) -> None:
            nonlocal decoder, first
            try:
                decoded = decoder.decompress(chunk)
            except zlib.error:
                if not first:
                    raise
                decoder = zlib.decompressobj(-zlib.MAX_WBITS)
                decoded = decoder.decompress(chunk)
            first = False
            self._parse(decoded)

        return decoding_feed

    def feed_all(self, chunks: list[bytes]) -> None:
        """Look at a body read in full already, as the taps look at each chunk."""
        try:
            for chunk in chunks:
                self.feed(chunk)
        except Exception:
            self.broken()

    @property
    def done(self) -> bool:
        return self._done

    def broken(self) -> None:
        """Reading the body failed (a body that cannot be decoded, or a bug): stop looking at
        chunks, record unknown usage."""
        logger.exception("llm-spend: reading a captured stream failed; its usage is unknown")
        self._accumulator = _Nothing()
        self.feed = _ignore

    async def extend(self) -> None:
        """Renew the reservation's lease, for `renewal` seconds more of streaming."""
        self.renew_at = _monotonic() + self._renewal
        await renew(self._call)

    async def finish(self, *, raise_budget: bool = False) -> None:
        """Record now (on the loop, awaited, shielded from cancellation); a no-op after the first."""
        if self._done:
            return
        self._done = True
        task = self._spawn(raise_budget)
        await asyncio.shield(task)

    def finish_later(self) -> None:
        """Record soon, from any thread, without waiting (a stream collected without being closed)."""
        if self._done:
            return
        self._done = True
        try:
            self.loop.call_soon_threadsafe(self._spawn, False)
        except RuntimeError:
            logger.warning("llm-spend: a captured stream outlived its event loop; its call is not recorded")

    def extend_soon(self) -> None:
        """Renew the lease without waiting for it (from the loop's own thread, which must not block)."""
        self.renew_at = _monotonic() + self._renewal
        self._task(self.extend())

    def _spawn(self, raise_budget: bool) -> asyncio.Task[None]:
        return self._task(self._record(raise_budget))

    def _task(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work, context=self._context)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _record(self, raise_budget: bool) -> None:
        try:
            self._parser.close()
            outcome = self._accumulator.outcome()
        except Exception:
            logger.exception("llm-spend: reading a captured stream failed; its usage is unknown")
            outcome = Outcome()
        latency_ms = round((time.perf_counter() - self._started) * 1000)
        await settle(
            self._guard,
            self._call,
            self._plan,
            outcome,
            source="stream",
            stream=True,
            latency_ms=latency_ms,
            raise_budget=raise_budget,
        )


async def renew(call: GuardedCallLike) -> None:
    """Renew a call's reservation lease while its answer comes; a failure is logged, not raised."""
    try:
        await call.extend()
    except Exception:
        logger.exception("llm-spend: renewing a reservation's lease failed")


def _ignore(chunk: bytes) -> None:
    pass


class TappedAsyncStream:
    """The body of an async streamed response, tapped (mixed with the package's AsyncByteStream)."""

    def __init__(self, inner: Any, finisher: Finisher) -> None:
        self._inner = inner
        self._iterator: AsyncIterator[bytes] | None = None
        self._finisher = finisher

    def __aiter__(self) -> TappedAsyncStream:
        self._iterator = self._inner.__aiter__()
        return self

    async def __anext__(self) -> bytes:
        finisher = self._finisher
        try:
            chunk: bytes = await self._iterator.__anext__()  # type: ignore[union-attr]
        except StopAsyncIteration:
            await finisher.finish(raise_budget=True)
            raise
        except BaseException:
            await finisher.finish()
            raise
        try:
            finisher.feed(chunk)
        except Exception:
            finisher.broken()
        if _monotonic() >= finisher.renew_at:
            await finisher.extend()
        return chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            await self._finisher.finish()

    def __del__(self) -> None:
        self._finisher.finish_later()


class TappedSyncStream:
    """The body of a sync streamed response, tapped (mixed with the package's SyncByteStream).

    Recording runs on the tracker's event loop; this thread waits for it.
    """

    def __init__(self, inner: Any, finisher: Finisher) -> None:
        self._inner = inner
        self._iterator: Iterator[bytes] | None = None
        self._finisher = finisher

    def __iter__(self) -> TappedSyncStream:
        self._iterator = iter(self._inner)
        return self

    def __next__(self) -> bytes:
        finisher = self._finisher
        try:
            chunk: bytes = next(self._iterator)  # type: ignore[arg-type]
        except StopIteration:
            self._finish(raise_budget=True)
            raise
        except BaseException:
            self._finish()
            raise
        try:
            finisher.feed(chunk)
        except Exception:
            finisher.broken()
        if _monotonic() >= finisher.renew_at:
            if running_loop() is finisher.loop:  # never block the loop's own thread
                finisher.extend_soon()
            else:
                run_after(finisher.loop, finisher.extend())
        return chunk

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._finish()

    def _finish(self, *, raise_budget: bool = False) -> None:
        finisher = self._finisher
        if finisher.done:
            return
        if running_loop() is finisher.loop:  # never block the loop's own thread
            finisher.finish_later()
            return
        run_after(finisher.loop, finisher.finish(raise_budget=raise_budget))

    def __del__(self) -> None:
        finisher = self._finisher
        if finisher.done:
            return
        if finisher.loop.is_running():
            finisher.finish_later()
        else:  # its loop stopped or closed: a thread of its own records it, as `run_on` does
            threading.Thread(
                target=run_after, args=(finisher.loop, finisher.finish()), name="llm-spend-late-stream"
            ).start()
