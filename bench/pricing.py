"""Pricing one call: llm-spend's Pricer (warm) next to genai-prices' calc_price, medians, same run."""

from __future__ import annotations

import functools
import statistics
import timeit
from collections.abc import Callable
from datetime import UTC, datetime

from genai_prices import Usage as GenaiUsage
from genai_prices import calc_price

from llm_spend.pricing import Pricer
from llm_spend.usage import Usage

CASES = [
    ("openai", "gpt-4o-mini-2024-07-18", Usage(input_tokens=1200, output_tokens=300, cache_read_tokens=512)),
    ("anthropic", "claude-sonnet-4-5", Usage(input_tokens=5000, output_tokens=400, cache_write_tokens=1000)),
    ("google", "gemini-2.5-pro", Usage(input_tokens=250_000, output_tokens=2000)),
]
NUMBER, REPEAT = 2_000, 7


def median_us(call: Callable[[], object], number: int) -> float:
    return statistics.median(t / number * 1e6 for t in timeit.repeat(call, number=number, repeat=REPEAT))


def genai_usage(usage: Usage) -> GenaiUsage:
    fields = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
    return GenaiUsage(**{name: getattr(usage, name) for name in fields if getattr(usage, name)})


def main() -> None:
    pricer, at = Pricer(), datetime.now(UTC)
    print("pricing one call (µs, median of 7 runs)")
    print(f"  {'model':<28}{'Pricer.price':>14}{'calc_price':>12}{'ratio':>8}")
    for provider, model, usage in CASES:
        pricer.price(provider, model, usage, at=at)  # the first call resolves and compiles the model
        theirs = genai_usage(usage)
        ours = median_us(functools.partial(pricer.price, provider, model, usage, at=at), NUMBER)
        base = median_us(
            functools.partial(calc_price, theirs, model, provider_id=provider, genai_request_timestamp=at),
            200,
        )
        print(f"  {model:<28}{ours:>14.2f}{base:>12.2f}{base / ours:>7.0f}x")


if __name__ == "__main__":
    main()
