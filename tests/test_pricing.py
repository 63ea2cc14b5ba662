"""Pricer: exact agreement with genai-prices' calc_price, price context, bounds, unknowns, caches."""

from __future__ import annotations

import logging
import random
import warnings
from datetime import UTC, datetime
from decimal import Decimal
from importlib.metadata import version

import genai_prices
import pytest
from genai_prices.data import providers as bundled_providers

from llm_spend.money import to_nanousd
from llm_spend.price_rates import ceilings, max_rate
from llm_spend.pricing import Cost, Pricer
from llm_spend.usage import Usage

AT = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
"""After the table's price variants (service tiers, batch) start on 2026-10-12 and 2026-10-14."""


@pytest.fixture(scope="module")
def pricer() -> Pricer:
    return Pricer()


def genai_usage(usage: Usage) -> genai_prices.Usage:
    """Our Usage in genai-prices' terms, as pricing.py documents the mapping; zero keys are left out."""
    values = {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_read_tokens": usage.cache_read_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
        "output_reasoning_tokens": usage.reasoning_tokens,
    }
    if usage.cache_write_1h_tokens:
        values["cache_write_1h_tokens"] = usage.cache_write_1h_tokens
        values["cache_write_5m_tokens"] = usage.cache_write_tokens - usage.cache_write_1h_tokens
    return genai_prices.Usage(**{key: value for key, value in values.items() if value})


def reference(
    provider: str,
    model: str,
    usage: Usage,
    *,
    at: datetime = AT,
    service_tier: str | None = None,
    batch: bool = False,
) -> int:
    """genai-prices' own price of the call, in nano-USD."""
    context = {"service_tier": service_tier} if service_tier is not None else {}
    if batch:
        context["processing"] = "batch"
    calculation = genai_prices.calc_price(
        genai_usage(usage),
        model,
        provider_id=provider,
        genai_request_timestamp=at,
        price_context=context or None,
    )
    return to_nanousd(calculation.total_price)


def assert_matches(
    pricer: Pricer,
    provider: str,
    model: str,
    usage: Usage,
    *,
    at: datetime = AT,
    service_tier: str | None = None,
    batch: bool = False,
) -> Cost:
    """Price the call with both and require the same nano-USD; return our Cost."""
    cost = pricer.price(provider, model, usage, at=at, service_tier=service_tier, batch=batch)
    assert cost.status == "priced"
    assert cost.amount is not None and cost.nanousd == to_nanousd(cost.amount)
    assert cost.nanousd == reference(provider, model, usage, at=at, service_tier=service_tier, batch=batch)
    return cost


def test_plain_input_output_matches_genai_prices(pricer: Pricer) -> None:
    """Input and output tokens price as in genai-prices, with the exact USD amount and the table's version."""
    cost = assert_matches(pricer, "openai", "gpt-4o", Usage(input_tokens=1200, output_tokens=300))
    assert cost.amount == Decimal("0.006")  # 1200 * $2.50/M + 300 * $10/M
    assert cost.nanousd == 6_000_000
    assert cost.source == f"genai-prices {version('genai-prices')}"
    assert cost.model_id == "gpt-4o"


def test_dated_model_ids_price_as_their_base_model(pricer: Pricer) -> None:
    """Dated snapshot ids from provider responses resolve to the base model and price like it."""
    usage = Usage(input_tokens=5000, output_tokens=700)
    dated = assert_matches(pricer, "openai", "gpt-4o-mini-2024-07-18", usage)
    assert dated.model_id == "gpt-4o-mini"
    assert dated.nanousd == pricer.price("openai", "gpt-4o-mini", usage, at=AT).nanousd
    claude = assert_matches(pricer, "anthropic", "claude-3-5-sonnet-20241022", usage)
    assert claude.model_id == "claude-3-5-sonnet"


