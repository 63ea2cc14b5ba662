"""Budgets: limits, calendar windows in the tracker's timezone, and post-spend notify / raise / block."""

from __future__ import annotations

import asyncio
import copy
import logging
import pickle
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from llm_spend import Budget, BudgetExceeded, LLMSpendError, Tracker, with_tags
from llm_spend.budgets import window_bounds
from llm_spend.exceptions import PricesFileError, UnknownPriceError

Factory = Callable[..., Awaitable[Tracker]]

# gpt-4o at $2.50 / $10 per million tokens: 1200 in + 300 out = $0.006 exactly.
CALL: dict[str, Any] = {"provider": "openai", "model": "gpt-4o", "input_tokens": 1200, "output_tokens": 300}
CALL_COST = Decimal("0.006")
# 10,000 input tokens = $0.025
BIG_CALL: dict[str, Any] = {
    "provider": "openai",
    "model": "gpt-4o",
    "input_tokens": 10_000,
    "output_tokens": 0,
}
BIG_COST = Decimal("0.025")

NY = ZoneInfo("America/New_York")
PARIS = ZoneInfo("Europe/Paris")


async def count_calls(url: str) -> int:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(text("SELECT COUNT(*) FROM llm_calls"))).scalar_one())
    finally:
        await engine.dispose()


def guard_of(tracker: Tracker) -> Any:
    """The tracker's Guard (the object that maps a call to its budget windows)."""
    return tracker.budget_guard


# -- Budget construction ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (2, Decimal("2")),
        (0.001, Decimal("0.001")),
        (0.1, Decimal("0.1")),
        ("1.50", Decimal("1.50")),
        (Decimal("3.25"), Decimal("3.25")),
        (0, Decimal("0")),
    ],
    ids=["int", "float-0.001", "float-0.1", "str", "decimal", "zero"],
)
@pytest.mark.parametrize(
    "make", [Budget.per_call, Budget.daily, Budget.monthly], ids=["call", "day", "month"]
)
def test_limits_are_stored_as_exact_decimal(
    make: Callable[..., Budget], limit: Any, expected: Decimal
) -> None:
    """per_call/daily/monthly accept int, float, str and Decimal USD and store an exact Decimal."""
    budget = make(limit)
    assert isinstance(budget.limit, Decimal)
    assert budget.limit == expected
    assert str(budget.limit) == str(expected)


def test_budget_periods_scopes_and_modes() -> None:
    """Each constructor sets its period; per and mode are kept as given."""
    assert (Budget.per_call(1).period, Budget.daily(1).period, Budget.monthly(1).period) == (
        "call",
        "day",
        "month",
    )
    budget = Budget.daily(5, per="user_id", mode="block")
    assert (budget.per, budget.mode) == ("user_id", "block")
    assert Budget.monthly(5).per is None
    assert Budget.monthly(5).mode is None


@pytest.mark.parametrize(
    "limit",
    [
        -1,
        -0.01,
        "abc",
        "",
        float("nan"),
        float("inf"),
        Decimal("NaN"),
        Decimal("-Infinity"),
        True,
        False,
        None,
        [1],
    ],
    ids=[
        "neg-int",
        "neg-float",
        "abc",
        "empty",
        "nan",
        "inf",
        "dec-nan",
        "dec-neg-inf",
        "true",
        "false",
        "none",
        "list",
    ],
)
@pytest.mark.parametrize(
    "make", [Budget.per_call, Budget.daily, Budget.monthly], ids=["call", "day", "month"]
)
def test_bad_limits_raise_value_error_naming_limit(make: Callable[..., Budget], limit: Any) -> None:
    """A negative, non-numeric, non-finite or bool limit raises ValueError naming the field."""
    with pytest.raises(ValueError, match="limit"):
        make(limit)


