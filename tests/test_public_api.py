"""The public surface: `llm_spend.__all__` is pinned, importable, sorted, and typed."""

from __future__ import annotations

import dataclasses
import enum
import importlib
import importlib.resources
import pickle

import pytest

import llm_spend
from llm_spend import Usage

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


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ({"input_tokens": -1}, "input_tokens must not be negative"),
        ({"output_tokens": 2.0}, "output_tokens must be an integer"),
        ({"reasoning_tokens": True}, "reasoning_tokens must be an integer"),
        ({"cache_read_tokens": 10**9 + 1}, "cache_read_tokens of 1000000001 is implausible"),
        ({"input_tokens": 5, "cache_read_tokens": 3, "cache_write_tokens": 3}, r"\(3 \+ 3\) must not exceed"),
        ({"input_tokens": 5, "cache_write_tokens": 1, "cache_write_1h_tokens": 2}, "cache_write_1h_tokens"),
        ({"output_tokens": 1, "reasoning_tokens": 2}, r"reasoning_tokens \(2\) must not exceed"),
    ],
)
def test_usage_rejects_counts_naming_the_field(counts: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Usage(**counts)  # type: ignore[arg-type]


def test_usage_takes_int_subclasses_as_plain_ints() -> None:
    """An IntEnum member is an int (a bool is not a count): stored as the plain int it equals."""

    class Count(enum.IntEnum):
        TEN = 10
        FOUR = 4

    usage = Usage(Count.TEN, Count.FOUR, reasoning_tokens=Count.FOUR)
    assert usage == Usage(10, 4, reasoning_tokens=4)
    assert type(usage.input_tokens) is int and type(usage.reasoning_tokens) is int


def test_usage_is_a_frozen_dataclass_built_by_position_or_name() -> None:
    usage = Usage(10, 4, 3, 2, 1, 1)
    assert usage == Usage(
        input_tokens=10, output_tokens=4, cache_read_tokens=3, cache_write_tokens=2,
        cache_write_1h_tokens=1, reasoning_tokens=1,
    )  # fmt: skip
    assert Usage() == Usage(0, 0, 0, 0, 0, 0) and hash(usage) == hash(Usage(10, 4, 3, 2, 1, 1))
    assert dataclasses.replace(usage, output_tokens=9).output_tokens == 9
    assert pickle.loads(pickle.dumps(usage)) == usage
    with pytest.raises(dataclasses.FrozenInstanceError):
        usage.input_tokens = 11  # type: ignore[misc]
    with pytest.raises(ValueError, match="reasoning_tokens"):
        dataclasses.replace(usage, output_tokens=0)
