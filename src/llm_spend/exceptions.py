"""Exceptions raised by llm-spend.

    LLMSpendError
     ├── BudgetExceeded       a budget refused a call (preflight) or a call took a window over (post)
     ├── UnknownPriceError    a block-mode budget cannot reserve for a model without a price
     ├── PricesFileError      a prices file or price overrides are malformed (also a ValueError)
     └── StorageError         the ledger database could not be used

Each exception keeps its facts as attributes; the original error, if any, is its ``__cause__``.
Each can be pickled and copied (a copy has the facts, not the traceback).
"""

from __future__ import annotations

import math
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from .money import format_usd

if TYPE_CHECKING:
    from .budgets import Budget

__all__ = [
    "BudgetExceeded",
    "LLMSpendError",
    "PricesFileError",
    "StorageError",
    "UnknownPriceError",
    "budget_error",
    "spend_error",
]


class LLMSpendError(Exception):
    """Base class of every error llm-spend raises."""


class BudgetExceeded(LLMSpendError):
    """A budget refused a call before it went out, or a recorded call took a window over its limit.

    At stage "post", `spent` includes the call that crossed. At stage "preflight", `spent` and
    `reserved` are the window's before the refused estimate, and `requested` is that estimate (0 when
    the middleware refused a request from memory, before any call was estimated).
    """

    def __init__(
        self,
        *,
        budget: Budget,
        period: Literal["call", "day", "month"],
        scope: str | None,
        scope_value: str | None,
        limit: Decimal,
        spent: Decimal,
        reserved: Decimal,
        requested: Decimal,
        stage: Literal["preflight", "post"],
        window_start: datetime | None,
        window_end: datetime | None,
        now: datetime | None = None,
    ) -> None:
        self.budget = budget
        self.period = period
        self.scope = scope
        self.scope_value = scope_value
        self.limit = limit
        self.spent = spent
        self.reserved = reserved
        self.requested = requested
        self.stage = stage
        self.window_start = window_start
        self.window_end = window_end
        self.retry_after: int | None = None
        if window_end is not None and now is not None:
            self.retry_after = max(1, math.ceil((window_end - now).total_seconds()))
        where = "" if scope is None else f" for {scope}={scope_value!r}"
        window = "call" if period == "call" else f"{period} starting {window_start:%Y-%m-%d}"
        super().__init__(
            f"{period} budget of ${format_usd(limit)}{where} exceeded at {stage} ({window}: spent "
            f"${format_usd(spent)}, reserved ${format_usd(reserved)}, requested ${format_usd(requested)})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        facts = {name: getattr(self, name) for name in _FACTS}
        return _budget_exceeded, (facts, self.retry_after)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description, as the middleware sends it (money as strings)."""
        return {
            "error": "budget_exceeded",
            "period": self.period,
            "scope": self.scope,
            "scope_value": self.scope_value,
            "limit": format_usd(self.limit),
            "spent": format_usd(self.spent),
            "reserved": format_usd(self.reserved),
            "requested": format_usd(self.requested),
            "stage": self.stage,
            "window_start": self.window_start.isoformat() if self.window_start else None,
            "window_end": self.window_end.isoformat() if self.window_end else None,
            "retry_after": self.retry_after,
        }


_FACTS = (
    "budget", "period", "scope", "scope_value", "limit", "spent", "reserved", "requested", "stage",
    "window_start", "window_end",
)  # fmt: skip


def _budget_exceeded(facts: dict[str, Any], retry_after: int | None) -> BudgetExceeded:
    exceeded = BudgetExceeded(**facts)
    exceeded.retry_after = retry_after
    return exceeded


class UnknownPriceError(LLMSpendError):
    """A block-mode budget applies, but the model has no price to reserve with."""

    def __init__(self, provider: str, model: str) -> None:
        self.provider = provider
        self.model = model
        super().__init__(
            f"no price is known for {provider}/{model}, so a block-mode budget cannot reserve for it; "
            "add a price override or pass unknown_price='allow' to the Tracker"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return UnknownPriceError, (self.provider, self.model)


class PricesFileError(LLMSpendError, ValueError):
    """A prices file (or `price_overrides`) is malformed: which one, which key, what is wrong."""

    def __init__(self, origin: str, key: object, problem: str) -> None:
        self.origin = origin
        self.key = key
        self.problem = problem
        where = origin if key is None else f"{origin}, key {key!r}"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        return PricesFileError, (self.origin, self.key, self.problem)


class StorageError(LLMSpendError):
    """The ledger database could not be read or written."""


_E = TypeVar("_E", bound=LLMSpendError)


def spend_error(error: BaseException) -> LLMSpendError | None:
    """The llm-spend error that `error` stands for, or None (see `budget_error`)."""
    return _standing_for(error, LLMSpendError)


def budget_error(error: BaseException) -> BudgetExceeded | None:
    """The `BudgetExceeded` that `error` stands for, or None: `error` itself; the one an SDK's error
    wraps, along `__cause__` (openai 2.x and anthropic wrap what the transport raises in
    `APIConnectionError`); or, for an exception group (a `TaskGroup`'s), the first of its exceptions
    when every one of them stands for one."""
    return _standing_for(error, BudgetExceeded)


def _standing_for(error: BaseException, kind: type[_E]) -> _E | None:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        if isinstance(current, BaseExceptionGroup):  # never empty
            found = [_standing_for(inner, kind) for inner in current.exceptions]
            return found[0] if None not in found else None
        seen.add(id(current))
        current = current.__cause__
    return None
