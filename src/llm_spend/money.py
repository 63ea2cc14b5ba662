"""Money: `Decimal` USD in Python, integer nano-USD (1e-9 USD) in the database.

SQLite has no decimal type and floats drift, so every amount that is stored or summed by the
database is an integer count of nano-dollars. Conversions round half-even at the ninth decimal,
except limits, which round down.
"""

from __future__ import annotations

from decimal import ROUND_FLOOR, ROUND_HALF_EVEN, Decimal, InvalidOperation

__all__ = ["NANO", "format_usd", "from_nanousd", "limit_nanousd", "to_nanousd", "usd"]

NANO = Decimal("1e-9")
_PER_USD = Decimal(1_000_000_000)


def usd(value: int | float | str | Decimal, *, field: str = "amount") -> Decimal:
    """Convert a user-given amount to `Decimal` USD; floats go through `str`, so 0.001 is exact.

    Raises ValueError naming `field` for anything that is not a finite, non-negative number.
    """
    if isinstance(value, bool):
        raise ValueError(f"{field} must be a number of USD, got {value!r}")
    try:
        amount = Decimal(str(value)) if isinstance(value, float) else Decimal(value)
    except (InvalidOperation, TypeError, ValueError):
        raise ValueError(f"{field} must be a number of USD, got {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"{field} must be a finite, non-negative number of USD, got {value!r}")
    return amount


def to_nanousd(amount: Decimal) -> int:
    """`Decimal` USD -> integer nano-USD, rounded half-even."""
    return int((amount * _PER_USD).to_integral_value(rounding=ROUND_HALF_EVEN))


def limit_nanousd(limit: Decimal) -> int:
    """A limit in USD -> the whole nano-USD it allows, rounded down: the database counts whole
    nano-USD, and a limit of 1.5 nano-USD is passed by a spend of 2."""
    return int((limit * _PER_USD).to_integral_value(rounding=ROUND_FLOOR))


def from_nanousd(nanousd: int) -> Decimal:
    """Integer nano-USD -> exact `Decimal` USD."""
    return Decimal(nanousd).scaleb(-9)


def format_usd(amount: Decimal) -> str:
    """Plain notation without trailing zeros: 0.1, 0.106305, 0 (never 0E-9 or 1E+2)."""
    text = format(amount, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text
