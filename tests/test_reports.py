"""Reports: sums grouped by day, month, model, provider and tags equal hand-computed ones, on both DBs."""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest

from llm_spend import Tracker, Usage
from llm_spend.money import from_nanousd
from llm_spend.storage.store import PendingWrite
from llm_spend.usage import CallRecord

# (UTC time, provider, model, tokens in, out, tags); New York is UTC-5 in November.
A_CHAT = {"user_id": "a", "feature": "chat"}
CALLS = [
    (datetime(2026, 10, 31, 23, 0, tzinfo=UTC), "openai", "gpt-4o-mini", 1000, 100, A_CHAT),
    (datetime(2026, 11, 1, 3, 0, tzinfo=UTC), "openai", "gpt-4o", 2000, 200, A_CHAT),
    (datetime(2026, 11, 1, 6, 0, tzinfo=UTC), "anthropic", "claude-sonnet-4-6", 3000, 300, {"user_id": "b"}),
    (
        datetime(2026, 11, 2, 4, 59, tzinfo=UTC),
        "openai",
        "gpt-4o-mini",
        500,
        50,
        {"user_id": "b", "feature": "x"},
    ),
    (
        datetime(2026, 11, 2, 5, 0, tzinfo=UTC),
        "acme",
        "mystery",
        700,
        70,
        {"feature": "chat", "subject": "S:42"},
    ),
]
START, END = datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)


async def seed(tracker: Tracker) -> list[CallRecord]:
    records = [
        tracker._recorder.build(
            provider=provider, model=model, usage=Usage(input_tokens=i, output_tokens=o),
            usage_source="manual", tags=tags, occurred_at=at,
        )
        for at, provider, model, i, o, tags in CALLS
    ]  # fmt: skip
    await tracker.store.write(
        [PendingWrite(r, tracker.budget_guard.windows(r.tags, r.occurred_at)) for r in records]
    )
    return records


def expected(records: list[CallRecord], key: object) -> dict[object, tuple[Decimal, int, int]]:
    sums: dict[object, list[int]] = defaultdict(lambda: [0, 0, 0])
    for record in records:
        s = sums[key(record)]  # type: ignore[operator]
        s[0] += record.cost_nanousd or 0
        s[1] += 1
        s[2] += record.cost_nanousd is None
    return {k: (from_nanousd(v[0]), v[1], v[2]) for k, v in sums.items()}


def got(rows: list, names: tuple[str, ...]) -> dict[object, tuple[Decimal, int, int]]:  # type: ignore[type-arg]
    return {
        (row.key if len(names) > 1 else row.key[0]): (row.cost, row.calls, row.unknown_cost_calls)
        for row in rows
    }


async def test_reports_by_model_tag_day_and_month_in_the_trackers_zone(db_url: str) -> None:
    """Groupings by model, provider, a tag, and New York days and months equal hand-computed sums."""
    async with Tracker(db_url, timezone="America/New_York") as tracker:
        records = await seed(tracker)
        by_model = await tracker.report(start=START, end=END, group_by=("model",))
        by_user = await tracker.report(start=START, end=END, group_by=["user_id"])
        by_day = await tracker.report(start=START, end=END, group_by=("day",))
        by_month_provider = await tracker.report(start=START, end=END, group_by=("month", "provider"))
        total = await tracker.total(start=START, end=END)
    assert got(by_model, ("model",)) == expected(records, lambda r: r.model)
    assert got(by_user, ("user_id",)) == expected(records, lambda r: r.tags.get("user_id"))
    days = ("2026-10-31", "2026-10-31", "2026-11-01", "2026-11-01", "2026-11-02")
    new_york = {record.event_id: day for record, day in zip(records, days, strict=True)}
    assert got(by_day, ("day",)) == expected(records, lambda r: new_york[r.event_id])
    assert got(by_month_provider, ("month", "provider")) == expected(
        records, lambda r: (new_york[r.event_id][:7], r.provider)
    )
    assert by_day[0].group == {"day": "2026-10-31"}
    assert total.calls == 5 and total.unknown_cost_calls == 1
    assert total.cost == sum((r.cost or Decimal(0) for r in records), Decimal(0))
    assert total.input_tokens == sum(c[3] for c in CALLS) and total.output_tokens == sum(c[4] for c in CALLS)


