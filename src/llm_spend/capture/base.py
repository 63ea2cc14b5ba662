"""What every provider adapter gives the transport, and the helpers they share.

An adapter turns one provider's request and response shapes into provider-neutral facts: a `CallInfo`
before the call (model, stream, an upper bound of the input tokens, the max output tokens) and an
`Outcome` after it (canonical `Usage`, the model the response names, its id and service tier). Only
the adapters know field names; the transport knows none.

The input bound is the byte length of the JSON request body: UTF-8 bytes of text bound its BPE tokens,
the JSON keys around each message outweigh the chat template's few tokens per message, and tool
schemas count as their JSON bytes. Inline or linked media (images, audio, files) cannot be bounded by
bytes: each such part counts as `media_allowance` tokens instead, the documented limit of the
guarantee, less the characters of the part's strings (never more than its bytes, so the bound stays
an upper bound), and a request with tools gets `TOOLS_ALLOWANCE` more for the provider's tool-use
prompt.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Annotated, Any, NamedTuple, Protocol, TypeAlias

from ..usage import MAX_TOKENS, Usage, clean_text

_orjson: ModuleType | None
try:  # the extra [fast]: 2-3 times faster to read the JSON of requests and responses
    import orjson as _orjson
except ImportError:  # pragma: no cover - the stdlib does the same, slower
    _orjson = None
_msgspec: ModuleType | None
try:  # the extra [fast]: a response's usage read without building the rest of it (`view`)
    import msgspec as _msgspec
except ImportError:  # pragma: no cover - the whole body is read instead
    _msgspec = None

__all__ = [
    "MEDIA_ALLOWANCE",
    "TOOLS_ALLOWANCE",
    "Accumulator",
    "Adapter",
    "CallInfo",
    "Count",
    "Outcome",
    "Text",
    "View",
    "event_type",
    "input_bound",
    "integer",
    "limit",
    "load_json",
    "make_outcome",
    "make_usage",
    "read",
    "text",
    "view",
]

logger = logging.getLogger("llm_spend")

MEDIA_ALLOWANCE = 3_000
"""Tokens counted for each image, audio or file part of a request (its bytes bound nothing)."""
TOOLS_ALLOWANCE = 1_000
"""Tokens counted once for a request with tools: the provider's own tool-use instructions."""
_TEMPLATE_ALLOWANCE = 16
"""Tokens counted once per request for the chat template around the reply."""
_MEDIA_MARKERS = re.compile(rb'"(?:image|audio|file|document|inline|input_)')
"""How every media type (`_MEDIA_TYPES`) and media key (`_MEDIA_KEYS`) starts, quote included: the
quote makes the search fast (a regex that starts with one literal byte skips to it), where searching
each marker anywhere took about 20 times longer than parsing the JSON. A body that spells a media
type with a JSON escape for its first letter is not seen as media."""
_SEARCHED = 1024
"""Bodies up to this many bytes are searched for `_MEDIA_MARKERS` before they are walked; longer ones
are walked at once: the search tries every quote (on 96 kB of quoted text, 3 times orjson's parse),
the walk every value, never a string's characters."""
_MEDIA_TYPES = frozenset(
    ("image", "image_url", "input_image", "audio", "input_audio", "file", "input_file", "document")
)
_MEDIA_KEYS = frozenset(("inlineData", "inline_data", "fileData", "file_data"))


class CallInfo(NamedTuple):
    """What the request body says about the call, before it is sent."""

    model: str | None
    """None when the body names none (an Azure deployment path may, a Gemini path always does)."""
    stream: bool
    max_output_tokens: int | None
    """All choices together; None when the request sets no limit."""
    choices: int = 1
    """How many answers the request asks for (OpenAI's ``n``, Gemini's ``candidateCount``): with no
    limit set, each may run to the context window."""


class Outcome(NamedTuple):
    """What the response says about the call. `usage` is None when no usage arrived."""

    usage: Usage | None = None
    model: str | None = None
    response_id: str | None = None
    service_tier: str | None = None


class Accumulator(Protocol):
    """Collects one stream's events (as `SSEParser` delivers them) into an `Outcome`."""

    def __call__(self, event: bytes, data: bytes) -> None: ...

    def outcome(self) -> Outcome: ...


