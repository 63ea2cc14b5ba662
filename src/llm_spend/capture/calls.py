"""One captured call: what the tracker must provide, the request's plan, and recording the outcome.

`TrackerLike` is all that capture needs from the tracker: ``guard(...)``, an async context manager that
reserves before the call when a block-mode budget applies (raising `BudgetExceeded` or
`UnknownPriceError` before any byte leaves) and yields a `GuardedCallLike` to record on. Leaving the
guard without a record releases the reservation (a non-2xx answer, a failed send). A tracker may also
say that it never reserves (``reserves = False``, as `llm_spend.Tracker` does without a block-mode
budget): capture then does not work out the input bound, which nothing would read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import zlib
from collections.abc import Awaitable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

from ..exceptions import BudgetExceeded
from ..usage import Usage, UsageSource
from .base import Adapter, Outcome, input_bound, load_json

__all__ = [
    "GuardedCallLike",
    "Plan",
    "TrackerLike",
    "decode_body",
    "leave",
    "outcome_of",
    "plan_call",
    "record",
    "request_model",
    "settle",
]

logger = logging.getLogger("llm_spend")

Guard = AbstractAsyncContextManager["GuardedCallLike"]


class GuardedCallLike(Protocol):
    """A call inside ``tracker.guard()`` (llm_spend.guarded.GuardedCall)."""

    def record(
        self,
        usage: Usage | None,
        *,
        model: str | None = None,
        usage_source: UsageSource = "manual",
        stream: bool = False,
        latency_ms: int | None = None,
        service_tier: str | None = None,
        provider_response_id: str | None = None,
    ) -> Awaitable[object]: ...

    def extend(self) -> Awaitable[None]: ...


class TrackerLike(Protocol):
    """What capture needs from the tracker (llm_spend.Tracker has it)."""

    def guard(
        self,
        *,
        provider: str,
        model: str,
        input_tokens: int,
        max_output_tokens: int | None = None,
        tags: Mapping[str, object] | None = None,
        choices: int = 1,  # passed only when not 1
    ) -> AbstractAsyncContextManager[GuardedCallLike]: ...


@dataclass(slots=True)
class Plan:
    """A captured request, read once: where it goes and what it may cost."""

    adapter: Adapter
    kind: str
    provider: str
    path: str
    model: str | None
    """"unknown" when the request names none; None until it is needed (`request_model`)."""
    stream: bool
    input_bound: int
    """0 when it was not worked out (the tracker does not reserve)."""
    max_output_tokens: int | None
    body: dict[str, Any] | None
    """The parsed JSON body, when it parsed (for rewrites)."""
    rewritten: bytes | None = None
    """The body to send instead of the caller's, when it was changed."""
    choices: int = 1
    """How many answers the request asks for (`CallInfo.choices`)."""
    raw: bytes = b""
    """The body as the caller sent it, when it was not parsed before the call (`request_model`
    reads it if the answer names no model)."""


_EMPTY: Mapping[str, Any] = MappingProxyType({})
_STREAM_KEY = b'"stream"'
_ESCAPE = b"\\u"
_SHORT_BODY = 4096
"""Bodies up to this many bytes are searched for `_STREAM_KEY` and `_ESCAPE` instead of parsed
before the call when nothing else needs them parsed: the two searches cost over 1 ns a byte, the
parse about 0.5 ns a byte and 4 µs more in place (docs/performance.md, twenty-ninth session)."""


def plan_call(
    adapter: Adapter,
    kind: str,
    provider: str,
    path: str,
    raw: bytes,
    include_stream_usage: bool,
    media_allowance: int | None,
) -> Plan:
    """Read the request body once: model, stream flag, max output tokens and an input bound.

    A tracker that does not reserve (`media_allowance` None) needs none of them before the call
    unless the call may be a stream, by its path (Gemini's ``:streamGenerateContent``) or its body's
    top-level keys (a stream request may have to be rewritten). A short body (`_SHORT_BODY`) whose
    bytes hold neither ``"stream"`` nor a ``\\u`` escape (with which a key can spell it) has no
    such key, and is not parsed before the call; any other is parsed, and planned from if it asks
    for a stream. Either way `request_model` reads the model from it when the answer names none."""
    if (
        media_allowance is None
        and "stream" not in path
        and len(raw) <= _SHORT_BODY
        and _STREAM_KEY not in raw
        and _ESCAPE not in raw
    ):
        return Plan(adapter, kind, provider, path, None, False, 0, None, None, raw=raw)
    body = _parsed(raw)
    if media_allowance is None and "stream" not in path and (body is None or "stream" not in body):
        return Plan(adapter, kind, provider, path, None, False, 0, None, body)
    info = adapter.call_info(kind, path, body or _EMPTY)
    plan = Plan(
        adapter,
        kind,
        provider,
        path,
        info.model or "unknown",
        info.stream,
        0 if media_allowance is None else input_bound(raw, body or _EMPTY, media_allowance),
        info.max_output_tokens,
        body,
        choices=info.choices,
    )
    if body is not None and include_stream_usage and info.stream and adapter.with_stream_usage(kind, body):
        plan.rewritten = encode(body)
    return plan


