"""Capture: record every LLM call made through an httpx or httpx2 client, streaming included.

Provider shapes stop here: the adapters (`openai`, `anthropic`, `gemini`) turn requests and responses
into `CallInfo`, `Outcome` and the canonical `Usage`; the transport (`transport`) knows no field
names. Nothing here imports the tracker, budgets or storage: the tracker hands in what it needs
(`TrackerLike`), and httpx / httpx2 are imported only when a transport is first built.
"""

from __future__ import annotations

from .anthropic import async_budget_middleware, budget_middleware, spend_error
from .base import CallInfo, Outcome
from .calls import GuardedCallLike, TrackerLike
from .clients import async_client, async_transport, sync_client, sync_transport
from .options import CaptureOptions
from .routes import Router, provider_from_host, resolve_route
from .sse import SSEParser

__all__ = [
    "CallInfo",
    "CaptureOptions",
    "GuardedCallLike",
    "Outcome",
    "Router",
    "SSEParser",
    "TrackerLike",
    "async_budget_middleware",
    "async_client",
    "async_transport",
    "budget_middleware",
    "provider_from_host",
    "resolve_route",
    "spend_error",
    "sync_client",
    "sync_transport",
]
