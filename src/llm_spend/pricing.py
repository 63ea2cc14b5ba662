"""Pricing: what one LLM call cost, from the price table bundled with genai-prices (never updated online).

`Pricer.price` gives, to the nano-dollar, what ``genai_prices.calc_price`` gives for the same call, but
resolves each (provider, model) once and compiles its prices into a small rate table, so that pricing a
call after the first takes microseconds. A `Usage` reaches genai-prices as: input, output, cache read and
cache write tokens as they are; with ``cache_write_1h_tokens``, 1-hour writes and the rest as 5-minute
writes; reasoning tokens as ``output_reasoning_tokens``, still part of output (only a few Perplexity
models price them apart). Price context, matched exactly against ``PriceVariant.when``: ``service_tier=t``
sets ``{"service_tier": t}`` (the table knows "default", "flex", "priority", "fast") and ``batch=True``
sets ``{"processing": "batch"}``; the table's keys ``speed``, ``search_type`` and ``route`` are not set.
As in genai-prices, a variant applies only from its start date, and not to a model that the provider
borrows from another provider's list (Azure pricing OpenAI's models).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal
from importlib.metadata import version
from typing import NamedTuple, TypeVar

from genai_prices.data import providers as bundled_providers
from genai_prices.data_snapshot import find_provider_by_id
from genai_prices.data_units import unit_data
from genai_prices.types import (
    ModelInfo,
    ModelPrice,
    Provider,
    StartDateConstraint,
    TieredPrices,
    TimeOfDateConstraint,
)
from genai_prices.units import UnitRegistry

from .money import to_nanousd
from .price_layers import PricesFile, PriceTable, Rates, parse_rates, stamp
from .price_rates import (
    Compiled,
    ceilings,
    compile_prices,
    max_rate,
    nano_factors,
    priced_units,
    scale_of,
    to_nano,
    unit_rates,
)
from .usage import PricingStatus, Usage

__all__ = ["Cost", "Explanation", "Pricer"]

logger = logging.getLogger("llm_spend")

_K = TypeVar("_K")
_V = TypeVar("_V")


class Cost(NamedTuple):
    """The price of one call, or why there is none (never a silent $0)."""

    amount: Decimal | None
    """USD; None when unknown."""
    nanousd: int | None
    """`money.to_nanousd(amount)`; None when unknown."""
    status: PricingStatus
    source: str | None
    """The price table that priced the call, e.g. "genai-prices 0.2.3"."""
    model_id: str | None
    """The model id matched in the price table, e.g. "gpt-4o-mini" for "gpt-4o-mini-2024-07-18"."""


@dataclass(frozen=True, slots=True)
class Explanation:
    """How one call is priced: which layer, which entry, the rates (USD per 1M tokens), the cost."""

    provider: str
    model: str
    source: str | None
    """The layer: "override", "file <path> sha256:...", "genai-prices <version>", "fallback ..."."""
    matched: str | None
    rates: dict[str, str]
    cost: Cost


_EXPLAINED = {
    "input": "input_mtok",
    "cache_read": "cache_read_mtok",
    "cache_write": "cache_write_mtok",
    "cache_write_1h": "cache_write_1h_mtok",
    "output": "output_mtok",
}


class _Limits(NamedTuple):
    """Every input-side and output-side token rate of a model, and its highest per-request fee, as
    integer counts of 10**-scale USD (a bound is then worked out in integers, like a price)."""

    inputs: tuple[tuple[int, int], ...]
    outputs: tuple[tuple[int, int], ...]
    """Both as `price_rates.ceilings` makes them, for `max_rate`."""
    fixed: int
    scale: int
    up: int
    down: int
    """`price_rates.nano_factors(scale)`."""


@dataclass(frozen=True, slots=True, eq=False)
class _Entry:
    """A resolved (provider, model) pair and the constraints its prices depend on besides the usage."""

    provider: Provider
    model: ModelInfo
    own: bool
    """The provider lists the model itself (not by fallback), so price variants apply."""
    constraints: tuple[StartDateConstraint | TimeOfDateConstraint, ...]
    by_time: bool
    """Some constraint depends on the time of day, not only on the UTC date."""


class Pricer:
    """Prices calls from genai-prices' bundled table; its caches live on the instance and are bounded."""

    def __init__(
        self,
        *,
        price_overrides: Mapping[str, Mapping[str, object]] | None = None,
        prices_file: str | os.PathLike[str] | None = None,
        fallback_price: Mapping[str, object] | None = None,
        max_entries: int = 4096,
    ) -> None:
        """Layers, highest first: `price_overrides`, `prices_file`, genai-prices' bundled table; then
        `fallback_price` for models none of them knows (rows say so in price_source)."""
        self._overrides = (
            PriceTable(parse_rates(price_overrides, "price_overrides"), "override")
            if price_overrides is not None
            else None
        )
        self._file = PricesFile(prices_file) if prices_file is not None else None
        self._fallback: Rates | None = None
        if fallback_price is not None:
            self._fallback = parse_rates({"fallback": fallback_price}, "fallback_price")["fallback"]
            rates = self._fallback
            self._fallback_source = stamp(
                f"fallback ${rates.input}/${rates.output} per 1M input/output tokens"
            )
        self._providers: list[Provider] = bundled_providers  # what genai-prices' bundled snapshot reads
        self._registry = UnitRegistry(unit_data)
        self._source = f"genai-prices {version('genai-prices')}"
        self._max_entries = max_entries
        self._entries: dict[tuple[str, str], _Entry | None] = {}
        self._rates: dict[tuple[object, ...], Compiled | None] = {}
        self._layered = self._overrides is not None or self._file is not None
        self.has_overrides = self._overrides is not None
        """Whether `price_overrides` were given (rows they priced say "override" in price_source)."""
        self._limits: dict[tuple[object, ...], _Limits | None] = {}
        self._warned: dict[tuple[str, str, str], None] = {}

    def price(
        self,
        provider: str,
        model: str,
        usage: Usage,
        *,
        at: datetime,
        service_tier: str | None = None,
        batch: bool = False,
    ) -> Cost:
        """The cost of one call made at `at`; an unknown model or a rejected usage gives a None amount.

        Never raises for a data problem: those are logged once per (provider, model) and flagged in `status`.
        """
        if self._layered:
            layered = self._layer(provider, model)
            if layered is not None:
                flat = layered[2].cost(usage)
                return Cost(flat, to_nanousd(flat), "priced", layered[0].source, layered[1])
        entry = self._entry(provider, model)
        if entry is None:
            return self._fallback_cost(provider, model, usage)
        if not entry.own:
            service_tier, batch = None, False
        key = (entry, service_tier, batch, _when(entry, at) if entry.constraints else None)
        try:
            compiled = self._rates[key]
        except KeyError:
            compiled = self._compile(entry, key, at, service_tier, batch)
        if compiled is None:
            return self._unknown("unknown_model", provider, model)
        summed = compiled.program(usage)
        if summed is None:
            return self._unknown("unknown_usage", provider, model)
        amount = Decimal(summed).scaleb(-compiled.scale)
        return Cost(
            amount, to_nano(summed, compiled.up, compiled.down), "priced", self._source, entry.model.id
        )

    def bound(
        self, provider: str, model: str, *, input_tokens: int, output_tokens: int, at: datetime
    ) -> Cost:
        """An upper bound of what a call with at most these input and output tokens can cost.

        Whatever part of the input is cache reads or writes and whatever tier or batch price applies:
        input tokens at the highest input-side token rate of the model on the UTC date of `at` (input,
        cache writes of any TTL, every price variant, every long-context tier that `input_tokens` can
        reach), output tokens at the highest output-side rate, plus any per-request fee. Other units
        (searches, images, audio seconds) are not covered; a model priced only in those is "unknown_model".
        """
        layered = self._layer(provider, model) if self._layered else None
        entry = self._entry(provider, model) if layered is None else None
        if layered is not None or (entry is None and self._fallback is not None):
            rates = layered[2] if layered is not None else self._fallback
            assert rates is not None
            flat = rates.bound(input_tokens, output_tokens)
            source = layered[0].source if layered is not None else self._fallback_source
            return Cost(flat, to_nanousd(flat), "priced", source, layered[1] if layered else None)
        if entry is None:
            return self._unknown("unknown_model", provider, model)
        day = _utc(at).date()
        key = (entry, day if isinstance(entry.model.prices, list) else None)
        try:
            limits = self._limits[key]
        except KeyError:
            limits = _remember(self._limits, key, self._bound_rates(entry, day), self._max_entries)
        if limits is None:
            return self._unknown("unknown_model", provider, model)
        whole = limits.fixed + input_tokens * max_rate(limits.inputs, input_tokens)
        whole += output_tokens * max_rate(limits.outputs, input_tokens)
        amount = Decimal(whole).scaleb(-limits.scale)
        return Cost(amount, to_nano(whole, limits.up, limits.down), "priced", self._source, entry.model.id)

    def explain(
        self,
        provider: str,
        model: str,
        usage: Usage,
        *,
        at: datetime,
        service_tier: str | None = None,
        batch: bool = False,
    ) -> Explanation:
        """What `price` does for this call, step by step (for `llm-spend prices explain`)."""
        cost = self.price(provider, model, usage, at=at, service_tier=service_tier, batch=batch)
        layered = self._layer(provider, model)
        entry = self._entry(provider, model)
        rates: dict[str, str] = {}
        if layered is not None:
            rates = {name: str(rate) for name, rate in layered[2].per_million().items()}
        elif entry is not None:
            context = {"service_tier": service_tier} if service_tier else {}
            if batch:
                context["processing"] = "batch"
            prices = entry.model.get_prices(at, (context or None) if entry.own else None)
            for name, key in _EXPLAINED.items():
                value = getattr(prices, key, None)
                if isinstance(value, TieredPrices):
                    tiers = ", ".join(f"{tier.price} above {tier.start} input tokens" for tier in value.tiers)
                    rates[name] = f"{value.base} ({tiers})"
                elif value is not None:
                    rates[name] = str(value)
        elif self._fallback is not None:
            rates = {name: str(rate) for name, rate in self._fallback.per_million().items()}
        return Explanation(provider, model, cost.source, cost.model_id, rates, cost)

    def _layer(self, provider: str, model: str) -> tuple[PriceTable, str, Rates] | None:
        """The override or prices-file entry for this call, if any (in that order)."""
        for table in (self._overrides, self._file.current() if self._file is not None else None):
            if table is not None:
                found = table.lookup(provider, model)
                if found is not None:
                    return table, found[0], found[1]
        return None

    def _fallback_cost(self, provider: str, model: str, usage: Usage) -> Cost:
        """An unknown model: priced at `fallback_price` when given (and said so), else unknown."""
        if self._fallback is None:
            return self._unknown("unknown_model", provider, model)
        amount = self._fallback.cost(usage)
        return Cost(amount, to_nanousd(amount), "priced", self._fallback_source, None)

    def context_window(self, provider: str, model: str) -> int | None:
        """The model's context window in tokens, when the price table knows it."""
        entry = self._entry(provider, model)
        return None if entry is None else entry.model.context_window

    def _entry(self, provider: str, model: str) -> _Entry | None:
        """Resolve (provider, model) with genai-prices' matchers once; misses are remembered too."""
        try:
            return self._entries[(provider, model)]
        except KeyError:
            pass
        found = find_provider_by_id(self._providers, provider)
        info = found.find_model(model, all_providers=self._providers) if found is not None else None
        entry = None if found is None or info is None else _make_entry(found, info)
        return _remember(self._entries, (provider, model), entry, self._max_entries)

    def _compile(
        self, entry: _Entry, key: tuple[object, ...], at: datetime, service_tier: str | None, batch: bool
    ) -> Compiled | None:
        """Compile the prices that apply under `key`; None, with a warning, for an unusable price set."""
        context = {"service_tier": service_tier} if service_tier is not None else {}
        if batch:
            context["processing"] = "batch"
        model_price = entry.model.get_prices(at, context or None)
        try:
            compiled: Compiled | None = compile_prices(model_price, self._registry)
        except (ValueError, ArithmeticError) as error:
            logger.warning("llm-spend: unusable price for %s in genai-prices: %s", entry.model.id, error)
            compiled = None
        return _remember(self._rates, key, compiled, self._max_entries)

    def _bound_rates(self, entry: _Entry, day: date) -> _Limits | None:
        """Every rate the model can charge on `day`, all price variants included, for `bound`."""
        prices = _standard_prices(entry.model, day)
        if entry.own:
            prices += [variant.prices for variant in entry.model.price_variants or ()]
        inputs: list[tuple[int, Decimal]] = []
        outputs: list[tuple[int, Decimal]] = []
        fixed, other = [Decimal(0)], False
        for unit, value in (
            item for model_price in prices for item in priced_units(model_price, self._registry)
        ):
            family, direction = unit.dimensions.get("family"), unit.dimensions.get("direction")
            if family == "tokens" and direction in ("input", "output"):
                (inputs if direction == "input" else outputs).extend(unit_rates(value, unit.per))
            elif family == "requests":
                fixed.extend(rate for _, rate in unit_rates(value, unit.per))
            else:
                other = True
        if other and not inputs and not outputs:
            return None
        scale = scale_of([*(rate for _, rate in (*inputs, *outputs)), *fixed])

        def whole(rates: list[tuple[int, Decimal]]) -> tuple[tuple[int, int], ...]:
            return ceilings([(start, int(rate.scaleb(scale))) for start, rate in rates])

        fee = int(max(fixed).scaleb(scale))
        return _Limits(whole(inputs), whole(outputs), fee, scale, *nano_factors(scale))

    def _unknown(self, status: PricingStatus, provider: str, model: str) -> Cost:
        """A cost without amount; warns once per (status, provider, model)."""
        if (status, provider, model) not in self._warned:
            _remember(self._warned, (status, provider, model), None, self._max_entries)
            what = "no price" if status == "unknown_model" else "usage that genai-prices rejects"
            logger.warning("llm-spend: %s for model %r of provider %r; cost unknown", what, model, provider)
        return Cost(None, None, status, None, None)


