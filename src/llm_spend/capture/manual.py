"""Manual streams: a stream's usage collected by hand, from provider events or from known totals.

`tracker.track_stream(...)` yields a `ManualStream`. Feed it the provider's stream events as dicts
(`s.event(chunk.model_dump())`): the same accumulators as the transport read them, so the same rules
hold (OpenAI's final usage chunk, Anthropic's last cumulative message_delta, Gemini's last
usageMetadata). Or give the totals with `s.usage(...)`, which win over events.

google-genai's `chunk.model_dump()` names fields the Python way (`usage_metadata`,
`prompt_token_count`), not as the wire does (`usageMetadata`): a Gemini event's keys are read in
either spelling.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..usage import Usage
from . import anthropic, gemini, openai
from .base import Accumulator, Adapter, Outcome

__all__ = ["ManualStream"]

_ADAPTERS: dict[str, tuple[Adapter, str]] = {
    "anthropic": (anthropic.ADAPTER, "messages"),
    "google": (gemini.ADAPTER, "generate"),
    "gemini": (gemini.ADAPTER, "generate"),
}


class ManualStream:
    """Collects one stream's usage; recorded once when the `track_stream` block exits."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self._accumulator: Accumulator | None = None
        self._usage: Usage | None = None
        self.events = 0

    def event(self, payload: Mapping[str, Any]) -> None:
        """One provider stream event, as the SDK's chunk object dumped to a dict."""
        if not isinstance(payload, Mapping):
            raise ValueError(
                f"event must be a mapping (e.g. chunk.model_dump()), got {type(payload).__name__}"
            )
        kind_of = payload.get("type")
        if self._accumulator is None:
            adapter, kind = _ADAPTERS.get(self.provider.lower(), (openai.ADAPTER, "chat"))
            if adapter is openai.ADAPTER and isinstance(kind_of, str) and kind_of.startswith("response."):
                kind = "responses"
            self._accumulator = adapter.accumulator(kind)
        if self._accumulator.__class__ is gemini.GenerateStream:
            payload = _camel_keys(payload)
        try:
            name = kind_of.encode() if isinstance(kind_of, str) else b""
            data = json.dumps(payload, default=str).encode()
        except (TypeError, ValueError) as exc:  # keys that are not strings, text no JSON holds
            raise ValueError(f"event must be a JSON object of the provider's event: {exc}") from None
        self._accumulator(name, data)
        self.events += 1

    def usage(self, usage: Usage | None = None, **tokens: int) -> None:
        """The stream's totals, when you know them (a Usage, or its fields as keywords)."""
        if usage is not None and tokens:
            raise ValueError("give either a Usage or token keywords, not both")
        if usage is not None and not isinstance(usage, Usage):
            raise ValueError(f"usage must be a llm_spend.Usage, got {type(usage).__name__}")
        if unknown := sorted(set(tokens) - set(Usage.__slots__)):
            raise ValueError(f"usage takes the token counts {', '.join(Usage.__slots__)}; got {unknown[0]!r}")
        self._usage = usage if usage is not None else Usage(**tokens)

    def outcome(self) -> tuple[Outcome, bool]:
        """What was collected, and whether it came from `usage()` (else from events, or nothing)."""
        if self._usage is not None:
            return Outcome(usage=self._usage), True
        if self._accumulator is not None:
            return self._accumulator.outcome(), False
        return Outcome(), False


def _camel_keys(value: Any) -> Any:
    """`value` as the Gemini API's JSON has it: every mapping's snake_case keys in camelCase
    (``usage_metadata`` -> ``usageMetadata``), and no key whose value is None (a dump names every
    field, the API none it did not set: a chunk's ``finish_reason=None`` is no finish)."""
    if isinstance(value, Mapping):
        return {
            _camel(key) if isinstance(key, str) else key: _camel_keys(item)
            for key, item in value.items()
            if item is not None
        }
    if isinstance(value, list | tuple):
        return [_camel_keys(item) for item in value]
    return value


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest) if rest and head else key
