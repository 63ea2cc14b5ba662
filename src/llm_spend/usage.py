"""Canonical, provider-neutral types: `Usage`, `Estimate`, `CallRecord`.

Token counts follow the OpenTelemetry GenAI convention, whatever the provider reports:

- ``input_tokens`` is ALL input, including cache reads and cache writes.
- ``cache_read_tokens`` and ``cache_write_tokens`` are subsets of ``input_tokens``;
  ``cache_write_1h_tokens`` is the part of ``cache_write_tokens`` written with a 1-hour TTL
  (the rest were written with the default 5-minute TTL).
- ``output_tokens`` is ALL output, including reasoning; ``reasoning_tokens`` is a subset of it.

Capture adapters convert provider shapes into these types; nothing downstream knows providers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Literal, cast

__all__ = [
    "MAX_TOKENS",
    "CallRecord",
    "Estimate",
    "PricingStatus",
    "Usage",
    "UsageSource",
    "new_event_id",
]

MAX_TOKENS = 10**9
"""Token counts above this are rejected as implausible for one call."""

PricingStatus = Literal["priced", "unknown_model", "unknown_usage"]
UsageSource = Literal["response", "stream", "manual", "estimate", "unknown"]


def check_tokens(name: str, value: object) -> int:
    """Validate one token count; raises ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value}")
    if value > MAX_TOKENS:
        raise ValueError(f"{name} of {value} is implausible for one call (limit {MAX_TOKENS})")
    return value


def check_text(name: str, value: object, limit: int) -> str:
    """Validate a non-empty string of at most `limit` characters; raises ValueError naming the field."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if len(value) > limit:
        raise ValueError(f"{name} must be at most {limit} characters, got {len(value)}")
    if "\x00" in value or not (value.isascii() or _encodable(value)):
        raise ValueError(f"{name} must not hold NUL characters or lone surrogates, got {value!r}")
    return value


def check_optional_text(name: str, value: object, limit: int) -> str | None:
    """None, or a string `check_text` accepts."""
    return None if value is None else check_text(name, value, limit)


MAX_LATENCY_MS = 2**31 - 1
"""The ledger's latency_ms column is a 32-bit integer (24.8 days)."""

USAGE_SOURCES: tuple[UsageSource, ...] = ("response", "stream", "manual", "estimate", "unknown")


def check_latency(latency_ms: object) -> int | None:
    """None, or a latency in milliseconds the ledger can store; raises ValueError naming it."""
    if latency_ms is None or (type(latency_ms) is int and 0 <= latency_ms <= MAX_LATENCY_MS):
        return latency_ms
    if isinstance(latency_ms, int) and not isinstance(latency_ms, bool) and 0 <= latency_ms <= MAX_LATENCY_MS:
        return int(latency_ms)  # an int subclass (an IntEnum) as a plain int
    raise ValueError(
        f"latency_ms must be None or an integer from 0 to {MAX_LATENCY_MS:,} (milliseconds), "
        f"got {latency_ms!r}"
    )


def clean_text(value: object, limit: int) -> str | None:
    """A short identifier from a provider's payload (model, id, tier) that the database can store,
    or None: a string of 1 to `limit` characters, not blank, with no NUL or lone surrogate."""
    if (
        type(value) is str
        and 0 < len(value) <= limit
        and value.strip()
        and "\x00" not in value
        and (value.isascii() or _encodable(value))
    ):
        return value
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate: no database can store it
        return False
    return True


