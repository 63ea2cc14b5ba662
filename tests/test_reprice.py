"""Re-pricing the ledger: costs of recorded calls recomputed, rollups corrected in the same transaction."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine

from llm_spend import Budget, Tracker
from llm_spend.cli import main
from llm_spend.pricing import Pricer
from llm_spend.storage.repricing import reprice, unpriced_models
from llm_spend.storage.schema import calls, rollups


async def sums(url: str) -> dict[str, Any]:
    """The ledger's sums next to every rollup row's, per window."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            ledger = (
                await conn.execute(
                    select(func.coalesce(func.sum(calls.c.cost_nanousd), 0), func.count(calls.c.id)).where(
                        calls.c.cost_nanousd.is_(None)
                    )
                )
            ).one()
            total = (
                await conn.execute(select(func.coalesce(func.sum(calls.c.cost_nanousd), 0)))
            ).scalar_one()
            rows = (await conn.execute(select(calls.c.cost_nanousd, calls.c.tags))).all()
            windows = (
                await conn.execute(
                    select(
                        rollups.c.period,
                        rollups.c.scope_key,
                        rollups.c.scope_value,
                        rollups.c.spent_nanousd,
                        rollups.c.unknown_cost_calls,
                    )
                )
            ).all()
    finally:
        await engine.dispose()
    by_user: dict[str, int] = {}
    for cost, tags in rows:
        user = (tags if isinstance(tags, dict) else json.loads(tags)).get("user_id")
        if user is not None:
            by_user[user] = by_user.get(user, 0) + (cost or 0)
    return {"total": int(total), "unknown": ledger[1], "by_user": by_user, "windows": windows}


async def seed(url: str) -> Tracker:
    tracker = Tracker(url, budgets=[Budget.daily(100, per="user_id")])
    async with tracker:
        for i in range(30):
            model = "acme-mystery" if i % 3 else "gpt-4o-mini"
            await tracker.track(provider="acme" if i % 3 else "openai", model=model, input_tokens=1000 + i,
                                output_tokens=100, tags={"user_id": f"u{i % 4}"})  # fmt: skip
    return tracker


def check_consistent(state: dict[str, Any]) -> None:
    """Every rollup equals the ledger: global windows the total, per-user windows each user's sum."""
    for period, scope_key, scope_value, spent, unknown in state["windows"]:
        if scope_key == "":
            assert spent == state["total"], period
            assert unknown == state["unknown"], period
        else:
            assert spent == state["by_user"][scope_value], (period, scope_value)


async def test_reprice_prices_unknown_rows_and_corrects_rollups(db_url: str) -> None:
    """After an override for an unknown model, reprice fills its costs; rollups equal the ledger again."""
    await seed(db_url)
    before = await sums(db_url)
    assert before["unknown"] == 20
    check_consistent(before)
    tracker = Tracker(db_url)
    now = datetime.now(UTC)
    found = await unpriced_models(tracker.store, now - timedelta(days=1))
    assert [(m.provider, m.model, m.calls) for m in found] == [("acme", "acme-mystery", 20)]
    pricer = Pricer(price_overrides={"acme/acme-mystery": {"input": 1, "output": 2}})
    window = {"since": now - timedelta(days=1), "until": now + timedelta(minutes=1)}
    dry = await reprice(tracker.store, pricer, dry_run=True, **window)
    assert await sums(db_url) == before
    [change] = dry
    assert (change.calls, change.unknown_before, change.unknown_after) == (20, 20, 0)
    done = await reprice(tracker.store, pricer, **window)
    after = await sums(db_url)
    await tracker.store.close()
    assert done == dry
    assert after["unknown"] == 0
    assert after["total"] == before["total"] + change.after_nanousd
    check_consistent(after)
    again = Tracker(db_url)
    assert await reprice(again.store, pricer, **window) == []  # nothing left to change
    await again.store.close()


def test_reprice_and_check_commands(
    sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`prices check` lists the unpriced model; `reprice --dry-run` shows the change; `reprice` makes it."""
    asyncio.run(seed(sqlite_url))
    assert main(["prices", "check", "--url", sqlite_url]) == 0
    assert "acme-mystery" in capsys.readouterr().out
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"acme-mystery": {"input": 1, "output": 2}}))
    today = datetime.now(UTC).date().isoformat()
    args = ["reprice", "--url", sqlite_url, "--since", today, "--prices-file", str(prices)]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "acme-mystery" in out and "would change 20 calls" in out and "20->0" in out
    assert asyncio.run(sums(sqlite_url))["unknown"] == 20
    assert main(args) == 0
    assert "changed 20 calls" in capsys.readouterr().out
    assert asyncio.run(sums(sqlite_url))["unknown"] == 0
    assert main(["prices", "check", "--url", sqlite_url]) == 0
    assert "every model" in capsys.readouterr().out