@pytest.mark.parametrize(
    ("provider", "model"),
    [("openai", "gpt-4o"), ("openai", "gpt-5-mini"), ("anthropic", "claude-sonnet-4-5")],
)
def test_cache_reads_are_billed_at_the_cache_read_rate(pricer: Pricer, provider: str, model: str) -> None:
    """Cache reads, a subset of input, are billed at their own rate and cost less than plain input."""
    cached = assert_matches(pricer, provider, model, Usage(input_tokens=10_000, cache_read_tokens=8_000))
    plain = assert_matches(pricer, provider, model, Usage(input_tokens=10_000))
    assert cached.amount is not None and plain.amount is not None and cached.amount < plain.amount


def test_cache_writes_split_into_5_minute_and_1_hour(pricer: Pricer) -> None:
    """1-hour cache writes are billed at cache_write_1h_mtok and the rest at the 5-minute rate."""
    model = "claude-sonnet-4-5"
    five_minutes = assert_matches(pricer, "anthropic", model, Usage(20_000, 500, cache_write_tokens=12_000))
    mixed = assert_matches(
        pricer, "anthropic", model, Usage(20_000, 500, cache_write_tokens=12_000, cache_write_1h_tokens=5_000)
    )
    all_hour = assert_matches(
        pricer,
        "anthropic",
        model,
        Usage(20_000, 500, cache_write_tokens=12_000, cache_write_1h_tokens=12_000),
    )
    assert five_minutes.amount is not None and mixed.amount is not None and all_hour.amount is not None
    assert five_minutes.amount < mixed.amount < all_hour.amount
    assert mixed.amount - five_minutes.amount == 5_000 * (Decimal(6) - Decimal("3.75")) / 1_000_000


@pytest.mark.parametrize(
    ("provider", "model"), [("openai", "o3"), ("openai", "gpt-5"), ("openai", "o4-mini")]
)
def test_reasoning_tokens_are_billed_as_output(pricer: Pricer, provider: str, model: str) -> None:
    """Reasoning tokens are part of output and cost what output costs on models without a reasoning price."""
    with_reasoning = assert_matches(pricer, provider, model, Usage(2_000, 9_000, reasoning_tokens=8_000))
    without = assert_matches(pricer, provider, model, Usage(2_000, 9_000))
    assert with_reasoning.nanousd == without.nanousd


def test_reasoning_tokens_have_their_own_rate_where_the_table_has_one(pricer: Pricer) -> None:
    """A model with an output_reasoning_mtok price (Perplexity sonar-deep-research) bills reasoning apart."""
    with_reasoning = assert_matches(
        pricer, "perplexity", "sonar-deep-research", Usage(1_000, 9_000, 0, 0, 0, 8_000)
    )
    without = assert_matches(pricer, "perplexity", "sonar-deep-research", Usage(1_000, 9_000))
    assert with_reasoning.nanousd != without.nanousd


@pytest.mark.parametrize(
    ("provider", "model"),
    [("google", "gemini-2.5-pro"), ("gemini", "gemini-2.5-pro"), ("anthropic", "claude-sonnet-4-5")],
)
def test_long_context_tier_applies_to_all_tokens_past_200k_input(
    pricer: Pricer, provider: str, model: str
) -> None:
    """Past 200k input tokens the tier rate applies to every token of the call, as genai-prices tiers work."""
    at_limit = assert_matches(pricer, provider, model, Usage(200_000, 1_000, cache_read_tokens=50_000))
    past = assert_matches(pricer, provider, model, Usage(200_001, 1_000, cache_read_tokens=50_000))
    assert past.amount is not None and at_limit.amount is not None
    assert past.amount > at_limit.amount * Decimal("1.4")
    assert_matches(pricer, provider, model, Usage(900_000, 20_000, 100_000, 0))