def _remember(cache: dict[_K, _V], key: _K, value: _V, limit: int) -> _V:
    """Store `value`, first evicting the oldest entry of a full cache, so memory stays bounded."""
    if len(cache) >= limit:
        cache.pop(next(iter(cache)), None)
    cache[key] = value
    return value


def _make_entry(provider: Provider, model: ModelInfo) -> _Entry:
    """Note whether variants apply and which date or time-of-day constraints the price depends on."""
    own = any(model is listed for listed in provider.models)
    constraints = [price.constraint for price in model.prices] if isinstance(model.prices, list) else []
    if own:
        constraints += [variant.constraint for variant in model.price_variants or ()]
    kept = tuple(constraint for constraint in constraints if constraint is not None)
    return _Entry(provider, model, own, kept, any(isinstance(c, TimeOfDateConstraint) for c in kept))


def _utc(at: datetime) -> datetime:
    """`at` in UTC; naive datetimes are UTC, as genai-prices reads them."""
    return at if at.tzinfo is None or at.tzinfo is UTC else at.astimezone(UTC)


def _when(entry: _Entry, at: datetime) -> object:
    """What of `at` the price depends on: the UTC date, or which constraints hold at that instant."""
    if entry.by_time:
        return tuple(constraint.active(at) for constraint in entry.constraints)
    return _utc(at).date()


def _standard_prices(model: ModelInfo, day: date) -> list[ModelPrice]:
    """Every standard (not variant) price set in force at some instant of the UTC `day`."""
    if isinstance(model.prices, ModelPrice):
        return [model.prices]
    instants = {datetime.combine(day, time(), UTC)}
    for conditional in model.prices:
        if isinstance(conditional.constraint, TimeOfDateConstraint):
            for edge in (conditional.constraint.start_time, conditional.constraint.end_time):
                utc_edge = datetime.combine(day, edge).astimezone(UTC).timetz() if edge.tzinfo else edge
                instants.add(datetime.combine(day, utc_edge.replace(tzinfo=UTC)))
    return [model.get_prices(instant) for instant in sorted(instants)]
