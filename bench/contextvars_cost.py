"""What contextvars-extras costs per with_tags scope, over plain contextvars (docs/decisions.md).

A with_tags scope reads the current tags, sets a new read-only mapping (copy on write) and resets it
on exit. This times exactly that, once with a plain `contextvars.ContextVar` and once with
`contextvars_extras.ContextVarExt`, plus the real `with with_tags(...)` for reference.

Run: .venv/bin/python bench/contextvars_cost.py (bench/run.py prints it too).
"""

from __future__ import annotations

import statistics
import timeit
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from types import MappingProxyType

from contextvars_extras import ContextVarExt

_EMPTY: Mapping[str, str] = MappingProxyType({})
_BASE = MappingProxyType({"user_id": "42", "tenant": "acme"})
_NEW = {"feature": "chat"}

plain_var: ContextVar[Mapping[str, str]] = ContextVar("plain_tags", default=_EMPTY)
ext_var: ContextVarExt[Mapping[str, str]] = ContextVarExt("ext_tags", default=_EMPTY)


def plain_scope() -> None:
    token = plain_var.set(MappingProxyType({**plain_var.get(), **_NEW}))
    plain_var.reset(token)


def ext_scope() -> None:
    token = ext_var.set(MappingProxyType({**ext_var.get(), **_NEW}))
    ext_var.reset(token)


def _per_op_us(func: Callable[[], object], number: int) -> float:
    return timeit.timeit(func, number=number) / number * 1e6


def measure(number: int = 200_000, repeat: int = 7) -> dict[str, float]:
    """µs per set/reset scope: plain ContextVar, ContextVarExt, and llm_spend's with_tags."""
    from llm_spend import with_tags

    plain_var.set(_BASE)  # an enclosing scope already holds some tags, as inside a request
    ext_var.set(_BASE)

    def real_with_tags() -> None:
        with with_tags(feature="chat"):
            pass

    # Interleave the variants so that a slower moment of the machine hits them alike.
    samples: dict[str, list[float]] = {"plain": [], "ext": [], "with_tags": []}
    for _ in range(repeat):
        samples["plain"].append(_per_op_us(plain_scope, number))
        samples["ext"].append(_per_op_us(ext_scope, number))
        samples["with_tags"].append(_per_op_us(real_with_tags, number // 4))
    return {name: statistics.median(values) for name, values in samples.items()}


def report(results: dict[str, float]) -> str:
    extra = results["ext"] - results["plain"]
    return "\n".join(
        [
            f"  plain ContextVar set/reset of a MappingProxyType   {results['plain']:6.2f} µs",
            f"  contextvars_extras.ContextVarExt, same             {results['ext']:6.2f} µs",
            f"  extra cost of ContextVarExt per scope              {extra:+6.2f} µs  (threshold: 1 µs)",
            f"  llm_spend `with with_tags(feature=...)` (for ref.) {results['with_tags']:6.2f} µs",
        ]
    )


if __name__ == "__main__":
    print("contextvars cost per with_tags-style scope (median of 7 runs):")
    print(report(measure()))