async def test_where_filters_and_one_tracked_object(db_url: str) -> None:
    """where= narrows by tags and model; the cost of one tracked object is one tag filter away."""
    async with Tracker(db_url) as tracker:
        records = await seed(tracker)
        chat = await tracker.total(start=START, end=END, where={"feature": "chat"})
        chat_mini = await tracker.total(
            start=START, end=END, where={"feature": "chat", "model": "gpt-4o-mini"}
        )
        subject = await tracker.report(start=START, end=END, where={"subject": "S:42"}, group_by=["model"])
        last_days = await tracker.report(
            start=datetime(2026, 11, 1, tzinfo=UTC), end=datetime(2026, 11, 3, tzinfo=UTC), group_by=["day"]
        )
    assert (chat.calls, chat.cost) == (3, (records[0].cost or 0) + (records[1].cost or 0))
    assert chat.unknown_cost_calls == 1
    assert (chat_mini.calls, chat_mini.cost) == (1, records[0].cost)
    assert [(r.key, r.calls) for r in subject] == [(("mystery",), 1)]
    assert [r.group["day"] for r in last_days] == ["2026-11-01", "2026-11-02"]
    assert sum(r.calls for r in last_days) == 4


async def test_bad_report_arguments_name_the_field(sqlite_url: str) -> None:
    """Unknown group_by or where keys, bounds that are not aware datetimes, reversed ranges: each is
    a ValueError naming the problem."""
    async with Tracker(sqlite_url) as tracker:
        with pytest.raises(ValueError, match="group_by 'bad key'"):
            await tracker.report(start=START, end=END, group_by=["bad key"])
        with pytest.raises(ValueError, match="where key"):
            await tracker.report(start=START, end=END, where={"no way": "x"})
        with pytest.raises(ValueError, match="start must be an aware datetime"):
            await tracker.report(start=datetime(2026, 1, 1), end=END)
        with pytest.raises(ValueError, match=r"start must be an aware datetime, got datetime.date\(2026"):
            await tracker.total(start=date(2026, 1, 1))
        with pytest.raises(ValueError, match="end must be an aware datetime"):
            await tracker.report(start=START, end="2026-12-01")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="end must be an aware datetime, got 0"):
            await tracker.report(start=START, end=0)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="group_by must be a key or a sequence of keys, got None"):
            await tracker.report(start=START, end=END, group_by=None)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="before end"):
            await tracker.report(start=END, end=START)
        with pytest.raises(ValueError, match="too long"):
            await tracker.report(start=START - timedelta(days=3000), end=END, group_by=["day"])


async def test_budget_status_per_window(db_url: str) -> None:
    """budget_status: each budget's current window with limit, spent, remaining, percent, projection."""
    from llm_spend import Budget

    budgets = [Budget.monthly(10), Budget.daily("0.01", per="user_id", mode="block"), Budget.per_call(1)]
    async with Tracker(db_url, budgets=budgets) as tracker:
        a = await tracker.track(provider="openai", model="gpt-4o", input_tokens=1000, output_tokens=100,
                                tags={"user_id": "a"})  # fmt: skip
        b = await tracker.track(provider="openai", model="gpt-4o", input_tokens=500, output_tokens=50,
                                tags={"user_id": "b"})  # fmt: skip
        status = await tracker.budget_status()
    monthly, user_a, user_b = status
    assert monthly.description == "monthly $10" and monthly.scope_value is None
    assert monthly.spent == (a.cost or 0) + (b.cost or 0) and monthly.reserved == 0
    assert monthly.remaining == Decimal(10) - monthly.spent
    assert monthly.window_end > datetime.now(UTC) > monthly.window_start
    assert monthly.projected >= monthly.spent
    assert (user_a.scope_value, user_a.spent) == ("a", a.cost)  # the biggest spender first
    assert (user_b.scope_value, user_b.spent) == ("b", b.cost)
    assert user_a.percent == (a.cost * 100 / Decimal("0.01")).quantize(Decimal("0.1"))  # type: ignore[operator]