@pytest.mark.parametrize(
    "per", ["a b", "", "k" * 65, "é", 5], ids=["space", "empty", "65-chars", "non-ascii", "int"]
)
@pytest.mark.parametrize("make", [Budget.daily, Budget.monthly], ids=["day", "month"])
def test_bad_per_keys_raise_value_error_naming_per(make: Callable[..., Budget], per: Any) -> None:
    """A per= that is not a valid tag key raises ValueError naming the field."""
    with pytest.raises(ValueError, match="per"):
        make(1, per=per)


@pytest.mark.parametrize(
    "make", [Budget.per_call, Budget.daily, Budget.monthly], ids=["call", "day", "month"]
)
def test_a_limit_beyond_what_the_ledger_sums_raises_naming_limit(make: Callable[..., Budget]) -> None:
    """A limit above 1e9 USD (a limit's nano-USD plus a window's spend must stay inside 64 bits;
    "1e30" as "unlimited" used to fail every guarded call with a StorageError) is refused."""
    assert make(10**9).limit == 10**9
    for limit in (10**9 + 1, "1e30", 10**12):
        with pytest.raises(ValueError, match=r"limit must be at most 1,000,000,000 USD"):
            make(limit)


@pytest.mark.parametrize("per", ["api_key", "session_token", "X-API-Key", "password"])
def test_a_budget_per_a_secret_looking_tag_is_refused(per: str) -> None:
    """Values of such keys are stored as [REDACTED]: every user would share one window."""
    with pytest.raises(ValueError, match=rf"per must not be a tag key that looks like a secret \('{per}'\)"):
        Budget.daily(1, per=per)


def test_bad_mode_raises_value_error_naming_mode() -> None:
    """A budget mode outside notify/raise/block raises ValueError naming the field."""
    with pytest.raises(ValueError, match="mode"):
        Budget.daily(1, mode="loud")  # type: ignore[arg-type]


def test_tracker_rejects_non_budget_objects(sqlite_url: str) -> None:
    """budgets= must hold Budget objects, in a list (one Budget alone, or None, named as such)."""
    with pytest.raises(ValueError, match=r"(?i)budget"):
        Tracker(sqlite_url, budgets=[5])  # type: ignore[list-item]
    for budgets in (Budget.daily(5), None, "daily"):
        with pytest.raises(ValueError, match=r"budgets must be a list of Budget objects"):
            Tracker(sqlite_url, budgets=budgets)  # type: ignore[arg-type]


# -- windows ----------------------------------------------------------------------------------------------


def test_day_window_in_new_york() -> None:
    """window_bounds("day") gives local midnight to local midnight, as aware UTC datetimes."""
    at = datetime(2024, 3, 15, 23, 59, 59, tzinfo=NY)
    start, end = window_bounds("day", at, NY)
    assert start == datetime(2024, 3, 15, tzinfo=NY)
    assert end == datetime(2024, 3, 16, tzinfo=NY)
    assert start == datetime(2024, 3, 15, 4, tzinfo=UTC)  # EDT is UTC-4
    assert start.utcoffset() == timedelta(0)
    assert end.utcoffset() == timedelta(0)


def test_23_59_59_and_midnight_local_fall_in_different_day_windows(sqlite_url: str) -> None:
    """A call at 23:59:59 local and one at 00:00:00 local next day count in different day windows."""
    late = datetime(2024, 11, 20, 23, 59, 59, tzinfo=NY)
    early = datetime(2024, 11, 21, 0, 0, 0, tzinfo=NY)
    assert window_bounds("day", late, NY)[1] == window_bounds("day", early, NY)[0]
    assert window_bounds("day", late, NY)[0] != window_bounds("day", early, NY)[0]

    tracker = Tracker(sqlite_url, timezone="America/New_York", budgets=[Budget.daily(1, per="user_id")])
    guard = guard_of(tracker)
    late_keys = guard.windows({"user_id": "u"}, late.astimezone(UTC))
    early_keys = guard.windows({"user_id": "u"}, early.astimezone(UTC))
    late_days = {k for k in late_keys if k.period == "day"}
    early_days = {k for k in early_keys if k.period == "day"}
    assert late_days and early_days and not late_days & early_days
    assert {k.start for k in late_days} == {datetime(2024, 11, 20, tzinfo=NY)}
    assert {k.start for k in early_days} == {datetime(2024, 11, 21, tzinfo=NY)}
    assert {(k.scope_key, k.scope_value) for k in early_days} == {("", ""), ("user_id", "u")}
    # both instants are the same UTC day (04:59:59 and 05:00:00 UTC): only the local zone separates them
    assert late.astimezone(UTC).date() == early.astimezone(UTC).date()
    late_month = {k.start for k in late_keys if k.period == "month"}
    assert (
        late_month
        == {k.start for k in early_keys if k.period == "month"}
        == {datetime(2024, 11, 1, tzinfo=NY)}
    )


