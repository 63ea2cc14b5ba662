"""OpenTelemetry: a recorded call's GenAI attributes land on the current span, and in the counters."""

from __future__ import annotations

import sys
from decimal import Decimal
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llm_spend import Tracker
from llm_spend.otel import instrument


async def test_recorded_call_sets_genai_attributes_and_metrics(tmp_path: Path) -> None:
    """Inside a span, track() adds gen_ai.usage.* and the cost to it; token and cost counters grow."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    async with Tracker(f"sqlite+aiosqlite:///{tmp_path / 'l.db'}") as tracker:
        stop = instrument(tracker, meter_provider=MeterProvider(metric_readers=[reader]))
        with provider.get_tracer("test").start_as_current_span("request"):
            record = await tracker.track(
                provider="openai", model="gpt-4o", input_tokens=1000, output_tokens=100, cache_read_tokens=200
            )
        stop()
        await tracker.track(provider="openai", model="gpt-4o", input_tokens=1, output_tokens=1)  # not emitted
    [span] = spans.get_finished_spans()
    attributes = dict(span.attributes or {})
    assert attributes["gen_ai.usage.input_tokens"] == 1000 and attributes["gen_ai.usage.output_tokens"] == 100
    assert attributes["gen_ai.usage.cache_read.input_tokens"] == 200
    assert attributes["gen_ai.provider.name"] == "openai" and attributes["gen_ai.request.model"] == "gpt-4o"
    assert Decimal(str(attributes["gen_ai.usage.cost"])) == record.cost
    data = reader.get_metrics_data()
    points = {
        (metric.name, dict(point.attributes or {}).get("gen_ai.token.type")): point
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        for point in metric.data.data_points
    }
    inputs, outputs = (
        points[("gen_ai.client.token.usage", "input")],
        points[("gen_ai.client.token.usage", "output")],
    )
    assert (inputs.count, inputs.sum, outputs.count, outputs.sum) == (1, 1000, 1, 100)
    assert list(inputs.explicit_bounds[:4]) == [1, 4, 16, 64]  # the semantic convention's buckets
    assert abs(points[("llm_spend.cost", None)].value - float(record.cost or 0)) < 1e-12


async def test_without_a_span_only_metrics_are_recorded(tmp_path: Path) -> None:
    """Outside any span the call is still recorded and counted; nothing fails."""
    reader = InMemoryMetricReader()
    async with Tracker(f"sqlite+aiosqlite:///{tmp_path / 'l.db'}") as tracker:
        stop = instrument(tracker, meter_provider=MeterProvider(metric_readers=[reader]))
        record = await tracker.track(provider="openai", model="gpt-4o-mini", input_tokens=10, output_tokens=2)
        stop()
    assert record.cost is not None
    names = {
        m.name
        for rm in reader.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert names == {"gen_ai.client.token.usage", "llm_spend.cost"}


async def test_a_call_with_unknown_usage_is_not_emitted_as_zero_tokens(tmp_path: Path) -> None:
    """A billed stream that ended without usage: its span has no gen_ai.usage.* token attributes (not
    zeros) but says pricing_status unknown_usage, and the token histogram counts only known calls."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    async with Tracker(f"sqlite+aiosqlite:///{tmp_path / 'l.db'}") as tracker:
        instrument(tracker, meter_provider=MeterProvider(metric_readers=[reader]))
        with provider.get_tracer("test").start_as_current_span("cut short"):
            async with tracker.track_stream(provider="openai", model="gpt-4o"):
                pass  # the stream ended before its usage chunk
        await tracker.track(provider="openai", model="gpt-4o", input_tokens=7, output_tokens=3)
    [span] = spans.get_finished_spans()
    attributes = dict(span.attributes or {})
    assert not [name for name in attributes if name.startswith("gen_ai.usage.")]
    assert attributes["llm_spend.pricing_status"] == "unknown_usage"
    data = reader.get_metrics_data()
    assert data is not None
    points = [
        (dict(point.attributes or {})["gen_ai.token.type"], point.count, point.sum)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == "gen_ai.client.token.usage"
        for point in metric.data.data_points
    ]
    assert sorted(points) == [("input", 1, 7), ("output", 1, 3)]


def test_a_missing_extra_is_a_clear_import_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without opentelemetry-api installed, instrument() says which extra to install."""
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(ImportError, match=r"pip install 'llm-spend\[otel\]'"):
        instrument(Tracker(f"sqlite+aiosqlite:///{tmp_path / 'l.db'}"))
