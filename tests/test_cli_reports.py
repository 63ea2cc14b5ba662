"""`llm-spend report`: tables, CSV (formula-escaped) and JSON that match the ledger."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

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
    assert {d["group"]["model"]: d["calls"] for d in data} == {"gpt-4o": 2, "gpt-4o-mini": 1}
    assert main(["report", "--url", sqlite_url, "--where", "nonsense"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


async def seed_dated(url: str, days_ago: list[int]) -> list[str]:
    from datetime import UTC, datetime, timedelta

    from llm_spend import Usage
    from llm_spend.storage.store import PendingWrite

    async with Tracker(url) as tracker:
        records = [
            tracker._recorder.build(
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


def test_budgets_of_a_tracker_in_another_zone_say_which_zone_they_looked_in(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tracker at UTC+14 starts its windows at its own midnight: `budgets` without its
    `--timezone` finds none of them, and says in which zone it looked and what to give."""

    async def run() -> None:
        async with Tracker(sqlite_url, timezone="Pacific/Kiritimati") as tracker:
            await tracker.track(provider="openai", model="gpt-4o", input_tokens=1000, output_tokens=10)

    asyncio.run(run())
    assert main(["budgets", "--url", sqlite_url]) == 0
    assert capsys.readouterr().out == (
        "nothing recorded in the current day or month windows of UTC "
        "(give --timezone if the tracker's zone is another)\n"
    )
    assert main(["budgets", "--url", sqlite_url, "--timezone", "Pacific/Kiritimati"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]] == ["day", "month"]


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
    assert capsys.readouterr().err == "llm-spend: --daily: limit must be a number of USD, got 'lots'\n"


CLI = Path(sys.executable).with_name("llm-spend")


