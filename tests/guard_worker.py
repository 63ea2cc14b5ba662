"""A separate OS process making guarded calls against a shared ledger (used by test_guard.py).

Usage: python guard_worker.py URL LIMIT_USD CALLS [hold]
Prints one JSON line: {"served": n, "refused": n, "errors": [...]}. With "hold", it reserves one
call, prints {"holding": true}, and sleeps until killed.
"""

from __future__ import annotations

import asyncio
import json
import sys

from llm_spend import Budget, BudgetExceeded, Tracker, Usage

MODEL = "gpt-4o-mini"


async def main(url: str, limit: str, calls: int, hold: bool) -> None:
    tracker = Tracker(
        url,
        budgets=[Budget.daily(limit, mode="block")],
        auto_migrate=False,
        reservation_ttl=1 if hold else 600,
    )
    async with tracker:
        if hold:
            async with tracker.guard(
                provider="openai", model=MODEL, input_tokens=1000, max_output_tokens=1000
            ):
                print(json.dumps({"holding": True}), flush=True)
                await asyncio.sleep(3600)
        served = refused = 0
        errors: list[str] = []

        async def one() -> None:
            nonlocal served, refused
            try:
                async with tracker.guard(
                    provider="openai", model=MODEL, input_tokens=400, max_output_tokens=200
                ) as call:
                    served += 1
                    await asyncio.sleep(0.001)
                    await call.record(Usage(input_tokens=400, output_tokens=200))
            except BudgetExceeded as exc:
                assert exc.stage == "preflight"
                refused += 1
            except Exception as exc:
                errors.append(repr(exc))

        await asyncio.gather(*(one() for _ in range(calls)))
    print(json.dumps({"served": served, "refused": refused, "errors": errors}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), len(sys.argv) > 4 and sys.argv[4] == "hold"))
