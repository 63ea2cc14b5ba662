"""An incremental Server-Sent Events parser for tapping provider streams without buffering them.

`SSEParser.feed(chunk)` takes network chunks as they come (an event may be split across any number of
chunks, a chunk may hold many events) and hands each complete event to a sink as ``(event, data)``
bytes: ``event`` is the value of the ``event:`` field (``b""`` when absent) and ``data`` the ``data:``
lines joined with ``b"\\n"``. Lines end with LF, CRLF or a lone CR (a CRLF split across two chunks
counts once); comment lines (``:``) and the ``id:`` / ``retry:`` fields are ignored. Nothing is
decoded here: a sink checks bytes cheaply and decodes JSON only for the few events that carry usage.

`close()` ends the stream leniently: a last line without its newline and an event without its
terminating blank line are still delivered, since a provider closing right after its final event must
not lose the usage it carried.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["EventSink", "SSEParser"]

EventSink = Callable[[bytes, bytes], None]
"""Receives one event: ``(event name or b"", data)``."""

_NL = b"\n"
_CR = b"\r"


class SSEParser:
    """Feed it raw stream bytes; it calls `sink(event, data)` once per complete event."""

    __slots__ = ("_cr", "_data", "_event", "_sink", "_tail")

    def __init__(self, sink: EventSink) -> None:
        self._sink = sink
        self._tail = b""
        """The start of a line whose end has not arrived yet."""
        self._event = b""
        self._data: list[bytes] = []
        self._cr = False
        """The previous chunk ended with CR: a LF opening the next chunk completes a CRLF."""

    def feed(self, chunk: bytes) -> None:
        """Parse one network chunk (bytes of the body, in order, as received)."""
        if self._cr:
            self._cr = False
            if chunk[:1] == _NL:
                chunk = chunk[1:]
        if _CR in chunk:
            self._cr = chunk[-1:] == _CR
            chunk = chunk.replace(b"\r\n", _NL).replace(_CR, _NL)
        if self._tail:
            chunk = self._tail + chunk
        lines = chunk.split(_NL)
        self._tail = lines.pop()
        for line in lines:
            self._line(line)

    def close(self) -> None:
        """End of stream: deliver what a stream cut right after its last event still holds."""
        if self._tail:
            tail, self._tail = self._tail, b""
            self._line(tail)
        self._line(b"")

    def _line(self, line: bytes) -> None:
        if not line:
            if self._data:
                data = self._data[0] if len(self._data) == 1 else _NL.join(self._data)
                event = self._event
                self._data = []
                self._event = b""
                self._sink(event, data)
            else:
                self._event = b""
            return
        if line[0] == 58:  # b":": a comment, e.g. a keep-alive
            return
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value