class Adapter(Protocol):
    """One provider's request and response shapes. Stateless; one instance serves every call."""

    name: str
    default_provider: str
    """The provider id recorded (and priced) when the configuration names none."""
    response_view: View
    """Reads the keys of a complete response body that `outcome` reads (`view`), or None."""

    def kind(self, method: str, path: str) -> str | None:
        """The billed endpoint this request goes to, or None (then the request passes untouched)."""
        ...

    def call_info(self, kind: str, path: str, body: Mapping[str, Any]) -> CallInfo:
        """Read the parsed request body (and the path, for models named there)."""
        ...

    def with_stream_usage(self, kind: str, body: dict[str, Any]) -> bool:
        """Ask a stream to report its usage at the end when it would not; True if `body` changed."""
        ...

    def set_max_output(self, kind: str, body: dict[str, Any], tokens: int) -> bool:
        """Lower the request's max output tokens (for `clamp_max_tokens`); True if `body` changed."""
        ...

    def outcome(self, kind: str, body: Any) -> Outcome:
        """Read a complete (non-stream) response body."""
        ...

    def accumulator(self, kind: str) -> Accumulator:
        """A fresh collector for one streamed response."""
        ...


def event_type(data: bytes) -> bytes:
    """The "type" of a JSON event when it comes first (for hosts that send no `event:` lines), or b""."""
    at = data.find(b'"type"', 0, 16)
    if at < 0:
        return b""
    start = data.find(b'"', at + 6, at + 16)
    if start < 0 or data[at + 6 : start].strip(b" :") != b"":
        return b""
    end = data.find(b'"', start + 1, start + 80)
    return data[start + 1 : end] if end > 0 else b""


def load_json(data: bytes) -> Any:
    """Decode JSON, or None when it is not JSON (a stream chunk cut short, an HTML error page) or is
    nested too deeply to decode.

    With orjson installed it decodes; what it refuses (NaN, Infinity, a byte order mark, a lone
    surrogate escape, nesting past 1,024 levels) the stdlib decides. One difference remains, past
    any real payload: an integer beyond 64 bits is a float from orjson (which `integer` reads as 0,
    as any count that is not an int) and an int from the stdlib (which `Usage` refuses)."""
    if _orjson is not None:
        try:
            return _orjson.loads(data)
        except ValueError:
            pass
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


View: TypeAlias = Callable[[bytes], Any] | None
"""A decoder of the keys of a JSON body that an adapter reads (see `view`), or None."""

_COUNTS = None if _msgspec is None else _msgspec.Meta(ge=-(2**63), le=2**63 - 1)
Count: TypeAlias = Annotated[int, _COUNTS] | None
"""A token count in a `view`: null, or a signed 64-bit integer (which orjson, too, reads as an int)."""
Text: TypeAlias = str | None
"""An identifier (model, id, tier) in a `view`."""


def view(shape: type) -> View:
    """A decoder of a JSON body into `shape`, a TypedDict of the keys an adapter reads (nested ones
    too, with `Count` and `Text` leaves), the others skipped unbuilt; None without msgspec.

    It reads a response's usage in half the instructions of a whole parse. Every value it keeps is
    the one `load_json` gives at the same place, so an adapter reads the same facts from either, as
    long as `shape` names every key the adapter reads (tests/test_capture_views.py checks it); a
    body that does not fit the shape (a count that is a float, a string or outside the signed 64-bit
    range; a value of another type; not JSON at all) makes it raise, and `read` parses it whole."""
    if _msgspec is None:
        return None
    return _msgspec.json.Decoder(shape).decode  # type: ignore[no-any-return]


def read(data: bytes, shape: View) -> Any:
    """The keys of a JSON body that `shape` (a `view`) names, or the whole body when it does not fit
    or there is no view: what `load_json` gives, for every key an adapter reads.

    The view skips the strings it does not keep without checking their UTF-8, which the whole parse
    refuses when it is not valid: a body that is not ASCII is checked first (a decode: on 2 kB, less
    than the view saves)."""
    if shape is not None and (data.isascii() or _utf8(data)):
        try:
            return shape(data)
        except (ValueError, RecursionError):  # msgspec's errors are ValueErrors
            pass
    return load_json(data)


def _utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def integer(value: object) -> int:
    """A token count from a payload: a non-negative int as it is, an absent one (None) as 0, and
    anything else (a float, a string, a negative number) as `NOT_A_COUNT`, which makes the usage it
    goes into unknown (`make_usage`), never a cheaper call."""
    if type(value) is int and value >= 0:
        return value
    return 0 if value is None else NOT_A_COUNT


NOT_A_COUNT = -(2**80)
"""Below any sum of counts a payload can hold (each within 64 bits), so a sum with it stays negative."""