@dataclass(frozen=True, slots=True, init=False)
class Usage:
    """Token counts of one call, in the canonical convention of this module."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0

    def __init__(
        self,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        cache_write_1h_tokens: int = 0,
        reasoning_tokens: int = 0,
    ) -> None:
        # Written by hand, not by dataclass: a frozen dataclass sets each field with
        # object.__setattr__, which made a Usage cost 3.3 µs; the slots' own setters take 1.2.
        if not (  # the common case in one expression; _checked does the rest
            type(input_tokens) is int
            and type(output_tokens) is int
            and type(cache_read_tokens) is int
            and type(cache_write_tokens) is int
            and type(cache_write_1h_tokens) is int
            and type(reasoning_tokens) is int
            and cache_read_tokens >= 0
            and 0 <= cache_write_1h_tokens <= cache_write_tokens
            and cache_read_tokens + cache_write_tokens <= input_tokens <= MAX_TOKENS
            and 0 <= reasoning_tokens <= output_tokens <= MAX_TOKENS
        ):
            counts = _checked(
                input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
                cache_write_1h_tokens, reasoning_tokens,
            )  # fmt: skip
            for setter, count in zip(_SETTERS, counts, strict=True):
                setter(self, count)
            return
        _set_input(self, input_tokens)
        _set_output(self, output_tokens)
        _set_cache_read(self, cache_read_tokens)
        _set_cache_write(self, cache_write_tokens)
        _set_cache_write_1h(self, cache_write_1h_tokens)
        _set_reasoning(self, reasoning_tokens)


_Setter = Callable[[Usage, int], None]
_SETTERS = tuple(cast(_Setter, vars(Usage)[name].__set__) for name in Usage.__slots__)
_set_input, _set_output, _set_cache_read, _set_cache_write, _set_cache_write_1h, _set_reasoning = _SETTERS
"""The setters of Usage's slots (its fields in order), which a frozen class may call on itself."""


def _checked(*counts: int) -> tuple[int, int, int, int, int, int]:
    """Counts the fast check did not pass: plain ints when they are valid (an int subclass such as
    an IntEnum member is one), else the ValueError that names what is wrong (each checked first)."""
    input_tokens, output_tokens, read, write, cache_write_1h_tokens, reasoning_tokens = (
        int(check_tokens(name, count)) for name, count in zip(Usage.__slots__, counts, strict=True)
    )
    if read + write > input_tokens:
        raise ValueError(
            f"cache_read_tokens + cache_write_tokens ({read} + {write}) must not exceed "
            f"input_tokens ({input_tokens})"
        )
    if cache_write_1h_tokens > write:
        raise ValueError(
            f"cache_write_1h_tokens ({cache_write_1h_tokens}) must not exceed cache_write_tokens ({write})"
        )
    if reasoning_tokens > output_tokens:
        raise ValueError(
            f"reasoning_tokens ({reasoning_tokens}) must not exceed output_tokens ({output_tokens})"
        )
    return input_tokens, output_tokens, read, write, cache_write_1h_tokens, reasoning_tokens


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a call may cost at most, known before it is sent: an upper bound on its tokens."""

    provider: str
    model: str
    input_tokens: int
    max_output_tokens: int


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One recorded LLM call, as stored in the ledger (`llm_calls`)."""

    event_id: str
    occurred_at: datetime
    provider: str
    model: str
    usage: Usage
    cost: Decimal | None
    """USD, or None when the price (or the usage) is unknown. Never a silent $0."""
    cost_nanousd: int | None
    pricing_status: PricingStatus
    price_source: str | None
    usage_source: UsageSource
    stream: bool = False
    latency_ms: int | None = None
    service_tier: str | None = None
    provider_response_id: str | None = None
    request_id: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)

    @property
    def input_tokens(self) -> int:
        return self.usage.input_tokens

    @property
    def output_tokens(self) -> int:
        return self.usage.output_tokens


_MS_BITS = (1 << 48) - 1
_RAND_B_BITS = (1 << 62) - 1


def new_event_id() -> str:
    """A UUIDv7 (time-ordered, RFC 9562) string: the call's idempotency key."""
    rand = int.from_bytes(os.urandom(10))
    value = (time.time_ns() // 1_000_000 & _MS_BITS) << 80 | (0x7000 | rand >> 68) << 64
    value |= 0b10 << 62 | rand & _RAND_B_BITS
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
