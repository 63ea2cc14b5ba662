"""Chart geometry for the inline SVG the templates draw (templates/_charts.html), and number formats.

Only numbers are computed here; every label reaches the page through Jinja's autoescaping.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal

__all__ = ["ColumnChart", "Meter", "column_chart", "meter", "percent_change", "tokens", "usd"]


@dataclass(frozen=True, slots=True)
class Column:
    x: float
    y: float
    width: float
    height: float
    label: str
    value: str


@dataclass(frozen=True, slots=True)
class ColumnChart:
    """Columns over a baseline, horizontal gridlines with their values, and a few x-axis labels."""

    width: int
    height: int
    left: int
    bottom: float
    columns: tuple[Column, ...]
    gridlines: tuple[tuple[float, str], ...]
    x_labels: tuple[tuple[float, str], ...]


def column_chart(
    points: Sequence[tuple[str, Decimal]],
    *,
    width: int = 760,
    height: int = 220,
    left: int = 64,
    short: Callable[[str], str] = str,
) -> ColumnChart:
    """Columns for (label, amount) points, scaled to a round maximum; `short` abbreviates axis labels."""
    top, bottom = 10.0, height - 24.0
    peak = max((amount for _, amount in points), default=Decimal(0))
    step = _nice_step(float(peak) / 4) if peak > 0 else 1.0
    ceiling = step * max(math.ceil(float(peak) / step), 1)
    slot = (width - left - 8) / max(len(points), 1)
    gap = min(slot * 0.2, 6.0)
    columns = []
    for i, (label, amount) in enumerate(points):
        h = (bottom - top) * float(amount) / ceiling
        columns.append(
            Column(left + i * slot + gap / 2, bottom - h, max(slot - gap, 1.0), h, label, usd(amount))
        )
    lines = round(ceiling / step)
    gridlines = tuple((bottom - (bottom - top) * i / lines, _axis(step * i)) for i in range(lines + 1))
    every = max(1, math.ceil(len(points) / 8))
    x_labels = tuple(
        (left + (i + 0.5) * slot, short(label)) for i, (label, _) in enumerate(points) if i % every == 0
    )
    return ColumnChart(width, height, left, bottom, tuple(columns), gridlines, x_labels)


def _axis(value: float) -> str:
    """A gridline's value: as few digits as it needs ($0, $0.05, $2, $1,500)."""
    amount = Decimal(repr(round(value, 9))).normalize()
    return f"${amount:,f}" if amount >= 1000 else f"${amount:f}"


def _nice_step(raw: float) -> float:
    """The smallest 1, 2 or 5 x 10^k at least `raw`."""
    magnitude = 10.0 ** math.floor(math.log10(raw))
    return float(next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw))


@dataclass(frozen=True, slots=True)
class Meter:
    """A budget bar: the filled fraction (0..1), where the projection lands (None: no mark), a level."""

    fill: float
    projection: float | None
    level: str
    """"ok" below 80 %, "warn" below 100 %, "over" from 100 %."""


def meter(percent: Decimal, projected_percent: Decimal | None = None) -> Meter:
    level = "ok" if percent < 80 else "warn" if percent < 100 else "over"
    fill = min(max(float(percent) / 100, 0.0), 1.0)
    projection = None if projected_percent is None else min(max(float(projected_percent) / 100, 0.0), 1.0)
    return Meter(fill, projection, level)


def usd(amount: Decimal | None) -> str:
    """Dollars for people: $1,234.57, $0.0153, $0.000042 (small amounts keep their significant digits)."""
    if amount is None:
        return "unknown"
    if amount == 0:
        return "$0"
    sign = "-" if amount < 0 else ""
    amount = abs(amount)
    if amount >= 1 or amount == amount.quantize(Decimal("0.01")):
        return f"{sign}${amount:,.2f}"
    if amount >= Decimal("0.01"):
        return f"{sign}${amount:.4f}"
    return f"{sign}${amount:.6f}" if amount >= Decimal("0.000001") else f"{sign}<$0.000001"


def tokens(count: int) -> str:
    """1,234,567 -> 1.23M; small counts in full."""
    if count >= 10_000_000:
        return f"{count / 1_000_000:,.1f}M"
    if count >= 1_000_000:
        return f"{count / 1_000_000:.2f}M"
    return f"{count:,}"


def percent_change(current: Decimal, previous: Decimal) -> str | None:
    """+12.3% / -4.0% against the previous period; None when there was nothing to compare with."""
    if previous == 0:
        return None
    change = (current - previous) * 100 / previous
    return f"{change:+.1f}%"
