"""The public surface: `llm_spend.__all__` is pinned, importable, sorted, and typed."""

from __future__ import annotations

import importlib
import importlib.resources

import llm_spend

PUBLIC = [
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


def test_all_is_pinned() -> None:
    """`llm_spend.__all__` is exactly the reviewed public names; changing it must change this test."""
    assert llm_spend.__all__ == PUBLIC


def test_all_is_sorted_and_unique() -> None:
    """__all__ is sorted and has no duplicates."""
    assert llm_spend.__all__ == sorted(set(llm_spend.__all__))


def test_every_public_name_is_importable() -> None:
    """Each name in __all__ can be imported from the package (`from llm_spend import X`)."""
    module = importlib.import_module("llm_spend")
    for name in llm_spend.__all__:
        assert getattr(module, name) is not None, name
    namespace: dict[str, object] = {}
    exec("from llm_spend import *", namespace)
    assert set(llm_spend.__all__) <= set(namespace)


def test_design_contract_names_are_public() -> None:
    """The names DESIGN.md promises users are in __all__."""
    promised = {"Tracker", "Budget", "BudgetExceeded", "SpendMiddleware", "with_tags", "current_tags"}
    assert promised <= set(llm_spend.__all__)


def test_budget_exceeded_is_an_llm_spend_error() -> None:
    """BudgetExceeded subclasses LLMSpendError, so one except clause catches every llm-spend error."""
    assert issubclass(llm_spend.BudgetExceeded, llm_spend.LLMSpendError)
    assert issubclass(llm_spend.StorageError, llm_spend.LLMSpendError)
    assert issubclass(llm_spend.UnknownPriceError, llm_spend.LLMSpendError)


def test_py_typed_is_shipped() -> None:
    """The package ships py.typed, so type checkers use its annotations."""
    assert importlib.resources.files("llm_spend").joinpath("py.typed").is_file()


def test_version_is_a_string() -> None:
    """llm_spend.__version__ is a version string."""
    assert isinstance(llm_spend.__version__, str)
    assert llm_spend.__version__.count(".") >= 1
