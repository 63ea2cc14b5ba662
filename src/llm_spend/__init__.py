"""llm-spend: an in-process LLM cost ledger and budget guard for ASGI apps, in your own database."""

from __future__ import annotations

from .budgets import Budget
from .context import current_tags, with_tags
from .exceptions import BudgetExceeded, LLMSpendError, StorageError, UnknownPriceError
from .middleware import SpendMiddleware
from .tracker import Tracker
from .usage import CallRecord, Estimate, Usage

__all__ = [
    "Budget",
    "BudgetExceeded",
    "CallRecord",
    "Estimate",
    "LLMSpendError",
    "SpendMiddleware",
    "StorageError",
    "Tracker",
    "UnknownPriceError",
    "Usage",
    "current_tags",
    "with_tags",
]

__version__ = "0.1.0"
