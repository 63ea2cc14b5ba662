"""llm-spend demo: a FastAPI app whose LLM calls are costed, attributed and budgeted.

Run it from the repository root with ``make demo`` (or ``.venv/bin/python examples/demo.py``). It is
offline: the "LLM" is a fake OpenAI-compatible server on 127.0.0.1 (examples/fake_provider.py).

What happens:
1. The app tags every request with the caller's user id (SpendMiddleware) and every LLM call with
   the feature that made it (with_tags). Each call's usage is recorded with ``tracker.track(...)``.
2. Budgets: each user may spend $0.10 a day (block: over it, requests get HTTP 402), and the whole
   app $0.05 a month (notify: a callback prints, nothing is refused). Tiny limits, so that a few
   requests cross them.
3. A scripted set of requests from alice, bob and carol runs through the app; carol summarizes long
   documents until her budget refuses her.
4. The spend is read back from the database (plain SQL tables) and printed per user and per model.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from fake_provider import serve
from fastapi import FastAPI
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import create_async_engine

from llm_spend import Budget, BudgetExceeded, CallRecord, SpendMiddleware, Tracker, with_tags
from llm_spend.money import from_nanousd

# -- the app -------------------------------------------------------------------------------------------

SUPPORT_PROMPT = (
    "You are the support assistant of Acme Widgets. Answer in two sentences, be friendly, and point "
    "to the relevant help-center article when there is one. Never promise refunds. " * 6
)
SUMMARY_PROMPT = "Summarize the document below in five bullet points for a busy executive."


class ChatIn(BaseModel):
    message: str


class SummarizeIn(BaseModel):
    document: str


def build_app(tracker: Tracker, llm: httpx.AsyncClient) -> FastAPI:
    app = FastAPI(lifespan=tracker.lifespan)
    app.add_middleware(
        SpendMiddleware,
        tracker=tracker,
        tags=lambda request: {"user_id": request.headers.get("x-user", "anonymous")},
    )

    async def complete(model: str, system: str, user: str, max_tokens: int) -> tuple[str, CallRecord]:
        """Call the (fake) OpenAI chat completions API and record the usage it reports."""
        started = time.perf_counter()
        response = await llm.post(
            "/v1/chat/completions",
            json={
                "model": model,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
                "max_tokens": max_tokens,
            },
        )
        response.raise_for_status()
        body = response.json()
        usage = body["usage"]
        record = await tracker.track(  # raises BudgetExceeded when this call takes a budget over
            provider="openai",
            model=body["model"],  # the dated snapshot the provider says it used
            input_tokens=usage["prompt_tokens"],  # includes the cached tokens, as OpenAI counts them
            output_tokens=usage["completion_tokens"],
            cache_read_tokens=usage.get("prompt_tokens_details", {}).get("cached_tokens", 0),
            provider_response_id=body["id"],
            latency_ms=round((time.perf_counter() - started) * 1000),
        )
        return body["choices"][0]["message"]["content"], record

    @app.post("/chat")
    async def chat(payload: ChatIn) -> dict[str, Any]:
        with with_tags(feature="chat"):
            answer, record = await complete("gpt-4o-mini", SUPPORT_PROMPT, payload.message, max_tokens=150)
        return {"answer": answer, "cost_usd": str(record.cost)}

    @app.post("/summarize")
    async def summarize(payload: SummarizeIn) -> dict[str, Any]:
        return await summarize_document(payload.document)

    @with_tags(feature="summarize")  # with_tags also works as a decorator
    async def summarize_document(document: str) -> dict[str, Any]:
        summary, record = await complete("gpt-4o", SUMMARY_PROMPT, document, max_tokens=800)
        return {"summary": summary, "cost_usd": str(record.cost)}

    return app


def on_exceeded(exc: BudgetExceeded) -> None:
    """Called once per window, at the first call that takes a notify-mode budget over its limit."""
    print(f"  [notify] the app's {exc.period} budget of ${exc.limit} is crossed: ${exc.spent:.6f} spent")


# -- the scripted traffic ---------------------------------------------------------------------------------

# About 11,000 and 800 prompt tokens: one summary of the long document costs carol about $0.035.
LONG_DOCUMENT = "Quarterly results: revenue grew in every region while costs stayed flat. " * 600
SHORT_DOCUMENT = "Meeting notes: ship the widget redesign on Friday; Bob owns the launch email. " * 40

SCRIPT: list[tuple[str | None, str, dict[str, str]]] = [
    ("alice", "/chat", {"message": "How do I reset my widget?"}),
    ("bob", "/chat", {"message": "Where is my order #4411?"}),
    ("alice", "/chat", {"message": "And how do I pair it with my phone?"}),
    ("carol", "/summarize", {"document": LONG_DOCUMENT}),
    ("bob", "/summarize", {"document": SHORT_DOCUMENT}),
    ("carol", "/summarize", {"document": LONG_DOCUMENT}),
    ("alice", "/chat", {"message": "Can I change the widget's color?"}),
    ("carol", "/summarize", {"document": LONG_DOCUMENT}),  # takes carol over her $0.10: 402 after the call
    ("carol", "/chat", {"message": "Why was my summary refused?"}),  # refused before the endpoint runs
    ("bob", "/chat", {"message": "Thanks, found it."}),  # other users are not affected
    (None, "/chat", {"message": "Do you ship to Canada?"}),  # no X-User header: user_id "anonymous"
]


async def drive(app: FastAPI) -> list[httpx.Response]:
    """Send the scripted requests through the app in-process and print one line per request."""
    refusals: list[httpx.Response] = []
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://demo") as client:
        for user, path, payload in SCRIPT:
            headers = {"x-user": user} if user else {}
            response = await client.post(path, json=payload, headers=headers)
            body = response.json()
            if response.status_code == 200:
                outcome = f"${Decimal(body['cost_usd']):.6f}"
            else:
                refusals.append(response)
                budget = f"the {body['period']} budget of ${body['limit']}"
                outcome = (
                    f"refused at {body['stage']}: over {budget} for {body['scope']}={body['scope_value']}"
                )
            print(f"  {user or '(none)':<7} POST {path:<11} -> {response.status_code}  {outcome}")
    return refusals


# -- reading the ledger back ------------------------------------------------------------------------------

llm_calls = sa.table(
    "llm_calls",
    sa.column("model"),
    sa.column("input_tokens"),
    sa.column("cache_read_tokens"),
    sa.column("output_tokens"),
    sa.column("cost_nanousd"),
    sa.column("tags", sa.JSON),
)
llm_spend_rollups = sa.table(
    "llm_spend_rollups",
    sa.column("period"),
    sa.column("scope_key"),
    sa.column("scope_value"),
    sa.column("spent_nanousd"),
)

HEADER = f"{'calls':>5} {'input tok':>10} {'cached':>8} {'output tok':>10} {'cost USD':>11}"


def row(label: str, calls: int, tokens_in: int, cached: int, tokens_out: int, nanousd: int) -> str:
    cost = from_nanousd(nanousd)
    return f"  {label:<24}{calls:>5} {tokens_in:>10,} {cached:>8,} {tokens_out:>10,} {cost:>11.6f}"


async def print_report(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            per_model = (
                await conn.execute(
                    sa.select(
                        llm_calls.c.model,
                        sa.func.count(),
                        sa.func.sum(llm_calls.c.input_tokens),
                        sa.func.sum(llm_calls.c.cache_read_tokens),
                        sa.func.sum(llm_calls.c.output_tokens),
                        sa.func.sum(llm_calls.c.cost_nanousd),
                    )
                    .group_by(llm_calls.c.model)
                    .order_by(sa.func.sum(llm_calls.c.cost_nanousd).desc())
                )
            ).all()
            # Tags are a JSON column: JSON functions differ between SQLite and PostgreSQL, so group in Python.
            ledger = (
                await conn.execute(
                    sa.select(
                        llm_calls.c.tags,
                        llm_calls.c.input_tokens,
                        llm_calls.c.cache_read_tokens,
                        llm_calls.c.output_tokens,
                        llm_calls.c.cost_nanousd,
                    )
                )
            ).all()
            monthly_total = (
                await conn.execute(
                    sa.select(sa.func.sum(llm_spend_rollups.c.spent_nanousd)).where(
                        llm_spend_rollups.c.period == "month", llm_spend_rollups.c.scope_key == ""
                    )
                )
            ).scalar_one()
    finally:
        await engine.dispose()

    per_user: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    for tags, tokens_in, cached, tokens_out, nanousd in ledger:
        sums = per_user[tags.get("user_id", "?")]
        for i, value in enumerate((1, tokens_in, cached, tokens_out, nanousd or 0)):
            sums[i] += value

    print(f"\nSpend per user (llm_calls, grouped by tags['user_id'])\n  {'user':<24}{HEADER}")
    for user, sums in sorted(per_user.items(), key=lambda item: -item[1][4]):
        print(row(user, *sums))
    print(f"\nSpend per model (llm_calls, GROUP BY model)\n  {'model':<24}{HEADER}")
    for model, *sums in per_model:
        print(row(model, *sums))
    total = from_nanousd(sum(sums[4] for sums in per_user.values()))
    print(f"\n  ledger total ${total:.6f} = this month's rollup ${from_nanousd(monthly_total):.6f}")


# -- main -----------------------------------------------------------------------------------------------


async def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="llm-spend-demo-"))
    url = f"sqlite+aiosqlite:///{workdir / 'ledger.db'}"
    tracker = Tracker(
        url,
        budgets=[
            Budget.daily(0.10, per="user_id", mode="block"),  # each user: $0.10 a day, then HTTP 402
            Budget.monthly(0.05, mode="notify"),  # the whole app: tell us, refuse nothing
        ],
        on_exceeded=on_exceeded,
    )
    print(f"Ledger: {url}\n")
    with serve() as provider_url:
        print(f"Fake LLM provider on {provider_url}; scripted requests:")
        async with httpx.AsyncClient(base_url=provider_url) as llm:
            app = build_app(tracker, llm)
            # httpx.ASGITransport does not run the lifespan: enter it here, as uvicorn would.
            async with app.router.lifespan_context(app):
                refusals = await drive(app)

    if not refusals:
        print("expected a request to be refused with 402, none was", file=sys.stderr)
        return 1
    print(
        "\n402 at post: the call was made and recorded, and took carol over her limit; the middleware turned"
        "\nthe BudgetExceeded into a 402. 402 at preflight: refused from memory before the endpoint ran."
    )
    last = refusals[-1]
    print(f"\nThe last refusal: HTTP {last.status_code}, Retry-After: {last.headers['retry-after']}")
    print(json.dumps(last.json(), indent=2))

    await print_report(url)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