@pytest.mark.parametrize(
    ("model", "tier"),
    [
        ("gpt-4o", "priority"),
        ("gpt-5", "priority"),
        ("gpt-5", "flex"),
        ("o3", "flex"),
        ("gpt-5-mini", "default"),
    ],
)
def test_service_tiers_select_their_price_variant(pricer: Pricer, model: str, tier: str) -> None:
    """service_tier selects the table's variant: priority costs more, flex less, default the same."""
    usage = Usage(input_tokens=30_000, output_tokens=2_000, cache_read_tokens=10_000)
    tiered = assert_matches(pricer, "openai", model, usage, service_tier=tier)
    standard = assert_matches(pricer, "openai", model, usage)
    assert tiered.amount is not None and standard.amount is not None
    expected = {"priority": tiered.amount > standard.amount, "flex": tiered.amount < standard.amount}
    assert expected.get(tier, tiered.amount == standard.amount)


def test_service_tier_variants_apply_only_from_their_start_date(pricer: Pricer) -> None:
    """Before the table's priority variant starts (2026-10-12), priority is billed at standard rates."""
    before = datetime(2026, 10, 1, tzinfo=UTC)
    usage = Usage(input_tokens=30_000, output_tokens=2_000)
    priority = assert_matches(pricer, "openai", "gpt-4o", usage, at=before, service_tier="priority")
    assert priority.nanousd == pricer.price("openai", "gpt-4o", usage, at=before).nanousd


@pytest.mark.parametrize(
    ("provider", "model"),
    [("openai", "gpt-4o"), ("anthropic", "claude-sonnet-4-5"), ("google", "gemini-2.5-pro")],
)
def test_batch_uses_the_batch_price(pricer: Pricer, provider: str, model: str) -> None:
    """batch=True selects the processing=batch variant, half the standard price on these models."""
    usage = Usage(input_tokens=40_000, output_tokens=4_000)
    batched = assert_matches(pricer, provider, model, usage, batch=True)
    standard = assert_matches(pricer, provider, model, usage)
    assert batched.amount is not None and standard.amount is not None
    assert batched.amount * 2 == standard.amount


def test_service_tier_and_batch_combine(pricer: Pricer) -> None:
    """A call may carry both a service tier and batch; both context keys are matched, as in genai-prices."""
    assert_matches(
        pricer, "openai", "gpt-5", Usage(40_000, 4_000, 1_000), service_tier="priority", batch=True
    )


def test_date_conditional_prices_follow_the_request_date(pricer: Pricer) -> None:
    """o3's price dropped on 2025-06-10: a call is priced with the prices in force on its UTC date."""
    usage = Usage(input_tokens=10_000, output_tokens=5_000)
    before = assert_matches(pricer, "openai", "o3", usage, at=datetime(2025, 6, 9, 23, 59, tzinfo=UTC))
    after = assert_matches(pricer, "openai", "o3", usage, at=datetime(2025, 6, 10, 0, 1, tzinfo=UTC))
    assert before.amount == Decimal("0.3")  # 10k * $10/M + 5k * $40/M
    assert after.amount == Decimal("0.06")  # 10k * $2/M + 5k * $8/M


def test_time_of_day_prices_follow_the_request_time(pricer: Pricer) -> None:
    """DeepSeek's off-peak discount depends on the UTC time of day; a naive datetime counts as UTC."""
    usage = Usage(input_tokens=10_000, output_tokens=5_000, cache_read_tokens=3_000)
    peak = assert_matches(
        pricer, "deepseek", "deepseek-chat", usage, at=datetime(2026, 11, 20, 8, tzinfo=UTC)
    )
    off_peak = assert_matches(pricer, "deepseek", "deepseek-chat", usage, at=datetime(2026, 11, 20, 20))
    assert peak.amount is not None and off_peak.amount is not None and off_peak.amount < peak.amount


def test_context_is_ignored_for_a_model_borrowed_from_another_provider(pricer: Pricer) -> None:
    """Azure prices gpt-4o from OpenAI's list, and genai-prices ignores the service tier there: so do we."""
    usage = Usage(input_tokens=10_000, output_tokens=1_000)
    borrowed = assert_matches(pricer, "azure", "gpt-4o", usage, service_tier="priority", batch=True)
    assert borrowed.nanousd == assert_matches(pricer, "azure", "gpt-4o", usage).nanousd


