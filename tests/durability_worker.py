"""A process that tracks calls while the database refuses them, then waits to be killed.

Usage: python durability_worker.py URL CALLS. Prints one JSON line with the event ids once every
call went to the spool (used by test_durability.py, which SIGKILLs it).
"""

from __future__ import annotations

import asyncio
import json
import sys

from llm_spend import Tracker


async def main(url: str, calls: int) -> None:
    tracker = Tracker(url, auto_migrate=False)
    async with tracker:
        records = await asyncio.gather(
            *(
                tracker.track(provider="openai", model="gpt-4o-mini", input_tokens=10, output_tokens=5)
                for _ in range(calls)
            )
        )
        print(json.dumps({"spooled": tracker._recorder.writer.spooled if tracker._recorder.writer else 0,
                          "event_ids": [r.event_id for r in records]}), flush=True)  # fmt: skip
        await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