def test_utc_tracker_separates_days_at_utc_midnight(sqlite_url: str) -> None:
    """With the default UTC timezone, 23:59:59 UTC and 00:00:00 UTC are different day windows."""
    guard = guard_of(Tracker(sqlite_url))
    a = guard.windows({}, datetime(2024, 1, 31, 23, 59, 59, tzinfo=UTC))
    b = guard.windows({}, datetime(2024, 2, 1, 0, 0, 0, tzinfo=UTC))
    assert {(k.period, k.start) for k in a} == {
        ("day", datetime(2024, 1, 31, tzinfo=UTC)),
        ("month", datetime(2024, 1, 1, tzinfo=UTC)),
    }
    assert {(k.period, k.start) for k in b} == {
        ("day", datetime(2024, 2, 1, tzinfo=UTC)),
        ("month", datetime(2024, 2, 1, tzinfo=UTC)),
    }


def test_guard_windows_are_stable_when_asked_out_of_order(sqlite_url: str) -> None:
    """Asking for windows of a later then an earlier instant gives each instant its own window."""
    guard = guard_of(Tracker(sqlite_url, timezone="America/New_York"))
    times = [
        datetime(2024, 5, 2, 12, tzinfo=NY),
        datetime(2024, 5, 1, 12, tzinfo=NY),
        datetime(2024, 4, 30, 12, tzinfo=NY),
        datetime(2024, 5, 2, 13, tzinfo=NY),
    ]
    for at in times:
        days = {k.start for k in guard.windows({}, at) if k.period == "day"}
        months = {k.start for k in guard.windows({}, at) if k.period == "month"}
        assert days == {window_bounds("day", at, NY)[0]}
        assert months == {window_bounds("month", at, NY)[0]}


@pytest.mark.parametrize(
    ("at", "start", "end"),
    [
        (
            datetime(2024, 12, 15, 8, tzinfo=NY),
            datetime(2024, 12, 1, tzinfo=NY),
            datetime(2025, 1, 1, tzinfo=NY),
        ),
        (
            datetime(2024, 1, 31, 23, 30, tzinfo=NY),
            datetime(2024, 1, 1, tzinfo=NY),
            datetime(2024, 2, 1, tzinfo=NY),
        ),
        (
            datetime(2024, 2, 1, 0, 0, tzinfo=NY),
            datetime(2024, 2, 1, tzinfo=NY),
            datetime(2024, 3, 1, tzinfo=NY),
        ),
        (
            datetime(2024, 11, 3, 1, 30, tzinfo=NY),
            datetime(2024, 11, 1, tzinfo=NY),
            datetime(2024, 12, 1, tzinfo=NY),
        ),
    ],
    ids=["december", "last-minute-of-january", "first-instant-of-february", "dst-end-day"],
)
def test_month_window_ends_at_next_months_first_day_local(
    at: datetime, start: datetime, end: datetime
) -> None:
    """A month window runs from the 1st at local midnight to the next month's 1st at local midnight."""
    assert window_bounds("month", at, NY) == (start, end)
    assert window_bounds("month", at.astimezone(UTC), NY) == (start, end)