REAL_MODELS = [
    ("openai", "gpt-4o-2024-08-06"),
    ("openai", "gpt-4.1-mini-2025-04-14"),
    ("openai", "gpt-5"),
    ("openai", "o4-mini"),
    ("openai", "text-embedding-3-small"),
    ("anthropic", "claude-sonnet-4-5-20250929"),
    ("anthropic", "claude-opus-4-1-20250805"),
    ("anthropic", "claude-3-5-haiku-20241022"),
    ("anthropic", "claude-haiku-4-5"),
    ("google", "gemini-2.5-flash"),
    ("gemini", "gemini-2.0-flash"),
    ("gemini", "gemini-2.5-flash-lite"),
    ("google", "claude-sonnet-4-5"),
    ("deepseek", "deepseek-reasoner"),
    ("openrouter", "openai/gpt-4o"),
    ("openrouter", "anthropic/claude-sonnet-4.5"),
    ("groq", "llama-3.3-70b-versatile"),
    ("groq", "openai/gpt-oss-120b"),
    ("mistral", "mistral-large-latest"),
    ("xai", "grok-3-mini"),
    ("azure", "gpt-4o-mini"),
    ("aws", "anthropic.claude-3-5-sonnet-20241022-v2:0"),
]


@pytest.mark.parametrize(("provider", "model"), REAL_MODELS, ids=[f"{p}:{m}" for p, m in REAL_MODELS])
def test_real_model_ids_price_as_genai_prices(pricer: Pricer, provider: str, model: str) -> None:
    """Real model ids across providers and OpenAI-compatible hosts price exactly as in genai-prices."""
    for usage in (
        Usage(12_345, 678),
        Usage(50_000, 9_000, cache_read_tokens=20_000, cache_write_tokens=10_000, reasoning_tokens=4_000),
        Usage(
            250_000, 30_000, cache_read_tokens=100_000, cache_write_tokens=20_000, cache_write_1h_tokens=7_000
        ),
    ):
        assert_matches(pricer, provider, model, usage)


def test_every_model_in_the_bundled_table_prices_as_genai_prices() -> None:
    """For each model of every provider in the table, at three dates with random usage and context."""
    pricer, rng, checked = Pricer(), random.Random(7), 0
    dates = [datetime(2025, 1, 1, tzinfo=UTC), datetime(2026, 6, 1, 2, tzinfo=UTC), AT]
    for provider in bundled_providers:
        for model in provider.models:
            usage, tier, batch = random_usage(rng), rng.choice([None, "priority", "flex"]), rng.random() < 0.3
            at = rng.choice(dates)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    expected = reference(provider.id, model.id, usage, at=at, service_tier=tier, batch=batch)
            except LookupError:  # a few ids in the table do not match their own matcher
                continue
            cost = pricer.price(provider.id, model.id, usage, at=at, service_tier=tier, batch=batch)
            assert cost.nanousd == expected, (provider.id, model.id, usage, at, tier, batch)
            checked += 1
    assert checked > 2000


def random_usage(rng: random.Random) -> Usage:
    """A consistent random usage, sometimes with cache reads, writes (5m and 1h), reasoning, long context."""
    input_tokens = rng.choice([0, 7, 3_000, 128_001, 200_000, 200_001, 272_001, 1_000_000])
    cache_read = rng.randint(0, input_tokens) if rng.random() < 0.5 else 0
    cache_write = rng.randint(0, input_tokens - cache_read) if rng.random() < 0.5 else 0
    cache_write_1h = rng.randint(0, cache_write) if rng.random() < 0.5 else 0
    output_tokens = rng.choice([0, 1, 800, 64_000])
    reasoning = rng.randint(0, output_tokens) if rng.random() < 0.5 else 0
    return Usage(input_tokens, output_tokens, cache_read, cache_write, cache_write_1h, reasoning)