def _parsed(raw: bytes) -> dict[str, Any] | None:
    """A request body as a JSON object, or None (empty, not JSON, or not an object)."""
    body = load_json(raw) if raw else None
    return body if isinstance(body, dict) else None


def request_model(plan: Plan) -> str:
    """The model the request names ("unknown" if none), read from its parsed body when first needed."""
    if plan.model is None:
        body = plan.body if plan.body is not None else _parsed(plan.raw)  # raw: not parsed before
        plan.model = plan.adapter.call_info(plan.kind, plan.path, body or _EMPTY).model or "unknown"
    return plan.model


def clamp(plan: Plan, call: GuardedCallLike) -> None:
    """The `clamp_max_tokens` hook: a guard that grants fewer output tokens than asked lowers them.

    A guarded call that carries ``max_output_tokens`` (an int) below the request's has the request
    body rewritten to ask for that many; a guard without the attribute changes nothing.
    """
    granted = getattr(call, "max_output_tokens", None)
    if type(granted) is not int or plan.body is None:
        return
    if plan.max_output_tokens is not None and granted >= plan.max_output_tokens:
        return
    if plan.adapter.set_max_output(plan.kind, plan.body, granted):
        plan.rewritten = encode(plan.body)
        plan.max_output_tokens = granted


def encode(body: Mapping[str, Any]) -> bytes:
    """A rewritten request body: compact UTF-8 JSON, or ASCII with escapes when a string holds a
    lone surrogate (valid JSON escaped, as `json.dumps` writes it by default; no UTF-8 for it)."""
    try:
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(body, separators=(",", ":")).encode()


def decode_body(raw: bytes, encoding: str | None) -> bytes | None:
    """A response body without its Content-Encoding (gzip, deflate), or None when it cannot be."""
    if not encoding or encoding == "identity":
        return raw
    try:
        if encoding == "gzip":
            return zlib.decompress(raw, 16 + zlib.MAX_WBITS)
        if encoding == "deflate":
            try:
                return zlib.decompress(raw)
            except zlib.error:
                return zlib.decompress(raw, -zlib.MAX_WBITS)
    except zlib.error:
        pass
    logger.warning("llm-spend: cannot read a %s-encoded provider response; its usage is unknown", encoding)
    return None


def outcome_of(plan: Plan, parsed: Any) -> Outcome:
    """The outcome of a complete JSON response, parsed (`base.read`); one that did not parse (None)
    gives unknown usage."""
    if parsed is None:
        logger.warning("llm-spend: unreadable %s response (not JSON); usage unknown", plan.provider)
        return Outcome()
    try:
        return plan.adapter.outcome(plan.kind, parsed)
    except Exception:  # a provider sending something unexpected must not break the caller's call
        logger.warning("llm-spend: unreadable %s response; usage unknown", plan.provider, exc_info=True)
        return Outcome()


async def settle(
    guard: Guard,
    call: GuardedCallLike,
    plan: Plan,
    outcome: Outcome,
    *,
    source: UsageSource,
    stream: bool,
    latency_ms: int,
    raise_budget: bool,
) -> None:
    """Record the call and leave its guard (which writes the record and settles the reservation).

    A `BudgetExceeded` (a raise- or block-mode window crossed, stage "post") is raised when
    `raise_budget`, else logged; any other failure to record is logged, never raised.
    """
    record(call, plan, outcome, source=source, stream=stream, latency_ms=latency_ms)
    await leave(guard, None, raise_budget=raise_budget)


def record(
    call: GuardedCallLike, plan: Plan, outcome: Outcome, *, source: UsageSource, stream: bool, latency_ms: int
) -> None:
    """Record the call on its guard (written when the guard is left); a failure is logged, not raised.
    The model is the one the answer names, else the request's."""
    try:
        call.record(
            outcome.usage,
            model=outcome.model or request_model(plan),
            usage_source=source,
            stream=stream,
            latency_ms=latency_ms,
            service_tier=outcome.service_tier,
            provider_response_id=outcome.response_id,
        )
    except Exception:
        logger.exception("llm-spend: recording a captured call failed; recording it as an unknown model")
        with contextlib.suppress(Exception):  # a billed call is kept: with what is sure to be stored
            call.record(outcome.usage, model="unknown", usage_source=source, stream=stream)


async def leave(guard: Guard, error: BaseException | None, *, raise_budget: bool = True) -> None:
    """Exit a guard entered by hand; without a record this releases its reservation."""
    try:
        if error is None:
            await guard.__aexit__(None, None, None)
        else:
            await guard.__aexit__(type(error), error, error.__traceback__)
    except BudgetExceeded as exceeded:
        if raise_budget:
            raise
        logger.warning("llm-spend: a captured stream took a budget over its limit: %s", exceeded)
    except Exception:
        logger.exception("llm-spend: recording a captured call failed")