@pytest.mark.parametrize(
    ("day", "hours"),
    [((2024, 3, 31), 23), ((2024, 10, 27), 25), ((2024, 6, 1), 24)],
    ids=["spring-forward", "fall-back", "ordinary"],
)
def test_dst_transition_day_in_paris_is_23_or_25_hours_long(day: tuple[int, int, int], hours: int) -> None:
    """A day window in Europe/Paris on a DST change lasts 23 or 25 hours of real time."""
    at = datetime(*day, 12, tzinfo=PARIS)
    start, end = window_bounds("day", at, PARIS)
    assert end - start == timedelta(hours=hours)
    assert start == datetime(*day, tzinfo=PARIS)


@pytest.mark.parametrize(
    ("zone", "day", "start_utc", "hours"),
    [
        ("America/Havana", (2024, 3, 10), datetime(2024, 3, 10, 5, tzinfo=UTC), 23),
        ("America/Havana", (2024, 11, 3), datetime(2024, 11, 3, 4, tzinfo=UTC), 25),
        ("America/Santiago", (2024, 9, 8), datetime(2024, 9, 8, 4, tzinfo=UTC), 23),
    ],
    ids=["midnight-skipped", "midnight-repeated", "santiago-midnight-skipped"],
)
def test_day_window_when_dst_changes_at_midnight(
    zone: str, day: tuple[int, int, int], start_utc: datetime, hours: int
) -> None:
    """Where clocks change at midnight, the day starts at its first real instant and has its real length."""
    tz = ZoneInfo(zone)
    start, end = window_bounds("day", datetime(*day, 12, tzinfo=tz), tz)
    assert start == start_utc
    assert end - start == timedelta(hours=hours)
    assert start.astimezone(tz).date() == datetime(*day).date()
    assert window_bounds("day", start, tz) == (start, end)
    assert window_bounds("day", start - timedelta(microseconds=1), tz)[1] == start


def test_month_with_dst_change_in_paris_has_its_real_length() -> None:
    """March 2024 in Paris is 31 days minus one hour long."""
    start, end = window_bounds("month", datetime(2024, 3, 15, tzinfo=PARIS), PARIS)
    assert end - start == timedelta(days=31) - timedelta(hours=1)


@pytest.mark.parametrize("timezone", ["Not/AZone", "Mars/Olympus", ""])
def test_unknown_timezone_raises_value_error_naming_timezone(sqlite_url: str, timezone: str) -> None:
    """Tracker(timezone=...) with an unknown zone raises ValueError naming timezone."""
    with pytest.raises(ValueError, match="timezone"):
        Tracker(sqlite_url, timezone=timezone)


async def test_rollup_windows_start_at_local_midnight_of_the_tracker_timezone(
    db_url: str, tracker_factory: Factory
) -> None:
    """A tracked call lands in rollup rows keyed by the local day and month start of the tracker's zone."""
    tokyo = ZoneInfo("Asia/Tokyo")
    tracker = await tracker_factory(db_url, timezone="Asia/Tokyo")
    before = datetime.now(UTC)
    await tracker.track(**CALL)
    after = datetime.now(UTC)
    engine = create_async_engine(db_url)
    try:
        from llm_spend.storage.schema import rollups

        async with engine.connect() as conn:
            rows = (await conn.execute(rollups.select())).mappings().all()
    finally:
        await engine.dispose()
    starts = {r["period"]: r["window_start"] for r in rows if r["scope_key"] == ""}
    assert starts["day"] in {window_bounds("day", t, tokyo)[0] for t in (before, after)}
    assert starts["month"] in {window_bounds("month", t, tokyo)[0] for t in (before, after)}
    assert starts["day"].astimezone(tokyo).hour == 0
    assert starts["day"].astimezone(UTC).hour == 15  # Tokyo midnight is 15:00 UTC the day before


# -- notify -------------------------------------------------------------------------------------------


def _sync_and_async() -> list[Any]:
    return [pytest.param(False, id="sync-callback"), pytest.param(True, id="async-callback")]