def test_unknown_model_has_no_cost_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    """An unknown model (or provider) gives no amount, never $0, and one warning however often priced."""
    pricer = Pricer()
    with caplog.at_level(logging.WARNING, logger="llm_spend"):
        first = pricer.price("openai", "gpt-imaginary-9", Usage(10, 10), at=AT)
        second = pricer.price("openai", "gpt-imaginary-9", Usage(20, 20), at=AT)
    assert first == second == Cost(None, None, "unknown_model", None, None)
    assert [record.levelno for record in caplog.records] == [logging.WARNING]
    assert "gpt-imaginary-9" in caplog.records[0].getMessage()
    assert pricer.price("no-such-cloud", "gpt-4o", Usage(10, 10), at=AT).status == "unknown_model"
    assert pricer.bound("openai", "gpt-imaginary-9", input_tokens=1, output_tokens=1, at=AT).amount is None


def test_usage_that_genai_prices_rejects_is_unknown_usage(caplog: pytest.LogCaptureFixture) -> None:
    """A usage that bypassed validation (cache reads above input) is not priced: unknown_usage, no amount."""
    usage = Usage(input_tokens=100, output_tokens=10)
    object.__setattr__(usage, "cache_read_tokens", 500)
    with pytest.raises(ValueError):
        reference("openai", "gpt-4o", usage)
    with caplog.at_level(logging.WARNING, logger="llm_spend"):
        cost = Pricer().price("openai", "gpt-4o", usage, at=AT)
    assert cost == Cost(None, None, "unknown_usage", None, None)
    assert len(caplog.records) == 1


def test_provider_names_are_case_insensitive_and_aliases_resolve(pricer: Pricer) -> None:
    """ "OpenAI" is openai, "gemini" is genai-prices' google and "xai" is x-ai."""
    usage = Usage(1_000, 100)
    assert pricer.price("OpenAI", "gpt-4o", usage, at=AT) == pricer.price("openai", "gpt-4o", usage, at=AT)
    assert pricer.price("Gemini", "gemini-2.5-flash", usage, at=AT).model_id == "gemini-2.5-flash"
    assert pricer.price("xai", "grok-3-mini", usage, at=AT).status == "priced"


BOUND_MODELS = [
    ("openai", "gpt-4o"),
    ("openai", "gpt-5"),
    ("openai", "o3"),
    ("anthropic", "claude-sonnet-4-5"),
    ("anthropic", "claude-3-5-haiku-20241022"),
    ("google", "gemini-2.5-pro"),
    ("deepseek", "deepseek-chat"),
    ("perplexity", "sonar-pro"),
    ("perplexity", "sonar-deep-research"),
    ("azure", "gpt-4o"),
]


def test_bound_is_never_below_the_price(pricer: Pricer) -> None:
    """Whatever cache split, tier, batch or time of day the call ends up with, bound() >= price()."""
    rng = random.Random(20261120)
    for _ in range(3000):
        provider, model = rng.choice(BOUND_MODELS)
        usage, at = (
            random_usage(rng),
            datetime(2026, 11, 20, rng.randrange(24), rng.randrange(60), tzinfo=UTC),
        )
        tier, batch = rng.choice([None, "default", "priority", "flex", "fast"]), rng.random() < 0.3
        cost = pricer.price(provider, model, usage, at=at, service_tier=tier, batch=batch)
        limit = pricer.bound(
            provider,
            model,
            input_tokens=usage.input_tokens + rng.choice([0, 0, 5_000]),
            output_tokens=usage.output_tokens + rng.choice([0, 100]),
            at=at,
        )
        assert cost.nanousd is not None and limit.nanousd is not None and limit.amount is not None
        assert limit.amount >= (cost.amount or 0) and limit.nanousd >= cost.nanousd, (
            provider,
            model,
            usage,
            tier,
        )