def limit(value: object) -> int | None:
    """A max-tokens setting from a request: a non-negative int, else None (no limit)."""
    return value if type(value) is int and value >= 0 else None


def text(value: object, limit: int = 200) -> str | None:
    """A short identifier from a payload (model, id, tier) that the database can store, or None."""
    return clean_text(value, limit)


_new_tuple = tuple.__new__


def make_outcome(usage: Usage | None, model: object, response_id: object, tier: object) -> Outcome:
    """The `Outcome` of a response, with `text` of its model, id (200 characters at most) and service
    tier (64), in one call (a NamedTuple's own constructor costs twice as much). What every answer
    sends, ASCII without NUL that is not blank, is checked inline (`isascii` reads a flag; the search
    for NUL is a `memchr`); anything else by `text`. A tier of "batch" is not believed: a call made
    through the transport is a live one, and "batch" would price it at Batch API rates."""
    return _new_tuple(
        Outcome,
        (
            usage,
            model
            if type(model) is str and 0 < len(model) <= 200 and model.isascii() and "\x00" not in model
            and model.strip()
            else text(model, 200),
            response_id
            if type(response_id) is str and 0 < len(response_id) <= 200 and response_id.isascii()
            and "\x00" not in response_id and response_id.strip()
            else text(response_id, 200),
            tier
            if type(tier) is str and 0 < len(tier) <= 64 and tier.isascii() and "\x00" not in tier
            and tier.strip() and tier != "batch"
            else None if tier is None or tier == "batch" else text(tier, 64),
        ),
    )  # fmt: skip


def not_counted(provider: str) -> None:
    """Log a usage made unknown by a token count that is not one (see `integer`)."""
    logger.warning("llm-spend: %s reported a token count that is not one; usage unknown", provider)


def make_usage(
    provider: str,
    input_tokens: int,
    output_tokens: int,
    cache_read_tokens: int = 0,
    cache_write_tokens: int = 0,
    cache_write_1h_tokens: int = 0,
    reasoning_tokens: int = 0,
) -> Usage | None:
    """A canonical Usage, or None (logged) when the provider's numbers contradict each other."""
    try:
        return Usage(  # by position: a third faster than by name
            input_tokens,
            output_tokens,
            cache_read_tokens,
            cache_write_tokens,
            cache_write_1h_tokens,
            reasoning_tokens,
        )
    except ValueError as error:
        counts = (input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cache_write_1h_tokens)
        if min(*counts, reasoning_tokens) < 0:
            not_counted(provider)
        else:
            logger.warning(
                "llm-spend: %s reported usage that does not add up (%s); usage unknown", provider, error
            )
        return None


def input_bound(body: bytes, parsed: Mapping[str, Any], media_allowance: int) -> int:
    """An upper bound of the input tokens of a JSON request (see the module docstring)."""
    size = len(body) + _TEMPLATE_ALLOWANCE
    if parsed.get("tools") or parsed.get("functions"):
        size += TOOLS_ALLOWANCE
    if len(body) > _SEARCHED or _MEDIA_MARKERS.search(body) is not None:
        characters, parts = _media(parsed)
        size += parts * media_allowance - characters
    return min(max(size, 0), MAX_TOKENS)


def _media(body: Any) -> tuple[int, int]:
    """(characters of the strings in the media parts, number of media parts) of a parsed request.

    A character takes at least one byte of the JSON body, so the characters never exceed the bytes
    the parts take. Walked with a list, not by recursion: a body nested as deep as a parser allows
    (orjson: 1,024 levels) must not exhaust the interpreter's stack."""
    characters = parts = 0
    pending = [body]
    while pending:
        value = pending.pop()
        if type(value) is list:
            pending += value
        elif type(value) is dict:
            kind = value.get("type")  # in a tool's JSON schema, also a list or an object
            if (type(kind) is str and kind in _MEDIA_TYPES) or not _MEDIA_KEYS.isdisjoint(value):
                parts += 1
                characters += _characters(value)
            else:
                pending += value.values()
    return characters, parts


def _characters(part: dict[str, Any]) -> int:
    """The characters of every key and string in a media part (lengths: an image's base64 is not read)."""
    total = 0
    pending: list[Any] = [part]
    while pending:
        value = pending.pop()
        if type(value) is str:
            total += len(value)
        elif type(value) is list:
            pending += value
        elif type(value) is dict:
            total += sum(map(len, value))
            pending += value.values()
    return total
