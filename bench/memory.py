"""Memory: RSS while tracking many calls (issue 8 target: flat within 5 MB across 1,000,000 calls).

Run: .venv/bin/python bench/memory.py [CALLS]   (default 1,000,000; about 2 minutes per 1M here)
Prints RSS after each tenth of the run; the first tenth warms caches, pools and the allocator.
"""

from __future__ import annotations

import asyncio
import resource
import sys
import tempfile
from pathlib import Path

from llm_spend import Budget, Tracker

WAVE = 2_000


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


async def one(tracker: Tracker, i: int) -> None:
    tags = {"user_id": f"u{i % 1000}"}
    await tracker.track(
        provider="openai", model="gpt-4o-mini", input_tokens=100 + i % 50, output_tokens=20, tags=tags
    )


async def run(calls: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        budgets = [Budget.daily(10**6, per="user_id"), Budget.monthly(10**7)]
        async with Tracker(f"sqlite+aiosqlite:///{Path(tmp) / 'mem.db'}", budgets=budgets) as tracker:
            done, tenth, marks = 0, max(calls // 10, WAVE), []
            while done < calls:
                await asyncio.gather(
                    *(
                        tracker.track(
                            provider="openai",
                            model="gpt-4o-mini",
                            input_tokens=100 + i % 50,
                            output_tokens=20,
                            tags={"user_id": f"u{i % 1000}"},
                        )
                        for i in range(done, done + WAVE)
                    )
                )
                done += WAVE
                if done % tenth == 0:
                    marks.append(rss_mb())
                    print(f"  {done:>9,} calls  RSS {marks[-1]:7.1f} MB", flush=True)
    print(f"RSS growth after warm-up: {marks[-1] - marks[0]:+.1f} MB over {calls - tenth:,} calls")


if __name__ == "__main__":
    asyncio.run(run(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000))