def _collector(is_async: bool) -> tuple[list[BudgetExceeded], Callable[[BudgetExceeded], Any]]:
    seen: list[BudgetExceeded] = []
    if is_async:

        async def callback(exc: BudgetExceeded) -> None:
            await asyncio.sleep(0)
            seen.append(exc)

        return seen, callback
    return seen, seen.append


@pytest.mark.parametrize("is_async", _sync_and_async())
async def test_notify_calls_on_exceeded_once_per_window_at_first_crossing(
    db_url: str, tracker_factory: Factory, is_async: bool
) -> None:
    """notify mode calls on_exceeded once, for the call that crossed, and never again in that window."""
    seen, callback = _collector(is_async)
    budget = Budget.daily("0.01")
    tracker = await tracker_factory(db_url, budgets=[budget], on_exceeded=callback)
    await tracker.track(**CALL)
    assert seen == []
    crossing = await tracker.track(**CALL)  # $0.012 > $0.01: returns, does not raise
    assert crossing.cost == CALL_COST
    assert len(seen) == 1
    for _ in range(10):
        await tracker.track(**CALL)
    assert len(seen) == 1
    exc = seen[0]
    assert isinstance(exc, BudgetExceeded)
    assert exc.stage == "post"
    assert exc.period == "day"
    assert exc.budget == budget
    assert exc.limit == Decimal("0.01")
    assert exc.spent == 2 * CALL_COST
    assert exc.requested == CALL_COST
    assert await count_calls(db_url) == 12


async def test_notify_fires_once_when_many_concurrent_calls_cross(
    db_url: str, tracker_factory: Factory
) -> None:
    """50 concurrent calls that together cross a limit trigger exactly one notification."""
    seen: list[BudgetExceeded] = []
    tracker = await tracker_factory(db_url, budgets=[Budget.daily("0.05")], on_exceeded=seen.append)
    await asyncio.gather(*(tracker.track(**CALL) for _ in range(50)))
    assert len(seen) == 1
    assert Decimal("0.05") < seen[0].spent <= Decimal("0.05") + CALL_COST
    assert await count_calls(db_url) == 50


async def test_notify_once_across_two_trackers_sharing_a_database(
    db_url: str, tracker_factory: Factory
) -> None:
    """Two trackers (as two processes would) on one database notify once in total for one crossing."""
    seen: list[BudgetExceeded] = []
    a = await tracker_factory(db_url, budgets=[Budget.daily("0.05")], on_exceeded=seen.append)
    b = await tracker_factory(db_url, budgets=[Budget.daily("0.05")], on_exceeded=seen.append)
    await asyncio.gather(*(t.track(**CALL) for _ in range(20) for t in (a, b)))
    assert len(seen) == 1
    assert await count_calls(db_url) == 40


async def test_on_exceeded_replaced_after_construction(sqlite_url: str, tracker_factory: Factory) -> None:
    """`tracker.on_exceeded` reads and replaces the callback; the crossing goes to the new one, and a
    value that cannot be called is refused with an error naming the field."""
    first: list[BudgetExceeded] = []
    second: list[BudgetExceeded] = []
    tracker = await tracker_factory(sqlite_url, budgets=[Budget.daily("0.012")], on_exceeded=first.append)
    assert tracker.on_exceeded == first.append
    tracker.on_exceeded = second.append
    for _ in range(3):
        await tracker.track(**CALL)
    assert first == []
    assert [e.spent for e in second] == [Decimal("0.018")]
    with pytest.raises(ValueError, match="on_exceeded must be callable"):
        tracker.on_exceeded = "not a function"  # type: ignore[assignment]
    assert tracker.on_exceeded == second.append


async def test_spent_equal_to_limit_is_not_exceeded(sqlite_url: str, tracker_factory: Factory) -> None:
    """Reaching the limit exactly does not notify; going one call over does."""
    seen: list[BudgetExceeded] = []
    tracker = await tracker_factory(sqlite_url, budgets=[Budget.daily("0.012")], on_exceeded=seen.append)
    await tracker.track(**CALL)
    await tracker.track(**CALL)
    assert seen == []
    await tracker.track(**CALL)
    assert [e.spent for e in seen] == [Decimal("0.018")]


