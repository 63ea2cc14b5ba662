"""tracker.health() and `llm-spend doctor`: what they report, healthy and not."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time
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
    assert not dataclasses.replace(health, spool_dropped=1).ok  # a call lost (LOST in the log) is not ok
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


def test_doctor_exit_status_and_json(
    sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`llm-spend doctor` exits 1 before the schema exists and 0 after `db upgrade`; --json is JSON."""
    (tmp_path / "ledger.db").touch()  # an empty SQLite database (doctor refuses a file not there)
    assert main(["doctor", "--url", sqlite_url]) == 1
    assert "FAIL schema revision none" in capsys.readouterr().out
    assert main(["db", "upgrade", "--url", sqlite_url]) == 0
    capsys.readouterr()
    assert main(["doctor", "--url", sqlite_url, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["schema_revision"] == HEAD_REVISION


async def test_a_database_never_migrated_is_reachable_and_asks_for_an_upgrade(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A database that answers but has no schema yet is reachable (not "unreachable"): the schema is
    what is wrong, and budgets and doctor say to run `llm-spend db upgrade`."""
    tracker = Tracker(
        db_url, auto_migrate=False, budgets=[Budget.daily(5, mode="block")], spool_path=tmp_path / "s.spool"
    )
    health = await tracker.health()
    await tracker.store.close()
    assert (health.database_ok, health.database_error, health.schema_current) == (True, None, False)
    assert not health.ok and health.schema_revision is None
    reason = health.budgets[0].reason or ""
    assert "llm-spend db upgrade" in reason and "unreachable" not in reason
    assert (
        await asyncio.to_thread(main, ["doctor", "--url", db_url, "--spool", str(tmp_path / "s.spool")]) == 1
    )
    out = capsys.readouterr().out
    assert (
        "ok   database reachable\n" in out and "FAIL schema revision none: run `llm-spend db upgrade`" in out
    )


async def test_a_database_that_never_answers_is_reported_within_the_timeout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A PostgreSQL port that accepts connections and never answers (a hung server): health() gives up
    after its database timeout and says so, rather than waiting the driver's minute with no message."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # connections queue in the kernel; nothing ever answers them
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{listener.getsockname()[1]}/x"
    try:
        tracker = Tracker(url, budgets=[Budget.daily(1, mode="block")], spool_path=tmp_path / "s.spool")
        started = time.monotonic()
        health = await tracker.health(database_timeout=0.5)
        elapsed = time.monotonic() - started
        await tracker.store.close()
        assert elapsed < 5 and health.database_error == "timed out after 0.5 s" and not health.database_ok
        assert health.budgets[0].active is False and "unreachable" in (health.budgets[0].reason or "")
        started = time.monotonic()
        doctor = ["doctor", "--url", url, "--spool", str(tmp_path / "s.spool"), "--timeout", "0.5"]
        assert await asyncio.to_thread(main, doctor) == 1
        assert time.monotonic() - started < 5
        assert "FAIL database reachable: timed out after 0.5 s" in capsys.readouterr().out
    finally:
        listener.close()


@pytest.mark.parametrize("command", [["report"], ["budgets"], ["db", "current"]])
def test_a_command_on_a_database_that_never_answers_gives_up_with_one_line(
    command: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every command bounds the wait for a PostgreSQL server to accept its connection (10 s; shorter
    here) and names the URL and what happened, rather than waiting the driver's minute."""
    from llm_spend.cli import db

    monkeypatch.setattr(db, "CONNECT_TIMEOUT", 0.5)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{listener.getsockname()[1]}/x"
    try:
        started = time.monotonic()
        assert main([*command, "--url", url]) == 1
        assert time.monotonic() - started < 5
    finally:
        listener.close()
    assert capsys.readouterr().err == f"llm-spend: cannot use --url {url}: no answer within 0.5 s\n"


async def test_a_database_error_is_reported_in_one_line(tmp_path: Path) -> None:
    """A file that is no database: `database_error` is the driver's reason in one line, without
    SQLAlchemy's SQL, parameters and link (which doctor printed)."""
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    tracker = Tracker(f"sqlite+aiosqlite:///{garbage}", spool_path=tmp_path / "s.spool")
    health = await tracker.health()
    await tracker.store.close()
    assert not health.ok and health.database_error is not None
    assert "\n" not in health.database_error and "sqlalche.me" not in health.database_error
    assert "not a database" in health.database_error
