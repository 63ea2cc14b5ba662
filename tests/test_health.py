"""tracker.health() and `llm-spend doctor`: what they report, healthy and not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory

import llm_spend.storage.store as store_module
from llm_spend import Budget, Tracker
from llm_spend.cli import main
from llm_spend.storage.store import HEAD_REVISION


def test_head_revision_is_alembics_head() -> None:
    """HEAD_REVISION names the newest migration shipped in the package."""
    config = Config()
    config.set_main_option("script_location", str(Path(store_module.__file__).parent.parent / "migrations"))
    assert ScriptDirectory.from_config(config).get_current_head() == HEAD_REVISION


async def test_healthy_tracker_reports_ok(db_url: str) -> None:
    """A running tracker on a current schema: ok, its budgets active, nothing spooled or reserved."""
    budgets = [Budget.daily(5, per="user_id", mode="block"), Budget.monthly(100)]
    async with Tracker(db_url, budgets=budgets) as tracker:
        await tracker.track(provider="openai", model="no-such-model", input_tokens=1, output_tokens=1)
        health = await tracker.health()
    assert health.ok and health.database_ok and health.schema_revision == HEAD_REVISION
    assert health.pending_reservations == 0 and health.unknown_model_calls_last_day == 1
    assert [(b.description, b.mode, b.active) for b in health.budgets] == [
        ("daily $5 per user_id", "block", True),
        ("monthly $100", "notify", True),
    ]


async def test_unreachable_database_is_reported_not_raised(tmp_path: Path) -> None:
    """No server at the URL: health() says so, and every budget is inactive with the reason."""
    tracker = Tracker(
        "postgresql+asyncpg://postgres@127.0.0.1:1/none",
        budgets=[Budget.daily(1, mode="block")],
        spool_path=tmp_path / "s.spool",
    )
    health = await tracker.health()
    await tracker.store.close()
    assert not health.ok and not health.database_ok and "Connect" in (health.database_error or "")
    assert health.budgets[0].active is False and "unreachable" in (health.budgets[0].reason or "")


def test_doctor_exit_status_and_json(sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`llm-spend doctor` exits 1 before the schema exists and 0 after `db upgrade`; --json is JSON."""
    assert main(["doctor", "--url", sqlite_url]) == 1
    assert "FAIL schema revision none" in capsys.readouterr().out
    assert main(["db", "upgrade", "--url", sqlite_url]) == 0
    capsys.readouterr()
    assert main(["doctor", "--url", sqlite_url, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["schema_revision"] == HEAD_REVISION