def test_every_bound_in_the_bundled_table_rounds_its_amount_to_the_nano_dollar() -> None:
    """A bound is worked out in integers: its nano-USD is its exact amount rounded half-even, for
    every model of the table, token counts on and past the tier starts, on dates of different prices."""
    pricer, rng, checked = Pricer(), random.Random(20261208), 0
    for provider in bundled_providers:
        for model in provider.models:
            at = rng.choice([datetime(2025, 1, 1, tzinfo=UTC), AT])
            tokens = rng.choice([(0, 0), (7, 3), (200_000, 1), (200_001, 64_000), (10**6, 10**6)])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cost = pricer.bound(
                    provider.id, model.id, input_tokens=tokens[0], output_tokens=tokens[1], at=at
                )
            if cost.amount is None:
                continue
            assert cost.nanousd == to_nanousd(cost.amount), (provider.id, model.id, tokens, at)
            assert cost.amount >= 0
            checked += 1
    assert checked > 1500


def test_bound_uses_the_highest_rate_the_input_can_reach(pricer: Pricer) -> None:
    """Claude Sonnet 4.5: 1-hour cache writes ($6/M) bound short input; past 200k, its long-context tier."""
    short = pricer.bound("anthropic", "claude-sonnet-4-5", input_tokens=1_000, output_tokens=0, at=AT)
    assert short.amount == Decimal("0.006")
    long = pricer.bound("anthropic", "claude-sonnet-4-5", input_tokens=300_000, output_tokens=0, at=AT)
    assert long.amount == 300_000 * Decimal(12) / 1_000_000
    assert long.status == "priced" and long.model_id == "claude-sonnet-4-5"


def test_the_ceilings_give_the_highest_rate_any_tier_the_input_reaches() -> None:
    """`max_rate` over `ceilings` (made once per model and day) is the highest rate of the tiers
    whose start the input passes, as scanning every tier finds it, for tiers in any order and rates
    that fall as well as rise past a start."""
    rng = random.Random(20261207)
    for _ in range(2000):
        rates = tuple(
            (rng.choice([-1, -1, 0, 128_000, 200_000, 272_000]), Decimal(rng.randrange(1, 50)) / 10**7)
            for _ in range(rng.randrange(0, 9))
        )
        ceiling = ceilings(rates)
        for n in (0, 1, 128_000, 128_001, 200_000, 250_000, 272_001, 10**6):
            every = [rate for start, rate in rates if n > start]
            assert max_rate(ceiling, n) == max(every, default=Decimal(0)), (rates, n)


def test_bound_covers_the_priority_tier(pricer: Pricer) -> None:
    """gpt-4o's bound prices input and output at the priority tier's rates, the highest it has."""
    limit = pricer.bound("openai", "gpt-4o", input_tokens=1_000_000, output_tokens=1_000_000, at=AT)
    assert limit.amount == Decimal("4.25") + Decimal(17)


def test_caches_are_bounded() -> None:
    """Model strings come from responses: the resolution, rate and warning caches never exceed their limit."""
    pricer = Pricer(max_entries=16)
    for number in range(200):
        pricer.price("openai", f"gpt-unknown-{number}", Usage(1, 1), at=AT)
        pricer.price("openai", "gpt-4o", Usage(1, 1), at=AT, service_tier=f"tier-{number}")
        pricer.bound("openai", "o3", input_tokens=1, output_tokens=1, at=datetime(2025, 1, 1 + number % 28))
    assert len(pricer._entries) <= 16
    assert len(pricer._rates) <= 16
    assert len(pricer._limits) <= 16
    assert len(pricer._warned) <= 16
    assert pricer.price("openai", "gpt-4o", Usage(1_000, 0), at=AT).amount == Decimal("0.0025")


def test_context_window_comes_from_the_table(pricer: Pricer) -> None:
    """gpt-4o has a 128k context window; an unknown model has none."""
    assert pricer.context_window("openai", "gpt-4o") == 128_000
    assert pricer.context_window("openai", "gpt-4o-2024-08-06") == 128_000
    assert pricer.context_window("openai", "gpt-imaginary-9") is None
