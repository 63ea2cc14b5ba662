"""Price rates: a genai-prices price set compiled to integer arithmetic, and a call priced with it.

A unit's billed count is its usage minus the billed counts of its priced descendants (genai-prices'
leaf decomposition), so each count is a fixed integer combination of the usage vector; every rate is
an integer count of 10**-scale USD, and one weight vector per long-context tier band makes pricing a
call one dot product, exact to the nano-dollar (what `genai_prices.calc_price` gives).

Each price set's checks and dot products are then written out as a small Python function of the
usage (`Compiled.program`), with its integer weights as literals and the zero terms left out:
`sum(map(mul, ...))` over the eight-entry vectors, three of them for a model with cache writes, was
two fifths of pricing a call (docs/performance.md, twenty-ninth session). The function's text holds only
integers this module computed and fixed names, never text from the price table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal, Inexact, localcontext
from typing import Any, NamedTuple, TypeVar

from genai_prices.types import ModelPrice, TieredPrices
from genai_prices.units import UnitDef, UnitRegistry
from genai_prices.validation import validate_priced_units

from .usage import Usage

__all__ = [
    "Compiled",
    "TierRates",
    "ceilings",
    "compile_prices",
    "max_rate",
    "nano_factors",
    "priced_units",
    "scale_of",
    "to_nano",
    "unit_rates",
]

_RAW_KEYS = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "output_reasoning_tokens",
    "cache_write_5m_tokens",
    "requests",
)
"""The genai-prices usage keys a `Usage` fills, in the order of the usage vector (`_program` reads it)."""
_READS = (*_RAW_KEYS[:5], "reasoning_tokens")
"""The `Usage` fields behind the vector's first six entries (the seventh is derived, the last is 1)."""
_R = TypeVar("_R", int, Decimal)
TierRates = tuple[tuple[int, Decimal], ...]
"""A price per single unit as (tier start, rate), tiers in genai-prices' order; the base starts at -1."""


class _Term(NamedTuple):
    """One priced unit: its billed count as integer coefficients over the usage vector, and its rates
    as integers in units of 10**-scale USD (tier start, rate), tiers in genai-prices' order."""

    counts: tuple[tuple[int, int], ...]
    rates: tuple[tuple[int, int], ...]


class Compiled(NamedTuple):
    """A price set compiled to integer arithmetic: sum count * rate over the terms is exact."""

    terms: tuple[_Term, ...]
    scale: int
    """Rates are in 10**-scale USD, so the total is too."""
    up: int
    """10**(9 - scale) when scale <= 9, else 1: what turns a total into nano-USD exactly."""
    down: int
    """10**(scale - 9) when scale > 9, else 1: what a total is divided by (half-even) for nano-USD."""
    checks: tuple[tuple[int, ...], ...]
    """The count vectors (over the usage vector) of the terms that could come out negative."""
    bands: tuple[tuple[int, tuple[int, ...]], ...]
    """(tier start, weights), highest start first: for a call with more input tokens than the start,
    the total is the usage vector dotted with the weights (one band at -1 without tiers)."""
    program: Callable[[Usage], int | None]
    """`checks` and `bands` written out as Python (`_program`): the call's total in 10**-scale USD,
    summed as genai-prices sums, or None for a negative count."""


def priced_units(
    model_price: ModelPrice, registry: UnitRegistry
) -> list[tuple[UnitDef, Decimal | TieredPrices]]:
    """The (unit, price) pairs of a price set; like genai-prices, ignore keys it does not know."""
    priced: list[tuple[UnitDef, Decimal | TieredPrices]] = []
    for key, value in model_price.__dict__.items():
        if not key.startswith("_") and value is not None:
            try:
                priced.append((registry.unit_for_price_key(key), value))
            except KeyError:
                continue
    return priced


def unit_rates(value: Decimal | TieredPrices, per: int) -> TierRates:
    """A price divided by `per`, with its tiers highest start first, as genai-prices tries them.

    The division must be exact (per is a power of ten for every unit a `Usage` fills), so that
    rate * count equals genai-prices' price * count / per; otherwise decimal.Inexact is raised.
    """
    if isinstance(value, TieredPrices):
        prices = [(tier.start, tier.price) for tier in reversed(value.tiers)] + [(-1, value.base)]
    else:
        prices = [(-1, value)]
    with localcontext() as context:
        context.traps[Inexact] = True
        return tuple((start, price / per) for start, price in prices)


def _terms(
    model_price: ModelPrice, registry: UnitRegistry
) -> list[tuple[tuple[tuple[int, int], ...], TierRates]]:
    """Compile a price set with genai-prices' leaf decomposition (`decompose.compute_leaf_values`).

    A unit's billed count is its usage minus the billed counts of its priced descendants (the units whose
    dimensions include its own), so each count is a fixed integer combination of the usage vector.
    Raises ValueError, as genai-prices does, when the price set lacks an ancestor or join price.
    """
    priced = priced_units(model_price, registry)
    validate_priced_units([unit for unit, _ in priced], registry)
    priced.sort(key=lambda item: (-len(item[0].dimensions), item[0].usage_key))
    counts: list[dict[int, int]] = []
    terms: list[tuple[tuple[tuple[int, int], ...], TierRates]] = []
    for position, (unit, value) in enumerate(priced):
        count = {_RAW_KEYS.index(unit.usage_key): 1} if unit.usage_key in _RAW_KEYS else {}
        for other, (descendant, _) in zip(counts, priced[:position], strict=True):
            if unit.dimensions.items() <= descendant.dimensions.items():
                for index, coefficient in other.items():
                    count[index] = count.get(index, 0) - coefficient
        counts.append({index: coefficient for index, coefficient in count.items() if coefficient})
        if counts[-1]:
            terms.append((tuple(counts[-1].items()), unit_rates(value, unit.per)))
    return terms


