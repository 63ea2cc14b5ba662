"""Instructions per request, call or chunk of the CPU-bound paths, which do not move with the load.

Run: .venv/bin/python bench/instructions.py [name ...]   (needs valgrind; 5-10 minutes for all)

Each scenario runs twice under `valgrind --tool=callgrind` with PYTHONHASHSEED=0, once with N
iterations and once with none, after the same warm-up; the difference divided by N is what one
iteration costs, start-up left out. The scenarios are bench/run.py's middleware apps,
bench/capture.py's clients and bench/pricing.py's calls. Wall times (`make bench`) depend on the
machine's speed that hour; these counts do not, so they tell whether a change made the code cheaper.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

N = {"middleware": 1_000, "call": 500, "chunk": 2_000, "pricing": 20_000}
SCENARIOS = {
    "middleware: bare Starlette app": ("middleware", "bare"),
    "middleware: + pure-ASGI ContextVar middleware": ("middleware", "+ pure"),
    "middleware: + BaseHTTPMiddleware, no-op": ("middleware", "+ Base"),
    "middleware: + SpendMiddleware": ("middleware", "+ Spend"),
    "call, body read in full: plain": ("call", "plain"),
    "call, body read in full: capture only": ("call", "capture"),
    "call, body to read: plain": ("call", "plain unread"),
    "call, body to read: capture only": ("call", "capture unread"),
    **{
        f"chunk, {shape}: {setup}": ("chunk", f"{setup}:{shape}")
        for shape in ("openai chat", "openai responses", "anthropic", "gemini")
        for setup in ("plain", "capture")
    },
    **{f"pricing: {model}": ("pricing", model) for model in ("gpt-4o-mini", "claude-sonnet", "gemini")},
}


async def middleware(which: str, n: int) -> None:
    import run

    from llm_spend import Budget, Tracker

    with tempfile.TemporaryDirectory() as folder:
        budgets = [Budget.daily(5, per="user_id", mode="block")]
        async with Tracker(f"sqlite+aiosqlite:///{Path(folder) / 'm.db'}", budgets=budgets) as tracker:
            await run.exhaust_one_user(tracker)
            app = next(app for name, (app, _) in run.build_apps(tracker).items() if name.startswith(which))
            await run.time_requests(app, 300)
            if n:
                await run.time_requests(app, n)


async def call(which: str, n: int) -> None:
    import capture

    from llm_spend.testing import FakeProviderTransport

    setup, _, unread = which.partition(" ")
    fake: Any = FakeProviderTransport(usage=capture.USAGE)
    fake.requests = collections.deque(maxlen=4)  # it keeps every request otherwise
    client = capture.client(
        capture.Unread(fake) if unread else fake, capture.StubTracker() if setup == "capture" else None
    )
    body = {"model": "gpt-4o-mini", "messages": capture.MESSAGES, "max_tokens": 500}
    for _ in range(50):
        await client.post(capture.CHAT, json=body)
    settle_heap()
    for _ in range(n):
        await client.post(capture.CHAT, json=body)


async def chunk(which: str, n: int) -> None:
    import capture

    from llm_spend.testing import FakeProviderTransport

    setup, _, shape = which.partition(":")
    url, body = capture.STREAMS[shape]
    guard = capture.StubTracker() if setup == "capture" else None
    for words in (3, 3, 3, 200 + n):  # warm-up streams, then one of 200 + n chunks (n = 0: 200)
        text = " ".join(f"w{i}" for i in range(words))
        client = capture.client(FakeProviderTransport(usage=capture.USAGE, text=text), guard)
        async with client.stream("POST", url, json=body) as response:
            async for _ in response.aiter_raw():
                pass


async def pricing(which: str, n: int) -> None:
    import pricing

    from llm_spend.pricing import Pricer

    provider, model, usage = next(case for case in pricing.CASES if case[1].startswith(which))
    pricer, at = Pricer(), datetime.now(UTC)
    for _ in range(50):
        pricer.price(provider, model, usage, at=at)
    settle_heap()
    for _ in range(n):
        pricer.price(provider, model, usage, at=at)


def settle_heap() -> None:
    """Collect, then freeze what is alive (gc.freeze): a full collection walks the whole heap (about
    100 ms here), and whether one falls inside the N iterations or not moved a count by thousands of
    instructions per iteration. Younger collections, which every iteration's garbage pays, still run."""
    gc.collect()
    gc.freeze()


def count(kind: str, which: str, n: int) -> int:
    """Instructions of one run of the scenario with n iterations, under callgrind."""
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable]
    command += [__file__, "--inside", kind, which, str(n)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode or found is None:
        raise RuntimeError(f"{kind} {which}: callgrind failed\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", help="scenarios whose name contains one of these (default: all)")
    parser.add_argument("--inside", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    if args.inside:
        kind, which, n = args.inside
        kinds = {"middleware": middleware, "call": call, "chunk": chunk, "pricing": pricing}
        asyncio.run(kinds[kind](which, int(n)))
        return
    chosen = {
        name: s for name, s in SCENARIOS.items() if not args.names or any(a in name for a in args.names)
    }
    print(f"instructions per iteration (callgrind, PYTHONHASHSEED=0), Python {sys.version.split()[0]}")
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        runs = {
            name: (pool.submit(count, kind, which, 0), pool.submit(count, kind, which, N[kind]))
            for name, (kind, which) in chosen.items()
        }
        for name, (none, some) in runs.items():
            kind = chosen[name][0]
            print(f"  {name:52} {(some.result() - none.result()) / N[kind]:>10,.0f}  per {kind}")


if __name__ == "__main__":
    main()