async def test_whole_day_totals_read_the_rollups_which_keep_pruned_calls(db_url: str) -> None:
    """Over whole days without filters the report reads the rollups: deleting the ledger rows (what
    `llm-spend prune` does) leaves those totals intact, while ranges that cut a day read the ledger."""
    from sqlalchemy import delete

    from llm_spend.storage.schema import calls

    async with Tracker(db_url) as tracker:
        records = await seed(tracker)
        start, end = datetime(2026, 10, 31, tzinfo=UTC), datetime(2026, 11, 3, tzinfo=UTC)
        before = await tracker.report(start=start, end=end, group_by=["day"])
        async with tracker.store.engine.begin() as conn:
            await conn.execute(delete(calls))
        by_day = await tracker.report(start=start, end=end, group_by=["day"])
        by_month = await tracker.report(start=START, end=END, group_by=["month"])
        total = await tracker.total(start=start, end=end)
        cut = await tracker.total(start=start + timedelta(hours=1), end=end)
    assert by_day == before
    assert got(by_day, ("day",)) == expected(records, lambda r: r.occurred_at.date().isoformat())
    assert got(by_month, ("month",)) == expected(records, lambda r: r.occurred_at.date().isoformat()[:7])
    assert (total.calls, total.unknown_cost_calls) == (5, 1)
    assert total.input_tokens == sum(c[3] for c in CALLS)
    assert (cut.calls, cut.cost) == (0, 0)  # the ledger is empty now


async def test_rollups_of_another_time_zone_are_not_misread(db_url: str) -> None:
    """Rollups written by a New York tracker do not fit UTC days: a UTC report reads the ledger."""
    from zoneinfo import ZoneInfo

    from llm_spend.reports import report

    async with Tracker(db_url, timezone="America/New_York") as tracker:
        records = await seed(tracker)
        rows = await report(tracker.store, ZoneInfo("UTC"), start=START, end=END, group_by=["day"])
    assert got(rows, ("day",)) == expected(records, lambda r: r.occurred_at.date().isoformat())


async def test_a_day_whose_calls_sit_in_another_zones_earlier_window(db_url: str) -> None:
    """A UTC day whose only call, at 02:00 UTC, counts in New York's previous day window: the rollups
    hold no row starting inside that UTC day, so the report must notice and read the ledger."""
    from zoneinfo import ZoneInfo

    from llm_spend.reports import report

    async with Tracker(db_url, timezone="America/New_York") as tracker:
        record = tracker._recorder.build(
            provider="openai", model="gpt-4o", usage=Usage(input_tokens=10, output_tokens=1),
            usage_source="manual", tags={}, occurred_at=datetime(2026, 11, 10, 2, 0, tzinfo=UTC),
        )  # fmt: skip
        await tracker.store.write(
            [PendingWrite(record, tracker.budget_guard.windows(record.tags, record.occurred_at))]
        )
        start = datetime(2026, 11, 10, tzinfo=UTC)
        [total] = await report(tracker.store, ZoneInfo("UTC"), start=start, end=start + timedelta(days=1))
    assert (total.calls, total.cost) == (1, record.cost)


async def test_calls_without_the_tag_sort_last_on_every_backend(db_url: str) -> None:
    """Groups are sorted by key with a missing tag (None) last, on SQLite and PostgreSQL alike."""
    async with Tracker(db_url) as tracker:
        await seed(tracker)
        rows = await tracker.report(start=START, end=END, group_by=("feature", "model"))
    assert [r.key for r in rows] == [
        ("chat", "gpt-4o"), ("chat", "gpt-4o-mini"), ("chat", "mystery"), ("x", "gpt-4o-mini"),
        (None, "claude-sonnet-4-6"),
    ]  # fmt: skip
    assert rows[-1].group == {"feature": None, "model": "claude-sonnet-4-6"}


async def test_more_bad_arguments(sqlite_url: str) -> None:
    """A key grouped twice, a where value no tag takes (bytes; a float for a column), and a
    budget_status top below 1 or above a million (a count past 64 bits failed in the database)
    are refused."""
    async with Tracker(sqlite_url) as tracker:
        with pytest.raises(ValueError, match="group_by names 'model' twice"):
            await tracker.report(start=START, end=END, group_by=["model", "model"])
        with pytest.raises(ValueError, match=r"where\['user_id'\]: tag 'user_id' must be a string"):
            await tracker.report(start=START, end=END, where={"user_id": b"4.2"})
        with pytest.raises(ValueError, match=r"where\['model'\] must be a string"):
            await tracker.report(start=START, end=END, where={"model": 4.2})
        for top in (0, 10**6 + 1, 2**64):
            with pytest.raises(ValueError, match="top must be a positive integer, at most 1,000,000"):
                await tracker.budget_status(top=top)


