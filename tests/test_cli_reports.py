"""`llm-spend report`: tables, CSV (formula-escaped) and JSON that match the ledger."""

from __future__ import annotations

import asyncio
import csv
import io
import json

import pytest

from llm_spend import Tracker
from llm_spend.cli import main


async def seed(url: str) -> None:
    async with Tracker(url) as tracker:
        for user, model, tokens in (
            ("alice", "gpt-4o-mini", 1000),
            ("alice", "gpt-4o", 2000),
            ("=HYPERLINK()", "gpt-4o", 10),
        ):
            await tracker.track(provider="openai", model=model, input_tokens=tokens, output_tokens=100,
                                tags={"user_id": user, "feature": "chat"})  # fmt: skip


def test_report_table_csv_and_json(sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The same report as a table, as CSV with formula cells escaped, and as JSON summing to the ledger."""
    asyncio.run(seed(sqlite_url))
    assert (
        main(["report", "--url", sqlite_url, "--by", "model", "--by", "user_id", "--where", "feature=chat"])
        == 0
    )
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["model", "user_id", "cost_usd"] and set(table[1]) <= {"-", " "}
    assert len(table) == 5
    assert main(["report", "--url", sqlite_url, "--by", "user_id", "--format", "csv"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0][:3] == ["user_id", "cost_usd", "calls"]
    assert [rows[1][0], rows[1][2]] == ["'=HYPERLINK()", "1"]  # escaped, never a live formula
    assert main(["report", "--url", sqlite_url, "--by", "model", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {d["model"]: d["calls"] for d in data} == {"gpt-4o": 2, "gpt-4o-mini": 1}
    assert main(["report", "--url", sqlite_url, "--where", "nonsense"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


async def seed_dated(url: str, days_ago: list[int]) -> list[str]:
    from datetime import UTC, datetime, timedelta

    from llm_spend import Usage
    from llm_spend.storage.store import PendingWrite

    async with Tracker(url) as tracker:
        records = [
            tracker._build(
                provider="openai", model="gpt-4o-mini", usage=Usage(input_tokens=100, output_tokens=10),
                usage_source="manual", tags={"user_id": "=cmd|x"},
                occurred_at=datetime.now(UTC) - timedelta(days=n),
            )
            for n in days_ago
        ]  # fmt: skip
        windows = tracker.budget_guard.windows
        await tracker.store.write([PendingWrite(r, windows(r.tags, r.occurred_at)) for r in records])
    return [r.event_id for r in records]


def rollup_total(url: str) -> int:
    import sqlite3

    from sqlalchemy.engine import make_url

    conn = sqlite3.connect(str(make_url(url).database))
    try:
        return int(
            conn.execute("SELECT sum(calls) FROM llm_spend_rollups WHERE scope_key = ''").fetchone()[0]
        )
    finally:
        conn.close()


def test_export_streams_the_range_as_csv_and_jsonl(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`llm-spend export` writes exactly the rows of the range, with formula-looking cells escaped."""
    from datetime import UTC, datetime, timedelta

    ids = asyncio.run(seed_dated(sqlite_url, [1, 2, 40, 41]))
    since = (datetime.now(UTC) - timedelta(days=10)).date().isoformat()
    assert main(["export", "--url", sqlite_url, "--since", since, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert sorted(r["event_id"] for r in rows) == sorted(ids[:2])
    assert rows[0]["tags"].startswith("{") and rows[0]["cost_usd"]
    assert main(["export", "--url", sqlite_url, "--since", "2000-01-01", "--format", "jsonl"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(line["event_id"] for line in lines) == sorted(ids)
    assert lines[0]["tags"] == {"user_id": "=cmd|x"}


def test_prune_deletes_old_rows_and_keeps_rollup_totals(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`llm-spend prune --older-than 30d` deletes the old ledger rows; rollups still count them."""
    asyncio.run(seed_dated(sqlite_url, [1, 2, 40, 41, 100]))
    before = rollup_total(sqlite_url)
    assert main(["prune", "--url", sqlite_url, "--older-than", "30d"]) == 0
    out = capsys.readouterr().out
    assert "deleted 3 ledger rows" in out and "2 remain" in out
    assert rollup_total(sqlite_url) == before
    with pytest.raises(SystemExit) as bad:
        main(["prune", "--url", sqlite_url, "--older-than", "soon"])
    assert bad.value.code == 2 and "not an age" in capsys.readouterr().err


def test_budgets_lists_current_windows(sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`llm-spend budgets` shows today's and this month's global and per-tag windows with their spend."""
    from llm_spend import Budget

    async def run() -> None:
        async with Tracker(sqlite_url, budgets=[Budget.daily(5, per="user_id")]) as tracker:
            for user in ("a", "a", "b"):
                await tracker.track(provider="openai", model="gpt-4o", input_tokens=1000, output_tokens=10,
                                    tags={"user_id": user})  # fmt: skip

    asyncio.run(run())
    assert main(["budgets", "--url", sqlite_url]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[2:]]
    assert [(r[0], r[2], r[5]) for r in rows] == [
        ("day", "all", "3"), ("day", "user_id=a", "2"), ("day", "user_id=b", "1"), ("month", "all", "3"),
    ]  # fmt: skip


REPORT_SNAPSHOT = """\
model        user_id       cost_usd  calls  input_tokens  output_tokens  cache_read_tokens  cache_write_tokens  reasoning_tokens  unknown_cost_calls
-----------  ------------  --------  -----  ------------  -------------  -----------------  ------------------  ----------------  ------------------
gpt-4o       =HYPERLINK()  0.001025      1            10            100                  0                   0                 0                   0
gpt-4o       alice            0.006      1          2000            100                  0                   0                 0                   0
gpt-4o-mini  alice          0.00021      1          1000            100                  0                   0                 0                   0
"""  # noqa: E501


def test_report_table_snapshot(sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The table, byte for byte: keys left-aligned, sums right-aligned, costs priced by hand
    (gpt-4o $2.50/$10 and gpt-4o-mini $0.15/$0.60 per million tokens in/out)."""
    asyncio.run(seed(sqlite_url))
    assert main(["report", "--url", sqlite_url, "--by", "model", "--by", "user_id"]) == 0
    assert capsys.readouterr().out == REPORT_SNAPSHOT
    assert main(["report", "--url", sqlite_url, "--format", "json"]) == 0
    [total] = json.loads(capsys.readouterr().out)
    assert (total["cost_usd"], total["calls"], total["input_tokens"]) == ("0.007235", 3, 3010)


def test_report_days_are_whole_days_ending_today(sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--days 1 is today only; --days 2 adds yesterday; --by day names each (UTC) day."""
    from datetime import UTC, datetime, timedelta

    asyncio.run(seed_dated(sqlite_url, [0, 1, 3]))
    today = datetime.now(UTC).date()
    counts = {}
    for days in (1, 2, 4):
        assert main(["report", "--url", sqlite_url, "--days", str(days), "--format", "json"]) == 0
        counts[days] = json.loads(capsys.readouterr().out)[0]["calls"]
    assert counts == {1: 1, 2: 2, 4: 3}
    assert main(["report", "--url", sqlite_url, "--days", "4", "--by", "day", "--format", "csv"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))[1:]
    assert [r[0] for r in rows] == [str(today - timedelta(days=n)) for n in (3, 1, 0)]
    assert main(["report", "--url", sqlite_url, "--days", "0"]) == 2
    assert "--days must be" in capsys.readouterr().err
    assert main(["report", "--url", sqlite_url, "--timezone", "Mars/Base"]) == 2
    assert "IANA" in capsys.readouterr().err


def test_budgets_against_limits_given_on_the_command_line(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--daily / --monthly show the global windows against those limits: spent, remaining, percent."""
    from datetime import UTC, datetime

    asyncio.run(seed(sqlite_url))
    assert main(["budgets", "--url", sqlite_url, "--daily", "0.01", "--monthly", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "budget", "window", "spent_usd", "reserved_usd", "remaining_usd", "percent", "projected_usd",
    ]  # fmt: skip
    now = datetime.now(UTC)
    assert [line.split()[:7] for line in lines[2:]] == [
        ["daily", "$0.01", now.date().isoformat(), "0.007235", "0", "0.002765", "72.4%"],
        ["monthly", "$5", now.date().replace(day=1).isoformat(), "0.007235", "0", "4.992765", "0.1%"],
    ]
    assert main(["budgets", "--url", sqlite_url, "--daily", "lots"]) == 2
    assert "limit must be a number" in capsys.readouterr().err
