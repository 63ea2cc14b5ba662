"""An incremental Server-Sent Events parser for tapping provider streams without buffering them.

`SSEParser.feed(chunk)` takes network chunks as they come (an event may be split across any number of
chunks, a chunk may hold many events) and hands each complete event to a sink as ``(event, data)``
bytes: ``event`` is the value of the ``event:`` field (``b""`` when absent) and ``data`` the ``data:``
lines joined with ``b"\\n"``. Lines end with LF, CRLF or a lone CR (a CRLF split across two chunks
counts once); comment lines (``:``) and the ``id:`` / ``retry:`` fields are ignored. Nothing is
decoded here: a sink checks bytes cheaply and decodes JSON only for the few events that carry usage.

Only the unfinished event is kept between chunks. The common shapes, one ``data:`` line with or
without one ``event:`` line before it, alone in their chunk, take a fast path of a few C-level bytes
operations.

`close()` ends the stream leniently: an event without its terminating blank line (or its last
newline) is still delivered, since a provider closing right after its final event must not lose the
usage it carried.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["EventSink", "SSEParser"]

EventSink = Callable[[bytes, bytes], None]
"""Receives one event: ``(event name or b"", data)``."""

_NL = b"\n"
_CR = b"\r"
_END = b"\n\n"
_CRLF_END = b"\r\n\r\n"
_DATA = b"data: "
_EVENT = b"event: "


class SSEParser:
    """Feed it raw stream bytes; it calls `sink(event, data)` once per complete event."""

    __slots__ = ("_cr", "_sink", "_tail")

    def __init__(self, sink: EventSink) -> None:
        self._sink = sink
        self._tail = b""
        """The start of an event whose terminating blank line has not arrived yet."""
        self._cr = False
        """The previous chunk ended with CR: a LF opening the next chunk completes a CRLF."""

    def feed(self, chunk: bytes) -> None:
        """Parse one network chunk (bytes of the body, in order, as received)."""
        if not self._tail and not self._cr:
            # A chunk that is exactly one event of a common shape: one `data:` line ended by LF LF
            # (OpenAI) or CRLF CRLF (Gemini), or one `event:` line then one `data:` line (Anthropic,
            # OpenAI responses). Checked with slices and `in` with an int (a memchr): bytes methods
            # parse their arguments as a tuple, and `find` or `startswith` cost three to four times
            # a slice compared.
            head = chunk[:6]
            if head == _DATA:
                end = 2 if chunk[-2:] == _END else 4 if chunk[-4:] == _CRLF_END else 0
                if end:
                    data = chunk[6:-end]
                    if 10 not in data and 13 not in data:
                        self._sink(b"", data)
                        return
            elif head == b"event:" and chunk[6:7] == b" " and 13 not in chunk:
                line, _, rest = chunk.partition(_NL)
                data = rest[6:-2]
                if rest[:6] == _DATA and rest[-2:] == _END and 10 not in data:
                    self._sink(line[7:], data)
                    return
        if self._cr:
            self._cr = False
            if chunk[:1] == _NL:
                chunk = chunk[1:]
        if 13 in chunk:
            self._cr = chunk[-1:] == _CR
            chunk = chunk.replace(b"\r\n", _NL).replace(_CR, _NL)
        if self._tail:
            chunk = self._tail + chunk
        blocks = chunk.split(_END)
        self._tail = blocks.pop()
        for block in blocks:
            self._block(block)

    def close(self) -> None:
        """End of stream: deliver what a stream cut right after its last event still holds."""
        tail, self._tail = self._tail, b""
        if tail:
            self._block(tail.rstrip(_NL))

    def _block(self, block: bytes) -> None:
        """One event's lines, without the blank line that ended it."""
        if block[:6] == _DATA and 10 not in block:
            self._sink(b"", block[6:])
            return
        if block[:7] == _EVENT:
            name_end = block.find(_NL)
            if name_end > 0 and block[name_end + 1 : name_end + 7] == _DATA and block.count(_NL) == 1:
                self._sink(block[7:name_end], block[name_end + 7 :])
                return
        self._lines(block)

    def _lines(self, block: bytes) -> None:
        event, data = b"", []
        for line in block.split(_NL):
            if not line or line[0] == 58:  # an empty line (after a CR) or a b":" comment
                continue
            name, colon, value = line.partition(b":")
            if colon and value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                data.append(value)
            elif name == b"event":
                event = value
        if data:
            self._sink(event, data[0] if len(data) == 1 else _NL.join(data))