async def test_monthly_projection_is_linear_in_elapsed_time(db_url: str) -> None:
    """Halfway through November, a month budget projects twice what was spent so far; a per-tag budget
    lists its windows by spend (bounded by `top`)."""
    from llm_spend import Budget
    from llm_spend.reports import budget_status

    budgets = [Budget.monthly("0.05"), Budget.monthly(1, per="user_id")]
    async with Tracker(db_url, budgets=budgets) as tracker:
        records = await seed(tracker)
        guard = tracker.budget_guard
        now = datetime(2026, 11, 16, tzinfo=UTC)
        status = await budget_status(tracker.store, guard.rules, guard.bounds, now=now, top=1)
    november = [r for r in records if r.occurred_at.month == 11]
    spent = sum((r.cost or Decimal(0) for r in november), Decimal(0))
    month, top_user = status
    assert (month.window_start, month.window_end) == (
        datetime(2026, 11, 1, tzinfo=UTC),
        datetime(2026, 12, 1, tzinfo=UTC),
    )
    assert month.spent == spent and month.projected == (spent * 2).quantize(Decimal("0.000001"))
    assert month.remaining == max(Decimal("0.05") - spent, Decimal(0))
    users = expected(november, lambda r: r.tags.get("user_id"))
    assert (top_user.scope_value, top_user.spent) == max(
        ((k, v[0]) for k, v in users.items() if k is not None), key=lambda kv: kv[1]
    )


async def test_where_values_match_tag_values_as_they_are_stored(db_url: str) -> None:
    """A where value is normalized as a tag value is when stored (NUL and lone surrogates replaced,
    cut at 256 UTF-8 bytes), so it finds the calls tagged with it, on both databases (PostgreSQL
    refused NUL in a where value; a long value matched nothing). A secret-looking key's values are
    stored redacted: "[REDACTED]" finds them (the dashboard links it), a secret finds nothing."""
    tags = {"user": "a\x00b", "note": "x" * 300, "odd": "\ud800z"}
    async with Tracker(db_url) as tracker:
        await tracker.track(
            provider="openai", model="gpt-4o-mini", input_tokens=10, output_tokens=5, tags=tags
        )
        for key, value in tags.items():
            assert (await tracker.total(start=START, where={key: value})).calls == 1, key
        assert (await tracker.total(start=START, where={"model": "gpt-4o-mini\x00"})).calls == 0
        await tracker.track(provider="openai", model="gpt-4o-mini", input_tokens=1, output_tokens=1,
                            tags={"api_key": "sk-1"})  # fmt: skip
        assert (await tracker.total(start=START, where={"api_key": "sk-1"})).calls == 0
        assert (await tracker.total(start=START, where={"api_key": "[REDACTED]"})).calls == 1
        for odd in ("a\x00b", "\ud800"):  # refused by both databases as a value, before
            assert (await tracker.total(start=START, where={"api_key": odd})).calls == 0


async def test_where_takes_every_tag_value_tags_take(db_url: str) -> None:
    """A UUID, a number or a bool tags a call through its string; the same value finds it in
    `where` (a UUID was refused there). A value with no string of its own is refused naming the key."""
    session = uuid.uuid4()
    tags = {"session": session, "n": 7, "beta": True}
    async with Tracker(db_url) as tracker:
        await tracker.track(
            provider="openai", model="gpt-4o-mini", input_tokens=10, output_tokens=5, tags=tags
        )
        for key, value in tags.items():
            assert (await tracker.total(start=START, where={key: value})).calls == 1, key
        assert (await tracker.total(start=START, where={"session": str(session)})).calls == 1
        assert (await tracker.total(start=START, where={"session": uuid.uuid4()})).calls == 0
        with pytest.raises(ValueError, match=r"where\['session'\]"):
            await tracker.total(start=START, where={"session": b"raw"})
        with pytest.raises(ValueError, match=r"where\['model'\] must be a string"):
            await tracker.total(start=START, where={"model": session})


async def test_group_by_takes_any_iterable_of_keys(sqlite_url: str) -> None:
    """A set or a dict's keys, as a tuple or a list (a review found them refused)."""
    async with Tracker(sqlite_url) as tracker:
        await tracker.track(provider="openai", model="gpt-4o-mini", input_tokens=1, output_tokens=1)
        by_set = await tracker.report(start=START, group_by={"model"})
        by_keys = await tracker.report(start=START, group_by={"model": 1}.keys())
    assert [row.group for row in by_set] == [row.group for row in by_keys] == [{"model": "gpt-4o-mini"}]