def usage_error(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    """The last line a command that argparse refuses prints (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as bad:
        main(args)
    out, err = capsys.readouterr()
    assert (bad.value.code, out) == (2, "") and "Traceback" not in err
    return err.splitlines()[-1]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=120, check=False)


def test_a_bad_or_unreachable_url_is_one_line_naming_it(tmp_path: Path) -> None:
    """A malformed URL or a sync driver exits 2, a server that refuses exits 1: one line on stderr
    naming --url and why, never a traceback."""
    cases = [
        (["report", "--url", "nonsense"], 2, "Could not parse"),
        (["doctor", "--url", "nonsense"], 2, "Could not parse"),
        (
            ["report", "--url", f"sqlite:///{tmp_path / 'sync.db'}"],
            2,
            "not an async SQLite or PostgreSQL URL",
        ),
        (["report", "--url", "postgresql+asyncpg://postgres:pw@127.0.0.1:1/x"], 1, "Connect call failed"),
        (
            ["db", "upgrade", "--url", "postgresql+asyncpg://postgres:pw@127.0.0.1:1/x"],
            1,
            "Connect call failed",
        ),
    ]
    for args, status, reason in cases:
        result = run_cli(*args)
        assert (result.returncode, result.stdout) == (status, ""), (args, result.stderr)
        [line] = result.stderr.splitlines()
        assert line.startswith("llm-spend: cannot use --url ") and reason in line, line
        assert "pw@" not in line  # the password is hidden
    assert not (tmp_path / "sync.db").exists()


@pytest.mark.parametrize(
    "command",
    [["report"], ["budgets"], ["export", "--since", "2026-01-01"], ["prune", "--older-than", "9d"],
     ["db", "current"], ["doctor"], ["prices", "check"], ["reprice", "--since", "2026-01-01"]],
    ids=lambda command: "-".join(command[:2]) if command[0] in ("db", "prices") else command[0],
)  # fmt: skip
def test_a_mistyped_sqlite_path_is_refused_not_created(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A command that reads an existing ledger names the missing SQLite file, exits 2, and creates
    no empty database there."""
    typo = tmp_path / "ledgr.db"
    assert main([*command, "--url", f"sqlite+aiosqlite:///{typo}"]) == 2
    err = capsys.readouterr().err
    assert f"no SQLite database at {typo}" in err and "cannot use --url" in err
    assert not typo.exists()


def test_a_ledger_never_migrated_is_refused_with_the_upgrade_hint(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """report, budgets and export on a reachable database without the schema exit 2 and say to run
    `llm-spend db upgrade` (no "no such table" traceback); after the upgrade they work."""
    from sqlalchemy.engine import make_url

    if db_url.startswith("sqlite"):
        Path(str(make_url(db_url).database)).touch()  # an existing, empty SQLite file
    for command in (["report"], ["budgets"], ["export", "--since", "2026-01-01"]):
        assert main([*command, "--url", db_url]) == 2
        assert "run `llm-spend db upgrade`" in capsys.readouterr().err
    assert main(["db", "upgrade", "--url", db_url]) == 0
    assert main(["report", "--url", db_url]) == 0


def test_budgets_top_must_be_a_positive_whole_number(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`budgets --top 0` or `-1` is a usage error naming --top (it printed "nothing recorded", and
    was a traceback on PostgreSQL), and so is one above 1,000,000 (past 2**63 - 1 it was an
    OverflowError traceback); current_windows(top=0) is a ValueError as budget_status's is."""
    from datetime import UTC, datetime
    from zoneinfo import ZoneInfo

    from llm_spend.reports import current_windows
    from llm_spend.storage.store import Store

    asyncio.run(seed(db_url))
    for top in ("0", "-1", "two", "1000001", "9223372036854775808", "99999999999999999999999"):
        assert usage_error(capsys, ["budgets", "--url", db_url, "--top", top]).endswith(
            f"argument --top: must be a positive whole number up to 1000000, got {top!r}"
        )
    for top in ("1", "1000000"):  # beyond 2**63 - 1 was an OverflowError (SQLite), a failed query (asyncpg)
        assert main(["budgets", "--url", db_url, "--top", top]) == 0
        assert "nothing recorded" not in capsys.readouterr().out

    async def windows(top: int) -> None:
        store = Store(db_url)
        try:
            await current_windows(store, ZoneInfo("UTC"), now=datetime.now(UTC), top=top)
        finally:
            await store.close()

    with pytest.raises(ValueError, match="top must be a positive integer"):
        asyncio.run(windows(0))


def test_report_groups_never_collide_with_output_columns(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Grouped by a tag named like a column (`--by calls`), JSON keeps the group under "group" and
    CSV names its column group.calls; a tag that clashes with nothing keeps its own name."""

    async def run() -> None:
        async with Tracker(sqlite_url) as tracker:
            for calls in ("batch-7", "batch-7", "interactive"):
                await tracker.track(provider="openai", model="gpt-4o", input_tokens=10, output_tokens=1,
                                    tags={"calls": calls, "user_id": "u"})  # fmt: skip

    asyncio.run(run())
    assert main(["report", "--url", sqlite_url, "--by", "calls", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(d["group"], d["calls"]) for d in data] == [
        ({"calls": "batch-7"}, 2),
        ({"calls": "interactive"}, 1),
    ]
    assert main(["report", "--url", sqlite_url, "--by", "calls", "--by", "user_id", "--format", "csv"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0][:4] == ["group.calls", "user_id", "cost_usd", "calls"] and len(set(rows[0])) == len(
        rows[0]
    )
    assert [(r[0], r[3]) for r in rows[1:]] == [("batch-7", "2"), ("interactive", "1")]


def test_output_into_a_closed_pipe_ends_quietly(sqlite_url: str) -> None:
    """`llm-spend export | head -n 1` and a report whose reader is gone end with status 1 and
    nothing on stderr (it was a BrokenPipeError traceback)."""
    asyncio.run(seed_dated(sqlite_url, [0] * 3000))  # far more than a pipe holds
    export = subprocess.Popen(
        [str(CLI), "export", "--url", sqlite_url, "--since", "2000-01-01", "--format", "jsonl"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert export.stdout is not None and json.loads(export.stdout.readline())["model"] == "gpt-4o-mini"
    export.stdout.close()  # what `head -n 1` does once it has its line
    _, err = export.communicate(timeout=120)
    assert (export.returncode, err) == (1, "")
    report = subprocess.Popen(
        [str(CLI), "report", "--url", sqlite_url, "--by", "day"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert report.stdout is not None
    report.stdout.close()  # gone before the command writes its table
    _, err = report.communicate(timeout=120)
    assert (report.returncode, err) == (1, "")


@pytest.mark.parametrize("days", ["0", "-5", "99999999999"])
def test_prices_check_days_out_of_range_is_refused(
    days: str, sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`prices check --days` outside 1-3660 exits 2 naming the option (0 claimed every model priced)."""
    assert main(["db", "upgrade", "--url", sqlite_url]) == 0
    assert main(["prices", "check", "--url", sqlite_url, "--days", days]) == 2
    assert f"--days must be from 1 to 3660, got {int(days)}" in capsys.readouterr().err


@pytest.mark.parametrize("age", ["36501d", "5215w", "800000d", "99999999999d", "99999999999999999999999w"])
def test_prune_older_than_more_than_100_years_is_refused(
    age: str, sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`prune --older-than 800000d` (a cutoff before year 1) or `99999999999d` (past timedelta) were
    OverflowError tracebacks: a usage error naming --older-than; 100 years still runs."""
    asyncio.run(seed_dated(sqlite_url, [1]))
    assert usage_error(capsys, ["prune", "--url", sqlite_url, "--older-than", age]).endswith(
        f"argument --older-than: must be at most 36500d (100 years), got {age!r}"
    )
    assert main(["prune", "--url", sqlite_url, "--older-than", "36500d"]) == 0
    assert "deleted 0 ledger rows" in capsys.readouterr().out


def test_db_upgrade_into_a_folder_that_does_not_exist_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command line cannot work as given (exit 2), and says which folder is missing, where it
    exited 1 with SQLite's "unable to open database file"."""
    missing = tmp_path / "no-such-folder"
    url = f"sqlite+aiosqlite:///{missing / 'ledger.db'}"
    assert main(["db", "upgrade", "--url", url]) == 2
    folder = f"the folder of the SQLite database file, {missing}, does not exist"
    message = f"llm-spend: cannot use --url {url}: {folder}\n"
    assert capsys.readouterr() == ("", message)
    assert not missing.exists()


@pytest.mark.parametrize("command", [["report"], ["db", "upgrade"]])
def test_a_directory_as_the_sqlite_database_is_one_line_every_time(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SQLite database that cannot be opened (a directory): aiosqlite tells the worker thread of the
    failed connection to stop without waiting for it, and a worker that answered after the loop closed
    printed an "Event loop is closed" traceback after the error (1 run in 20 from a shell, most runs in
    one process). The command now ends only once that thread has: one line, every time."""
    url = f"sqlite+aiosqlite:///{tmp_path}"
    expected = f"llm-spend: cannot use --url {url}: unable to open database file"
    thread_errors: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    for _ in range(20):
        started = set(threading.enumerate())
        assert main([*command, "--url", url]) == 1
        assert capsys.readouterr().err.splitlines() == [expected]
        assert [t.name for t in set(threading.enumerate()) - started if t.is_alive()] == []
    assert [e.exc_value for e in thread_errors] == []
    result = run_cli(*command, "--url", url)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", expected + "\n")


def test_an_invalid_yaml_prices_file_is_one_line_naming_it(
    tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """PyYAML's message was five lines (its context, marks and a caret): one line naming --prices-file,
    the file, the problem and where it is; the same from `reprice`, before the ledger is touched."""
    prices = tmp_path / "prices.yaml"
    prices.write_text("gpt-4o: {input: 2.5, output: 10\nother: 3\n")
    expected = (
        f"llm-spend: --prices-file {prices}: is not valid YAML: expected ',' or '}}', but got ':'"
        " (line 2, column 6)"
    )
    result = run_cli(
        "prices", "explain", "--provider", "openai", "--model", "gpt-4o", "--prices-file", str(prices)
    )
    assert (result.returncode, result.stdout, result.stderr) == (2, "", expected + "\n")
    assert main(["db", "upgrade", "--url", sqlite_url]) == 0
    capsys.readouterr()
    assert main(["reprice", "--url", sqlite_url, "--since", "2026-01-01", "--prices-file", str(prices)]) == 2
    assert capsys.readouterr().err == expected + "\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["budgets", "--daily", "abc"], "--daily: limit must be a number of USD, got 'abc'"),
        (
            ["budgets", "--monthly", "-1"],
            "--monthly: limit must be a finite, non-negative number of USD, got '-1'",
        ),
        (
            ["budgets", "--daily", "99999999999"],
            "--daily: limit must be at most 1,000,000,000 USD, got 99999999999",
        ),
        (["report", "--by", "user id"], "--by 'user id' must be day, month, model, provider or a tag key"),
        (["report", "--by", "model", "--by", "model"], "--by names 'model' twice"),
        (["report", "--where", "user id=x"], "--where key 'user id' must be model, provider or a tag key"),
        (
            ["report", "--by", "day", "--days", "3000"],
            "--days must be from 1 to 2000 with --by day, got 3000",
        ),
        (
            ["reprice", "--since", "2026-01-01", "--fallback-price", "a,b"],
            "--fallback-price: input must be a number of USD, got 'a'",
        ),
        (
            ["reprice", "--since", "2026-01-01", "--fallback-price", "1,-2"],
            "--fallback-price: output must be a finite, non-negative number of USD, got '-2'",
        ),
    ],
    ids=lambda value: "_".join(value)[:40] if isinstance(value, list) else None,
)
def test_errors_name_the_option_not_the_python_argument(
    args: list[str], message: str, sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad value is named by its option (--daily), never by the argument of the function the
    command calls (limit, group_by, where key, fallback_price): exit 2, one line, nothing on stdout."""
    assert main(["db", "upgrade", "--url", sqlite_url]) == 0
    capsys.readouterr()
    assert main([*args, "--url", sqlite_url]) == 2
    assert capsys.readouterr() == ("", f"llm-spend: {message}\n")


def test_report_by_day_takes_up_to_2000_days(sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(seed_dated(sqlite_url, [0]))
    assert main(["report", "--url", sqlite_url, "--by", "day", "--days", "2000", "--format", "json"]) == 0
    assert [row["calls"] for row in json.loads(capsys.readouterr().out)] == [1]


@pytest.mark.parametrize(
    ("command", "since", "until"),
    [
        (["export"], "2026-01-01", "2025-01-01"),
        (["export"], "2026-01-01", "2026-01-01"),
        (["reprice"], "2027-01-01", "2026-01-01"),
        (["reprice", "--dry-run"], "2026-03-02", "2026-03-01"),
    ],
)
def test_a_reversed_date_range_is_a_usage_error(
    command: list[str], since: str, until: str, sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`export` or `reprice` with --until not after --since exited 0 having done nothing (export
    printed its CSV header): exit 2 naming both options, nothing on stdout."""
    asyncio.run(seed_dated(sqlite_url, [1]))
    assert main([*command, "--url", sqlite_url, "--since", since, "--until", until]) == 2
    assert capsys.readouterr() == ("", f"llm-spend: --until {until} must be after --since {since}\n")


@pytest.mark.parametrize("command", [["export"], ["reprice"], ["reprice", "--dry-run"]])
def test_a_range_starting_after_now_is_a_usage_error(
    command: list[str], sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--since after today with --until left to its default (now): exit 2 saying so, as a reversed
    range is (it exited 0 having done nothing)."""
    asyncio.run(seed_dated(sqlite_url, [1]))
    since = (datetime.now(UTC) + timedelta(days=2)).date().isoformat()
    assert main([*command, "--url", sqlite_url, "--since", since]) == 2
    assert capsys.readouterr() == (
        "",
        f"llm-spend: --since {since} is after now: give a past day, or --until\n",
    )


def test_a_where_key_given_twice_is_a_usage_error(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--where user_id=a --where user_id=b` kept the last value; all must match, so it is refused."""
    asyncio.run(seed_dated(sqlite_url, [1]))
    args = ["report", "--url", sqlite_url, "--where", "user_id=a", "--where", "user_id=b"]
    assert main(args) == 2
    assert capsys.readouterr() == ("", "llm-spend: --where names 'user_id' twice\n")


def test_prices_explain_names_the_option_of_a_bad_value(capsys: pytest.CaptureFixture[str]) -> None:
    """An empty --provider or --model is a usage error (it was "no price is known", exit 1); a bad
    token count names its option (--cache-read), not Usage's field (cache_read_tokens)."""
    explain = ["prices", "explain", "--provider", "openai", "--model", "gpt-4o"]
    for flag in ("--provider", "--model"):
        for empty in ("", " "):
            assert usage_error(capsys, [*explain, flag, empty]).endswith(
                f"argument {flag}: must not be empty"
            )
    for args, message in (
        (["--input", "-5"], "--input must not be negative, got -5"),
        (
            ["--input", "5", "--cache-read", "10"],
            "--cache-read + --cache-write (10 + 0) must not exceed --input (5)",
        ),
        (["--output", "5", "--reasoning", "9"], "--reasoning (9) must not exceed --output (5)"),
        (["--batch", "--service-tier", "priority"], "--batch contradicts --service-tier priority"),
    ):
        assert main([*explain, *args]) == 2
        assert capsys.readouterr() == ("", f"llm-spend: {message}\n")
    assert main(explain) == 0
