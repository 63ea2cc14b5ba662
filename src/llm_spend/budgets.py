"""Budgets, their calendar windows, and the Guard that applies them to calls.

A budget is (period, limit, scope, mode). Day and month windows are calendar windows in the
tracker's timezone, keyed by their start (an aware UTC datetime); a window changes by itself when
the clock passes its end, so nothing ever resets a counter. The database keeps one rollup row per
window and scope value; the Guard decides what a window's totals mean for each budget.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Final, Literal
from zoneinfo import ZoneInfo

from .context import is_secret_key
from .exceptions import BudgetExceeded
from .money import format_usd, from_nanousd, limit_nanousd, usd
from .storage.store import WindowKey

__all__ = [
    "Budget",
    "BudgetRule",
    "Mode",
    "Period",
    "WindowKey",
    "describe",
    "resolve_rules",
    "watched",
    "window_bounds",
]

Period = Literal["call", "day", "month"]
Mode = Literal["notify", "raise", "block"]
MODES: tuple[Mode, ...] = ("notify", "raise", "block")
_TAG_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
MAX_LIMIT: Final = 10**9
"""USD: a limit's nano-USD, plus what a window spends and reserves, stay far inside 64 bits."""


@dataclass(frozen=True, slots=True)
class Budget:
    """A spending limit in USD for one call, one day or one month, globally or per tag value.

    Build with `Budget.per_call`, `Budget.daily` or `Budget.monthly`. `mode=None` takes the
    tracker's default mode.
    """

    period: Period
    limit: Decimal
    per: str | None = None
    mode: Mode | None = None

    def __post_init__(self) -> None:
        if self.period not in ("call", "day", "month"):
            raise ValueError(f"period must be 'call', 'day' or 'month', got {self.period!r}")
        object.__setattr__(self, "limit", usd(self.limit, field="limit"))
        if self.limit > MAX_LIMIT:
            raise ValueError(f"limit must be at most {MAX_LIMIT:,} USD, got {self.limit}")
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.per is not None:
            if self.period == "call":
                raise ValueError("per must be None for a per-call budget (it has no window to split)")
            if not isinstance(self.per, str) or not _TAG_KEY.fullmatch(self.per):
                raise ValueError(f"per must be a tag key matching [A-Za-z0-9_.-]{{1,64}}, got {self.per!r}")
            if is_secret_key(self.per):
                raise ValueError(
                    f"per must not be a tag key that looks like a secret ({self.per!r}): its values are "
                    "stored as [REDACTED], so every value would share one window"
                )

    @classmethod
    def per_call(cls, limit: int | float | str | Decimal, *, mode: Mode | None = None) -> Budget:
        return cls("call", usd(limit, field="limit"), None, mode)

    @classmethod
    def daily(
        cls, limit: int | float | str | Decimal, *, per: str | None = None, mode: Mode | None = None
    ) -> Budget:
        return cls("day", usd(limit, field="limit"), per, mode)

    @classmethod
    def monthly(
        cls, limit: int | float | str | Decimal, *, per: str | None = None, mode: Mode | None = None
    ) -> Budget:
        return cls("month", usd(limit, field="limit"), per, mode)


def window_bounds(period: str, at: datetime, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """The calendar window of `period` ("day" | "month") in `tz` that contains `at`, in UTC."""
    local = at.astimezone(tz)
    if period == "day":
        start = datetime(local.year, local.month, local.day, tzinfo=tz)
        nxt = start.date() + timedelta(days=1)
        end = datetime(nxt.year, nxt.month, nxt.day, tzinfo=tz)
    else:
        start = datetime(local.year, local.month, 1, tzinfo=tz)
        end = datetime(local.year + local.month // 12, local.month % 12 + 1, 1, tzinfo=tz)
    return start.astimezone(UTC), end.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class BudgetRule:
    """A budget with its mode resolved and its limit in nano-USD."""

    budget: Budget
    mode: Mode
    limit_nanousd: int

    @property
    def scope_key(self) -> str:
        return self.budget.per or ""

    def scope_value(self, tags: Mapping[str, str]) -> str | None:
        """The value this budget counts the call under, or None when it does not apply."""
        if self.budget.per is None:
            return ""
        return tags.get(self.budget.per)

    def exceeded(
        self,
        *,
        window: tuple[datetime, datetime] | None,
        scope_value: str,
        spent: int,
        reserved: int,
        requested: int,
        stage: Literal["preflight", "post"],
        now: datetime,
    ) -> BudgetExceeded:
        return BudgetExceeded(
            budget=self.budget,
            period=self.budget.period,
            scope=self.budget.per,
            scope_value=scope_value if self.budget.per is not None else None,
            limit=self.budget.limit,
            spent=from_nanousd(spent),
            reserved=from_nanousd(reserved),
            requested=from_nanousd(requested),
            stage=stage,
            window_start=window[0] if window else None,
            window_end=window[1] if window else None,
            now=now,
        )


def resolve_rules(budgets: Sequence[Budget], default_mode: str) -> tuple[BudgetRule, ...]:
    if default_mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {default_mode!r}")
    if isinstance(budgets, Budget) or not isinstance(budgets, Iterable) or isinstance(budgets, str):
        raise ValueError(f"budgets must be a list of Budget objects, got {budgets!r}")
    rules = []
    for budget in budgets:
        if not isinstance(budget, Budget):
            raise ValueError(f"budgets must be Budget objects, got {budget!r}")
        mode = budget.mode or default_mode
        rules.append(BudgetRule(budget, mode, limit_nanousd(budget.limit)))
    return tuple(rules)


def watched(rules: Sequence[BudgetRule]) -> dict[tuple[str, str], int]:
    """(period, scope key) -> the smallest limit of a day or month budget on such windows, in
    nano-USD: below it, a window's total gives no budget anything to judge (`Store(watch=...)`)."""
    found: dict[tuple[str, str], int] = {}
    for rule in rules:
        key = (rule.budget.period, rule.scope_key)
        if key[0] != "call" and rule.limit_nanousd < found.get(key, rule.limit_nanousd + 1):
            found[key] = rule.limit_nanousd
    return found


def describe(budget: Budget) -> str:
    """A budget in words: "daily $5 per user_id", "per-call $2", "monthly $500"."""
    name = {"call": "per-call", "day": "daily", "month": "monthly"}[budget.period]
    per = f" per {budget.per}" if budget.per else ""
    return f"{name} ${format_usd(budget.limit)}{per}"
