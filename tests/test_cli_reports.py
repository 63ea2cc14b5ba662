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
