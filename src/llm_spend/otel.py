"""OpenTelemetry: each recorded call as GenAI span attributes and metrics (extra `otel`).

    from llm_spend.otel import instrument
    instrument(tracker)          # once, at start-up

Every recorded call then sets, on the span current where it was recorded (the request's, when the app
is instrumented), the GenAI semantic-convention attributes ``gen_ai.provider.name``,
``gen_ai.request.model``, ``gen_ai.response.model``, ``gen_ai.usage.input_tokens``,
``gen_ai.usage.output_tokens``, ``gen_ai.usage.cache_read.input_tokens``,
``gen_ai.usage.cache_creation.input_tokens``, ``gen_ai.usage.reasoning.output_tokens`` and, as
proposed, ``gen_ai.usage.cost`` (USD, as a float: attributes cannot hold decimals; the ledger keeps the
exact amount). It also records each call's input and output tokens in the histogram
``gen_ai.client.token.usage`` (by ``gen_ai.token.type``, the semantic convention's metric and buckets)
and adds its cost to the counter ``llm_spend.cost`` (USD). A call whose usage is unknown (a billed
stream cut short before its usage arrived: ``usage_source`` "unknown") has no token attributes and no
histogram points, never zeros that would pass for a free call; its span still gets
``llm_spend.pricing_status`` ("unknown_usage") and it adds no cost. Nothing is sent anywhere unless the
app configured an exporter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .usage import CallRecord

if TYPE_CHECKING:
    from .tracker import Tracker

__all__ = ["instrument", "record_attributes"]


def record_attributes(record: CallRecord) -> dict[str, Any]:
    """The GenAI attributes of one recorded call."""
    usage = record.usage
    attributes: dict[str, Any] = {
        "gen_ai.provider.name": record.provider,
        "gen_ai.request.model": record.model,
        "gen_ai.response.model": record.model,
        "llm_spend.pricing_status": record.pricing_status,
    }
    if record.usage_source != "unknown":  # unknown usage is stored as zeros: they are not token counts
        attributes["gen_ai.usage.input_tokens"] = usage.input_tokens
        attributes["gen_ai.usage.output_tokens"] = usage.output_tokens
        attributes["gen_ai.usage.cache_read.input_tokens"] = usage.cache_read_tokens
        attributes["gen_ai.usage.cache_creation.input_tokens"] = usage.cache_write_tokens
        attributes["gen_ai.usage.reasoning.output_tokens"] = usage.reasoning_tokens
    if record.cost is not None:
        attributes["gen_ai.usage.cost"] = float(record.cost)
    if record.provider_response_id:
        attributes["gen_ai.response.id"] = record.provider_response_id
    return attributes


def instrument(tracker: Tracker, *, meter_provider: Any = None) -> Callable[[], None]:
    """Emit every call `tracker` records to OpenTelemetry; returns a function that stops it."""
    try:
        from opentelemetry import metrics, trace
    except ImportError:
        raise ImportError("llm_spend.otel needs opentelemetry-api: pip install 'llm-spend[otel]'") from None
    meter = (meter_provider or metrics.get_meter_provider()).get_meter("llm_spend")
    tokens = _token_histogram(meter)
    cost = meter.create_counter("llm_spend.cost", unit="USD", description="LLM spend")

    def emit(record: CallRecord) -> None:
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes(record_attributes(record))
        common = {"gen_ai.provider.name": record.provider, "gen_ai.response.model": record.model}
        if record.usage_source != "unknown":
            tokens.record(record.usage.input_tokens, {**common, "gen_ai.token.type": "input"})
            tokens.record(record.usage.output_tokens, {**common, "gen_ai.token.type": "output"})
        if record.cost is not None:
            cost.add(float(record.cost), common)

    return tracker.subscribe(emit)


_TOKEN_BUCKETS = [4**n for n in range(14)]
"""The GenAI semantic convention's advice for gen_ai.client.token.usage: 1, 4, 16, ... 67108864."""


def _token_histogram(meter: Any) -> Any:
    kwargs = {"name": "gen_ai.client.token.usage", "unit": "{token}", "description": "Tokens per LLM call"}
    try:
        return meter.create_histogram(**kwargs, explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS)
    except TypeError:  # opentelemetry-api before 1.23 takes no bucket advice
        return meter.create_histogram(**kwargs)