def _integral(terms: Sequence[tuple[tuple[tuple[int, int], ...], TierRates]]) -> Compiled:
    """The terms with every rate an integer count of 10**-scale USD, scale the finest any rate needs."""
    scale = scale_of(rate for _, rates in terms for _, rate in rates)
    compiled = tuple(
        _Term(counts, tuple((start, int(rate.scaleb(scale))) for start, rate in rates))
        for counts, rates in terms
    )
    up, down = nano_factors(scale)
    vectors = [_vector(term.counts) for term in compiled]
    checks = tuple(v for v, term in zip(vectors, compiled, strict=True) if any(c < 0 for _, c in term.counts))
    starts = sorted({-1, *(start for term in compiled for start, _ in term.rates)}, reverse=True)
    bands = []
    for band in starts:  # every tier holds from its start to the next one: one weight vector each
        rates = [next(rate for start, rate in term.rates if band + 1 > start) for term in compiled]
        weights = tuple(
            sum(v[i] * rate for v, rate in zip(vectors, rates, strict=True)) for i in range(len(_RAW_KEYS))
        )
        bands.append((band, weights))
    return Compiled(compiled, scale, up, down, checks, tuple(bands), _program(checks, bands))


def scale_of(rates: Iterable[Decimal]) -> int:
    """The least power of ten (at least 0) that makes every rate an integer count of 10**-scale USD."""
    exponents = [rate.as_tuple().exponent for rate in rates]
    return max([0, *(-e for e in exponents if isinstance(e, int))])


def nano_factors(scale: int) -> tuple[int, int]:
    """(up, down) for `to_nano`: a total in 10**-scale USD is total * up nano-USD, or total / down."""
    return 10 ** max(9 - scale, 0), 10 ** max(scale - 9, 0)


def _vector(counts: tuple[tuple[int, int], ...]) -> tuple[int, ...]:
    vector = [0] * len(_RAW_KEYS)
    for index, coefficient in counts:
        vector[index] = coefficient
    return tuple(vector)


def _program(
    checks: Sequence[tuple[int, ...]], bands: Sequence[tuple[int, tuple[int, ...]]]
) -> Callable[[Usage], int | None]:
    """`Compiled.program` of one price set: a function whose text reads the usage fields that some
    weight needs, returns None when a check's count is negative, and else the dot product of the
    first band that the input tokens pass (the last starts at -1), each written out with its weights."""
    assert bands[-1][0] == -1, "no band starts at -1"
    vectors = [*checks, *(weights for _, weights in bands)]
    used = {index for vector in vectors for index, weight in enumerate(vector) if weight}
    if 6 in used:  # 5-minute writes are passed only beside 1-hour ones
        used |= {3, 4}
    if len(bands) > 1:
        used.add(0)
    lines = ["def total(u):"]
    lines += [f"    x{index} = u.{_READS[index]}" for index in sorted(used) if index < 6]
    if 6 in used:
        lines.append("    x6 = x3 - x4 if x4 else 0")
    lines += [f"    if {_dot(vector)} < 0: return None" for vector in checks]
    lines += [f"    if x0 > {start}: return {_dot(weights)}" for start, weights in bands[:-1]]
    lines.append(f"    return {_dot(bands[-1][1])}")
    namespace: dict[str, Any] = {}
    exec(compile("\n".join(lines), "<llm-spend price>", "exec"), namespace)
    program: Callable[[Usage], int | None] = namespace["total"]
    return program


def _dot(vector: Sequence[int]) -> str:
    """The usage vector dotted with `vector`, as an expression of integers (the last entry is 1)."""
    terms = [
        f"{weight} * x{index}" if index < 7 else str(weight) for index, weight in enumerate(vector) if weight
    ]
    return " + ".join(terms) or "0"


def to_nano(total: int, up: int, down: int) -> int:
    """A total in 10**-scale USD (`up`, `down`: `nano_factors(scale)`) in nano-USD, rounded
    half-even (as `money.to_nanousd`)."""
    if down == 1:
        return total * up
    nano, rest = divmod(total, down)
    if 2 * rest > down or (2 * rest == down and nano & 1):
        nano += 1
    return nano


def ceilings(rates: Sequence[tuple[int, _R]]) -> tuple[tuple[int, _R], ...]:
    """`rates` as `max_rate` reads them: one (start, highest rate of any tier starting there or
    below) per distinct tier start, starts ascending. Made once per model and day: a model has
    a rate per variant and cache kind (six or more), and `max_rate` runs for every guarded call.
    Rates are `Decimal` USD or integer counts of 10**-scale USD (`Pricer.bound`'s)."""
    found: list[tuple[int, _R]] = []
    for start in sorted({start for start, _ in rates}):
        top = max(rate for tier, rate in rates if tier == start)
        found.append((start, max(top, found[-1][1]) if found else top))
    return tuple(found)


def max_rate(ceiling: Sequence[tuple[int, _R]], input_tokens: int) -> _R | int:
    """The highest of the rates that a call with at most `input_tokens` input tokens can reach
    (`ceiling` as `ceilings` makes it); 0 when none can."""
    best: _R | int = 0
    for start, rate in ceiling:
        if input_tokens <= start:
            break
        best = rate
    return best


def compile_prices(model_price: ModelPrice, registry: UnitRegistry) -> Compiled:
    """A price set compiled to integers and a program (`Compiled`); raises ValueError or
    ArithmeticError for an unusable one."""
    return _integral(_terms(model_price, registry))