async def test_a_limit_finer_than_a_nano_dollar_is_enforced_rounded_down(
    sqlite_url: str, tracker_factory: Factory
) -> None:
    """The ledger counts whole nano-USD: a limit half a nano-dollar under a call's cost is passed by
    that call (rounded to the nearest, it would have been the cost itself, and never exceeded)."""
    limit = CALL_COST - Decimal("0.0000000005")
    tracker = await tracker_factory(sqlite_url, budgets=[Budget.daily(limit, mode="raise")])
    with pytest.raises(BudgetExceeded) as raised:
        await tracker.track(**CALL)
    assert (raised.value.limit, raised.value.spent, raised.value.stage) == (limit, CALL_COST, "post")


@pytest.mark.parametrize("is_async", _sync_and_async())
async def test_notify_again_once_in_a_different_per_tag_window(
    db_url: str, tracker_factory: Factory, is_async: bool
) -> None:
    """A per-tag notify budget notifies once per tag value: one for user a, then one for user b."""
    seen, callback = _collector(is_async)
    tracker = await tracker_factory(
        db_url, budgets=[Budget.daily("0.01", per="user_id")], on_exceeded=callback
    )
    for _ in range(5):
        await tracker.track(**CALL)  # no user_id: the budget does not apply
    assert seen == []
    with with_tags(user_id="a"):
        for _ in range(5):
            await tracker.track(**CALL)
    assert [(e.scope, e.scope_value) for e in seen] == [("user_id", "a")]
    with with_tags(user_id="b"):
        await tracker.track(**CALL)
        assert len(seen) == 1
        for _ in range(5):
            await tracker.track(**CALL)
    assert [(e.scope, e.scope_value) for e in seen] == [("user_id", "a"), ("user_id", "b")]
    assert seen[1].spent == 2 * CALL_COST


async def test_notify_and_monthly_budgets_each_notify_once(sqlite_url: str, tracker_factory: Factory) -> None:
    """A daily and a monthly budget crossed by the same call each notify once."""
    seen: list[BudgetExceeded] = []
    tracker = await tracker_factory(
        sqlite_url, budgets=[Budget.daily("0.01"), Budget.monthly("0.01")], on_exceeded=seen.append
    )
    for _ in range(4):
        await tracker.track(**CALL)
    assert sorted(e.period for e in seen) == ["day", "month"]


async def test_per_call_notify_fires_for_each_expensive_call(
    sqlite_url: str, tracker_factory: Factory
) -> None:
    """A per-call notify budget notifies for every call above it (each call is its own window)."""
    seen: list[BudgetExceeded] = []
    tracker = await tracker_factory(sqlite_url, budgets=[Budget.per_call("0.01")], on_exceeded=seen.append)
    await tracker.track(**CALL)
    await tracker.track(**BIG_CALL)
    await tracker.track(**BIG_CALL)
    assert [(e.period, e.spent, e.requested) for e in seen] == [("call", BIG_COST, BIG_COST)] * 2


