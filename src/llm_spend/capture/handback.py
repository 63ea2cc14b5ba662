"""An answer capture read in full, handed back to the client to read again.

Capture reads the answer to a request for no stream before the client does, to record the call
before the SDK returns (transport.py). The client is handed the bytes (`ReadBody`); when they are
JSON with no Content-Encoding, the response also becomes an `identity_response` of its package,
whose read skips the package's decoding layer and is otherwise the package's own.
"""

from __future__ import annotations

import contextlib
import copyreg
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any, SupportsIndex

__all__ = ["ReadBody", "identity_response", "read_directly"]


class ReadBody:
    """A body read in full, handed back to the client (mixed with both of the package's byte streams).

    What httpx's ByteStream does, without an async generator per read: the event loop registers each
    async generator in a WeakSet, which cost more than the rest of the read."""

    __slots__ = ("_body", "_pending")

    def __init__(self, body: bytes) -> None:
        self._body = body
        self._pending: bytes | None = body

    def __iter__(self) -> Iterator[bytes]:
        return iter((self._body,))

    def __aiter__(self) -> ReadBody:
        self._pending = self._body
        return self

    async def __anext__(self) -> bytes:
        body = self._pending
        if body is None:
            raise StopAsyncIteration
        self._pending = None
        return body


def identity_response(module: Any) -> type[Any] | None:
    """`module`'s (httpx's or httpx2's) Response, whose read of a body that has no Content-Encoding
    iterates its stream itself, without the package's decoding layer: an async generator with a
    decoder and a chunker that pass each chunk through unchanged (38,000 instructions, 4-7 µs, of the
    82,000 capture added to a call). Capture gives it to an answer to a request for no stream that it
    read in full and found to be JSON with no Content-Encoding (`ReadBody`). Or None for a release
    whose responses it cannot be sure to leave as the package's own read does.

    The read is the package's own but for that layer: the stream is iterated to its end (a wrapper
    that an SDK put around it sees it read), then closed (which gives `elapsed`); the content is set
    and the stream marked consumed. The check below compares it with the package's own read, of a
    body that ends and of one cut short."""

    closes_cut: dict[bool, bool] = {}
    """Whether the package's read closes a response whose body failed (httpx2 does; httpx does
    not), sync (True) and async (False): the direct read does the same."""

    class IdentityResponse(module.Response):  # type: ignore[misc]
        def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
            """Pickled, and copied, as the package's own Response: this class is made at run time."""
            rebuild = copyreg._reconstructor  # type: ignore[attr-defined]  # what protocols 0 and 1 use
            return rebuild, (module.Response, object, None), self.__getstate__()

        async def aread(self) -> bytes:
            response: Any = self  # the package's Response, untyped
            if _read_before(response) or not isinstance(response.stream, module.AsyncByteStream):
                return await super().aread()  # type: ignore[no-any-return]
            response.is_stream_consumed = True
            chunks = response.stream.__aiter__()
            parts: list[bytes] = []
            try:
                async for chunk in chunks:
                    parts.append(chunk)
            except BaseException as error:
                _cut(response, error, parts)
                if closes_cut[False]:
                    await _close(chunks, response)
                raise
            await _close(chunks, response)
            return _content_of(response, parts)

        def read(self) -> bytes:
            response: Any = self
            if _read_before(response) or not isinstance(response.stream, module.SyncByteStream):
                return super().read()  # type: ignore[no-any-return]
            response.is_stream_consumed = True
            parts: list[bytes] = []
            try:
                for chunk in response.stream:
                    parts.append(chunk)
            except BaseException as error:
                _cut(response, error, parts)
                if closes_cut[True]:
                    response.close()
                raise
            response.close()
            return _content_of(response, parts)

    def _cut(response: Any, error: BaseException, parts: list[bytes]) -> None:
        """What the package's read leaves when a body fails: the bytes that came counted, and a
        network error naming its request."""
        response._num_bytes_downloaded = sum(map(len, parts))
        if isinstance(error, module.RequestError):
            with contextlib.suppress(RuntimeError):  # a response never sent by a client has no request
                error.request = response.request

    class Probe(module.SyncByteStream, module.AsyncByteStream):  # type: ignore[misc]
        def __init__(self, cut: bool) -> None:
            self.cut = cut
            self.closed = 0

        def __iter__(self) -> Iterator[bytes]:
            yield b"{"
            if self.cut:
                raise module.ReadError("cut")
            yield b"}"

        async def __aiter__(self) -> AsyncIterator[bytes]:
            for chunk in self:
                yield chunk

        def close(self) -> None:
            self.closed += 1

        async def aclose(self) -> None:
            self.closed += 1

    def read(response: Any, sync: bool) -> str:  # what the read raised, if anything
        try:
            if sync:
                response.read()
            else:
                reading = response.aread()
                try:
                    reading.send(None)  # nothing in it waits: it ends at once
                except StopIteration:
                    return ""
                reading.close()
                raise RuntimeError("the read waited")
        except module.ReadError:
            return "ReadError"
        return ""

    def state(response: Any) -> dict[str, Any]:  # what a read leaves, but the decoder it made
        return {key: value for key, value in vars(response).items() if key not in ("_decoder", "stream")}

    try:  # each read leaves a response as the package's own leaves another, its accessors agreeing
        for sync in (False, True):
            for failing in (True, False):  # the cut body first: it says whether the package closes
                theirs, ours = (
                    module.Response(200, stream=Probe(failing)),
                    module.Response(200, stream=Probe(failing)),
                )
                read_directly(ours, IdentityResponse)
                raised = read(theirs, sync)
                if failing:
                    closes_cut[sync] = theirs.is_closed
                if (
                    raised != ("ReadError" if failing else "")
                    or read(ours, sync) != raised
                    or state(ours) != state(theirs)
                    or ours.stream.closed != theirs.stream.closed
                ):
                    return None
            if not (
                ours.content == ours.read() == b"{}" and ours.num_bytes_downloaded == 2 and ours.is_closed
            ):
                return None
    except Exception:
        return None
    return IdentityResponse


def _read_before(response: Any) -> bool:
    """Whether a response was read, or its reading began, or it was closed: the package's read says
    what then happens."""
    return response.is_stream_consumed or response.is_closed or hasattr(response, "_content")


async def _close(chunks: Any, response: Any) -> None:
    """End a direct async read as the package's own ends: its body's generator closed, then the
    response (which closes the body)."""
    if isinstance(chunks, AsyncGenerator):
        await chunks.aclose()
    await response.aclose()


def _content_of(response: Any, parts: list[bytes]) -> bytes:
    body: bytes = b"".join(parts)
    response._content = body
    response._num_bytes_downloaded = len(body)
    return body


def read_directly(response: Any, identity: type[Any]) -> None:
    """Make `response` an `identity_response` of its package: its body has no Content-Encoding."""
    response.__class__ = identity
