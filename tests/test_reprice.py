"""Re-pricing the ledger: costs of recorded calls recomputed, rollups corrected in the same transaction."""

from __future__ import annotations

import asyncio
import json
import logging
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


async def ledger(url: str) -> list[tuple[int, int | None, str | None]]:
    """(id, cost, user_id tag) of every ledger row."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            query = select(calls.c.id, calls.c.cost_nanousd, calls.c.tags).order_by(calls.c.id)
            rows = (await conn.execute(query)).all()
    finally:
        await engine.dispose()
    return [(i, cost, (t if isinstance(t, dict) else json.loads(t)).get("user_id")) for i, cost, t in rows]


async def user_windows(url: str) -> dict[tuple[str, str], tuple[int, int, int]]:
    """(period, user) -> (calls, spent, unknown_cost_calls) of the per-user rollup windows."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            query = select(
                rollups.c.period,
                rollups.c.scope_value,
                rollups.c.calls,
                rollups.c.spent_nanousd,
                rollups.c.unknown_cost_calls,
            ).where(rollups.c.scope_key == "user_id")
            rows = (await conn.execute(query)).all()
    finally:
        await engine.dispose()
    return {(r[0], r[1]): (r[2], r[3], r[4]) for r in rows}


async def test_reprice_moves_a_per_tag_window_by_the_calls_it_counted_only(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Calls recorded without the per-user budgets (before they existed, or after they were dropped)
    are not in those windows: reprice moves each window by the change of the calls it counted, so it
    still equals their sum, and leaves a window whose calls the ledger cannot single out, saying so."""
    budgets = [Budget.daily(100, per="user_id"), Budget.monthly(1000, per="user_id")]
    phases = [
        ([], ["u1", "u1", "u1", "u5"]),  # before the per-user budgets
        (budgets, ["u1", "u1", "u2", "u2", "u4", "u5"]),  # with them
        ([], ["u4", "u4", "u5"]),  # after they were dropped
    ]
    counted_ids: set[int] = set()
    n = 0
    for phase_budgets, users in phases:
        async with Tracker(db_url, budgets=phase_budgets) as tracker:
            for user in users:
                n += 1
                priced = n == 5  # one call of the counted ones has a price already
                await tracker.track(
                    provider="openai" if priced else "acme",
                    model="gpt-4o-mini" if priced else "acme-mystery",
                    input_tokens=1000 + n,
                    output_tokens=100,
                    tags={"user_id": user},
                )
        if phase_budgets:
            counted_ids = {i for i, _, _ in await ledger(db_url)}
    counted_ids -= {i for i, _, _ in (await ledger(db_url))[:4]}  # the four calls before the budgets
    before = await user_windows(db_url)
    assert before[("day", "u1")] == (2, before[("day", "u1")][1], 1)
    pricer = Pricer(price_overrides={"acme/acme-mystery": {"input": 1, "output": 2}})
    now = datetime.now(UTC)
    tracker = Tracker(db_url)
    with caplog.at_level(logging.WARNING, logger="llm_spend"):
        await reprice(tracker.store, pricer, since=now - timedelta(days=1), until=now + timedelta(minutes=1))
    await tracker.store.close()
    rows, after, state = await ledger(db_url), await user_windows(db_url), await sums(db_url)
    assert state["unknown"] == 0
    for period, scope_key, _, spent, unknown in state["windows"]:
        if scope_key == "":  # every call counts in the global windows
            assert (spent, unknown) == (state["total"], 0), period
    for period in ("day", "month"):
        for user in ("u1", "u2", "u4"):  # the calls each window counted are identified
            mine = [cost for i, cost, u in rows if u == user and i in counted_ids]
            assert after[(period, user)] == (len(mine), sum(c or 0 for c in mine), 0), (period, user)
        assert after[(period, "u5")] == before[(period, "u5")]  # its one counted call is the middle one
    assert "user_id=u5" in caplog.text and "left as they were" in caplog.text
    assert "user_id=u1" not in caplog.text


async def test_overlapping_reprices_move_the_rollups_once(db_url: str) -> None:
    """Three runs of the same reprice at once: each call's cost changes once, and so do its windows."""
    await seed(db_url)
    before = await sums(db_url)
    pricer = Pricer(price_overrides={"acme/acme-mystery": {"input": 1, "output": 2}})
    now = datetime.now(UTC)
    window = {"since": now - timedelta(days=1), "until": now + timedelta(minutes=1)}
    stores = [Tracker(db_url).store for _ in range(3)]
    try:
        for store in stores:  # each connected, so the runs overlap
            [expected] = await reprice(store, pricer, dry_run=True, **window)
        done = await asyncio.gather(*(reprice(store, pricer, **window) for store in stores))
    finally:
        for store in stores:
            await store.close()
    assert sum(c.calls for changes in done for c in changes) == 20  # among the runs, once per call
    after = await sums(db_url)
    assert after["unknown"] == 0
    assert after["total"] == before["total"] + expected.after_nanousd
    check_consistent(after)


def test_reprice_keeps_the_cost_of_calls_the_given_prices_do_not_know(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`llm-spend reprice` without the app's fallback_price leaves the calls it priced as they are
    (their spend stays in the ledger and the budgets); with --fallback-price it reprices them."""

    async def record() -> None:
        async with Tracker(db_url, fallback_price={"input": 1, "output": 2}) as tracker:
            for i in range(10):
                await tracker.track(provider="acme", model="in-house-model", input_tokens=1_000_000,
                                    output_tokens=0, tags={"user_id": f"u{i % 2}"})  # fmt: skip

    asyncio.run(record())
    before = asyncio.run(sums(db_url))
    assert before["total"] == 10_000_000_000 and before["unknown"] == 0
    args = ["reprice", "--url", db_url, "--since", datetime.now(UTC).date().isoformat()]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "no call's cost changes" in out and "kept 10 priced calls of acme/in-house-model" in out
    assert asyncio.run(sums(db_url)) == before
    assert main([*args, "--fallback-price", "2,4"]) == 0
    assert "changed 10 calls" in capsys.readouterr().out
    after = asyncio.run(sums(db_url))
    assert (after["total"], after["unknown"]) == (20_000_000_000, 0)
    check_consistent(after)
    with pytest.raises(SystemExit):
        main([*args, "--fallback-price", "2"])  # not INPUT,OUTPUT: argparse's usage error
    assert main([*args, "--fallback-price", "2,x"]) == 2
    assert "--fallback-price: output must be a number of USD" in capsys.readouterr().err


def test_reprice_keeps_the_cost_of_calls_the_apps_overrides_priced(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A call priced by the Tracker's `price_overrides` keeps its cost when the command line (which
    takes no overrides) reprices the range: it was repriced at genai-prices' rate; the calls beside
    it that genai-prices priced are repriced as before (here: unchanged)."""

    async def record() -> None:
        overrides = {"openai/gpt-4o-mini": {"input": 1, "output": 1}}
        async with Tracker(db_url, price_overrides=overrides) as tracker:
            await tracker.track(
                provider="openai", model="gpt-4o-mini", input_tokens=1_000_000, output_tokens=0
            )
            await tracker.track(provider="openai", model="gpt-4o", input_tokens=1_000_000, output_tokens=0)

    asyncio.run(record())
    before = asyncio.run(sums(db_url))
    assert before["total"] == 1_000_000_000 + 2_500_000_000
    args = ["reprice", "--url", db_url, "--since", datetime.now(UTC).date().isoformat()]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "no call's cost changes" in out and "kept 1 priced calls of openai/gpt-4o-mini" in out
    assert asyncio.run(sums(db_url)) == before


def test_a_call_whose_price_source_alone_changes_is_relabelled_not_counted_as_changed(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Priced by an older genai-prices at the same rate, a call's cost stays; reprice names the new
    source on its row but does not list it among the calls whose cost changed (it did, at $0)."""

    async def pricing() -> tuple[int, str]:
        engine = create_async_engine(db_url)
        try:
            async with engine.connect() as conn:
                cost, source = (await conn.execute(select(calls.c.cost_nanousd, calls.c.price_source))).one()
        finally:
            await engine.dispose()
        return cost, source

    async def record_and_age() -> tuple[int, str]:
        async with Tracker(db_url) as tracker:
            await tracker.track(provider="openai", model="gpt-4o-mini", input_tokens=1000, output_tokens=100)
        engine = create_async_engine(db_url)
        try:
            async with engine.begin() as conn:
                cost, source = (await conn.execute(select(calls.c.cost_nanousd, calls.c.price_source))).one()
                await conn.execute(calls.update().values(price_source="genai-prices 0.0.1"))
        finally:
            await engine.dispose()
        return cost, source

    cost, source = asyncio.run(record_and_age())
    today = datetime.now(UTC).date().isoformat()
    args = ["reprice", "--url", db_url, "--since", today]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "no call's cost changes" in out and "would name the new price source of 1 calls" in out
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "no call's cost changes" in out and "named the new price source of 1 calls" in out
    assert asyncio.run(pricing()) == (cost, source)
    assert main(args) == 0
    assert "price source" not in capsys.readouterr().out  # nothing left to relabel


async def test_a_relabelled_call_leaves_its_windows_alone_and_is_not_identified_in_them(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A call whose price source alone changes moves no window: reprice does not look for which
    calls its per-tag windows count (queries for nothing), nor warns that such a window, counting
    calls the ledger cannot tell, was left as it was."""
    async with Tracker(db_url, budgets=[Budget.daily(100, per="user_id")]) as tracker:
        for n in range(3):
            await tracker.track(
                provider="openai",
                model="gpt-4o-mini",
                input_tokens=1000 + n,
                output_tokens=100,
                tags={"user_id": "u5"},
            )
    engine = create_async_engine(db_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(calls.update().values(price_source="genai-prices 0.0.1"))
            await conn.execute(  # a window whose count matches none of its calls' sets
                rollups.update().where(rollups.c.scope_value == "u5").values(calls=1, spent_nanousd=7)
            )
    finally:
        await engine.dispose()
    before = await user_windows(db_url)
    tracker = Tracker(db_url)
    now = datetime.now(UTC)
    with caplog.at_level(logging.WARNING, logger="llm_spend"):
        [change] = await reprice(
            tracker.store, Pricer(), since=now - timedelta(days=1), until=now + timedelta(minutes=1)
        )
    await tracker.store.close()
    assert (change.calls, change.relabelled) == (0, 3)
    assert await user_windows(db_url) == before
    assert "left as they were" not in caplog.text