async def test_failing_on_exceeded_is_logged_and_call_recorded(
    sqlite_url: str, tracker_factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """An on_exceeded callback that raises is logged; the call is still recorded and returned."""

    def broken(exc: BudgetExceeded) -> None:
        raise RuntimeError("pager down")

    tracker = await tracker_factory(sqlite_url, budgets=[Budget.daily("0.01")], on_exceeded=broken)
    with caplog.at_level(logging.ERROR, logger="llm_spend"):
        await tracker.track(**CALL)
        record = await tracker.track(**CALL)
    assert record.cost == CALL_COST
    assert "pager down" in caplog.text
    assert await count_calls(sqlite_url) == 2


# -- raise / block (post) -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["raise", "block"])
async def test_raise_mode_raises_post_for_the_crossing_call_with_every_field(
    db_url: str, tracker_factory: Factory, mode: str
) -> None:
    """The call taking the window over raises BudgetExceeded(stage="post"), all fields set; it is recorded."""
    budget = Budget.daily("0.01", mode=mode)  # type: ignore[arg-type]
    tracker = await tracker_factory(db_url, budgets=[budget])
    first = await tracker.track(**CALL)
    assert first.cost == CALL_COST
    before = datetime.now(UTC)
    with pytest.raises(BudgetExceeded) as info:
        await tracker.track(**CALL)
    after = datetime.now(UTC)
    exc = info.value
    assert isinstance(exc, LLMSpendError)
    assert exc.budget == budget
    assert exc.period == "day"
    assert exc.scope is None
    assert exc.scope_value is None
    assert exc.limit == Decimal("0.01")
    assert exc.spent == Decimal("0.012")
    assert exc.reserved == Decimal("0")
    assert exc.requested == CALL_COST
    assert exc.stage == "post"
    assert (
        isinstance(exc.limit, Decimal)
        and isinstance(exc.spent, Decimal)
        and isinstance(exc.requested, Decimal)
    )
    assert exc.window_start is not None and exc.window_end is not None
    assert exc.window_start.utcoffset() == timedelta(0)
    assert exc.window_end.utcoffset() == timedelta(0)
    assert (exc.window_start, exc.window_end) in {
        window_bounds("day", t, ZoneInfo("UTC")) for t in (before, after)
    }
    assert isinstance(exc.retry_after, int) and not isinstance(exc.retry_after, bool)
    assert 0 < exc.retry_after <= 86_400
    assert await count_calls(db_url) == 2


async def test_tracker_default_mode_applies_to_budgets_without_a_mode(
    sqlite_url: str, tracker_factory: Factory
) -> None:
    """Tracker(mode="raise") makes a budget without its own mode raise."""
    tracker = await tracker_factory(sqlite_url, budgets=[Budget.daily("0.01")], mode="raise")
    await tracker.track(**CALL)
    with pytest.raises(BudgetExceeded):
        await tracker.track(**CALL)


async def test_budget_mode_overrides_tracker_mode(sqlite_url: str, tracker_factory: Factory) -> None:
    """A budget with mode="notify" under Tracker(mode="raise") notifies instead of raising."""
    seen: list[BudgetExceeded] = []
    tracker = await tracker_factory(
        sqlite_url, budgets=[Budget.daily("0.01", mode="notify")], mode="raise", on_exceeded=seen.append
    )
    for _ in range(3):
        await tracker.track(**CALL)
    assert len(seen) == 1


async def test_per_call_budget_raises_for_a_single_expensive_call(
    db_url: str, tracker_factory: Factory
) -> None:
    """A per-call raise budget raises for one call above it (and records it); cheaper calls pass."""
    budget = Budget.per_call("0.01", mode="raise")
    tracker = await tracker_factory(db_url, budgets=[budget])
    await tracker.track(**CALL)
    with pytest.raises(BudgetExceeded) as info:
        await tracker.track(**BIG_CALL)
    exc = info.value
    assert exc.budget == budget
    assert (exc.period, exc.stage, exc.scope, exc.scope_value) == ("call", "post", None, None)
    assert exc.limit == Decimal("0.01")
    assert exc.spent == BIG_COST
    assert exc.requested == BIG_COST
    assert exc.window_start is None and exc.window_end is None
    await tracker.track(**CALL)
    assert await count_calls(db_url) == 3


async def test_per_tag_budget_applies_only_to_tagged_calls_with_separate_windows(
    db_url: str, tracker_factory: Factory
) -> None:
    """per="user_id": untagged calls never raise; each user value has its own window and limit."""
    budget = Budget.daily("0.01", per="user_id", mode="raise")
    tracker = await tracker_factory(db_url, budgets=[budget])
    for _ in range(5):
        await tracker.track(**CALL)  # $0.03 without user_id
    with with_tags(user_id="a"):
        await tracker.track(**CALL)
        with pytest.raises(BudgetExceeded) as info:
            await tracker.track(**CALL)
    exc = info.value
    assert (exc.scope, exc.scope_value) == ("user_id", "a")
    assert exc.spent == Decimal("0.012")
    await tracker.track(**CALL, tags={"user_id": "b"})  # b's own window: $0.006, fine
    with pytest.raises(BudgetExceeded) as info_b:
        await tracker.track(**CALL, tags={"user_id": "b"})
    assert info_b.value.scope_value == "b"
    assert await count_calls(db_url) == 9


async def test_budget_exceeded_str_and_to_dict(sqlite_url: str, tracker_factory: Factory) -> None:
    """The exception's message names the period, and to_dict() is JSON-ready with money as strings."""
    tracker = await tracker_factory(sqlite_url, budgets=[Budget.daily("0.01", per="user_id", mode="raise")])
    with with_tags(user_id="a"):
        await tracker.track(**CALL)
        with pytest.raises(BudgetExceeded) as info:
            await tracker.track(**CALL)
    data = info.value.to_dict()
    assert data["limit"] == "0.01"
    assert Decimal(data["spent"]) == Decimal("0.012")
    assert data["stage"] == "post"
    assert data["period"] == "day"
    assert (data["scope"], data["scope_value"]) == ("user_id", "a")
    assert datetime.fromisoformat(data["window_start"]) == info.value.window_start
    assert "day" in str(info.value)
    for again in (pickle.loads(pickle.dumps(info.value)), copy.copy(info.value)):  # a worker's error
        assert type(again) is BudgetExceeded and again.__traceback__ is None
        assert (again.to_dict(), str(again), again.budget) == (data, str(info.value), info.value.budget)


def test_every_error_survives_pickling() -> None:
    """What a worker process raises reaches its parent whole (pickle calls the class again)."""
    for error in (UnknownPriceError("openai", "gpt-9"), PricesFileError("prices.json", "gpt-9", "no input")):
        again = pickle.loads(pickle.dumps(error))
        assert (type(again), str(again), vars(again)) == (type(error), str(error), vars(error))


async def test_unknown_price_never_counts_as_zero_silently(sqlite_url: str, tracker_factory: Factory) -> None:
    """Unknown-price calls do not add to spent; they are counted as unknown in the rollups."""
    seen: list[BudgetExceeded] = []
    tracker = await tracker_factory(sqlite_url, budgets=[Budget.daily("0.01")], on_exceeded=seen.append)
    for _ in range(3):
        record = await tracker.track(
            provider="openai", model="no-such-model-b", input_tokens=10**6, output_tokens=0
        )
        assert record.cost is None
    engine = create_async_engine(sqlite_url)
    try:
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT spent_nanousd, unknown_cost_calls, calls FROM llm_spend_rollups "
                        "WHERE period = 'day' AND scope_key = ''"
                    )
                )
            ).one()
    finally:
        await engine.dispose()
    assert tuple(row) == (0, 3, 3)
    assert seen == []


async def test_a_crossing_whose_caller_was_cancelled_is_still_notified(
    sqlite_url: str, tracker_factory: Factory
) -> None:
    """The call that crosses a notify-mode budget is cancelled while its write waits (another
    process holds the write lock): the call is still recorded, and on_exceeded still runs once."""
    import sqlite3

    from sqlalchemy.engine import make_url

    seen: list[BudgetExceeded] = []
    tracker = await tracker_factory(sqlite_url, budgets=[Budget.daily("0.01")], on_exceeded=seen.append)
    await tracker.track(**CALL)
    holder = sqlite3.connect(str(make_url(sqlite_url).database), isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        crossing = asyncio.ensure_future(tracker.track(**CALL))
        await asyncio.sleep(0.2)
        crossing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await crossing
        assert seen == []
        holder.execute("COMMIT")
    finally:
        holder.close()
    for _ in range(100):
        if seen:
            break
        await asyncio.sleep(0.05)
    assert len(seen) == 1 and seen[0].spent == 2 * CALL_COST
    assert await count_calls(sqlite_url) == 2
