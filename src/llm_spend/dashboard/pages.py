"""The dashboard's pages: each reads through the report API and queries.py, then renders a template."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import jinja2
from sqlalchemy import ColumnElement
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse

from ..money import format_usd, from_nanousd
from ..reports import ReportRow, budget_status, current_windows, ledger_conditions, report, safe_cell
from . import svg
from .filters import MAX_PAGE, Filters, parse_filters
from .queries import (
    EXPORT_COLUMNS,
    ISSUES,
    NOT_TAG_KEYS,
    calls_page,
    export_rows,
    issue_condition,
    models_with,
    quality,
    tag_spread,
)
from .queries import tag_keys as find_tag_keys

if TYPE_CHECKING:
    from ..tracker import Tracker

__all__ = ["Pages", "environment"]

NAV = (("", "Overview"), ("/calls", "Calls"), ("/models", "Models"), ("/tags", "Tags"),
       ("/budgets", "Budgets"), ("/quality", "Data quality"))  # fmt: skip

_TIME = "%Y-%m-%d %H:%M:%S"
TAG_VALUES = 500
"""The tags page lists this many values of a key, the costliest, and says so when there are more."""
TAG_KEYS = 200
OVERVIEW_BARS = 8
"""The overview shows this many budget bars, the global budgets first; /budgets lists them all."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def shown(text: object) -> str:
    """`text` with each control character (a tab, a newline) as its visible symbol (␉, ␊), so values
    that differ only there look different; the result is still autoescaped like any other."""
    return _CONTROL.sub(lambda m: chr(0x2421 if m[0] == "\x7f" else 0x2400 + ord(m[0])), str(text))


def environment(tz: ZoneInfo) -> jinja2.Environment:
    """Templates from the package, autoescaped (every tag value is HTML-escaped), strict about names."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("llm_spend.dashboard", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        usd=svg.usd,
        shown=shown,
        tokens=svg.tokens,
        local=lambda at, minutes=False: at.astimezone(tz).strftime(_TIME[:-3] if minutes else _TIME),
    )
    env.globals.update(
        column_chart=svg.column_chart, meter=svg.meter, issues=ISSUES, nav=NAV, not_tag_keys=NOT_TAG_KEYS
    )
    return env


def by_cost(rows: Sequence[ReportRow]) -> list[ReportRow]:
    return sorted(rows, key=lambda r: (-r.cost, -r.calls, tuple((v is None, v or "") for v in r.key)))


class Pages:
    """The endpoints, bound to one tracker and one template environment."""

    def __init__(self, tracker: Tracker, env: jinja2.Environment, *, page_size: int, title: str) -> None:
        self.tracker = tracker
        self.store = tracker.store
        self.tz = tracker.timezone
        self.env = env
        self.page_size = page_size
        self.title = title

    def render(self, request: Request, template: str, code: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("filters", None)
        if context["filters"] is not None:
            context["presets"] = _presets(context["filters"], datetime.now(self.tz).date())
        html = self.env.get_template(template).render(
            base=request.scope.get("root_path", ""), path=request.scope["path"], site=self.title,
            tz=self.tz.key, generated=datetime.now(self.tz).strftime("%Y-%m-%d %H:%M"), **context,
        )  # fmt: skip
        return HTMLResponse(html, status_code=code)

    def error(self, request: Request, status: int, message: str, headers: Any = None) -> HTMLResponse:
        response = self.render(request, "error.html", status, title=f"Error {status}", message=message)
        response.headers.update(headers or {})
        return response

    def filters(self, request: Request) -> Filters:
        return parse_filters(request.query_params, self.tz, datetime.now(self.tz).date())

    def conditions(self, f: Filters, *, issue: bool = True) -> list[ColumnElement[bool]]:
        found = ledger_conditions(self.store, f.start, f.end, f.where())
        if issue and f.issue:
            found.append(issue_condition(f.issue, self.store.dialect == "postgresql"))
        return found

    async def report(self, f: Filters, *group_by: str, limit: int | None = None) -> list[ReportRow]:
        return await report(
            self.store, self.tz, start=f.start, end=f.end, group_by=group_by, where=f.where(), limit=limit
        )

    # -- pages --------------------------------------------------------------------------------------

    def totals_filters(self, request: Request) -> Filters:
        """The filters of a page of sums (overview, models, tags): all but `issue`, which selects
        calls (the calls page, the CSV) and is dropped here rather than shown and not applied."""
        return replace(self.filters(request), issue=None)

    async def overview(self, request: Request) -> Response:
        f = self.totals_filters(request)
        [total], [before] = await self.report(f), await self.report(f.previous())
        period = "day" if f.days <= 92 else "month"
        series = {row.key[0]: row.cost for row in await self.report(f, period)}
        labels = _labels(f, period)
        keys = await find_tag_keys(self.store, self.conditions(f), limit=3)
        top_tags = [(key, by_cost(await self.report(f, key, limit=5))) for key, _ in keys]
        # the global budgets first (stable: in configuration order), so per-tag ones never crowd them out
        budgets = sorted(await self.budgets_now(top=3), key=lambda s: s.scope_value is not None)
        return self.render(
            request, "overview.html", filters=f, title="Overview", total=total, before=before,
            change=svg.percent_change(total.cost, before.cost), period=period,
            chart=svg.column_chart(
                [(label, series.get(label, Decimal(0))) for label in labels],
                short=(lambda label: label[5:]) if period == "day" else str,
            ),
            budgets=budgets[:OVERVIEW_BARS], more_budgets=len(budgets) > OVERVIEW_BARS,
            models=by_cost(await self.report(f, "model", limit=6)),
            top_tags=top_tags,
        )  # fmt: skip

    async def calls(self, request: Request) -> Response:
        f = self.filters(request)
        offset = (f.page - 1) * self.page_size
        rows, more = await calls_page(self.store, self.conditions(f), limit=self.page_size, offset=offset)
        return self.render(
            request, "calls.html", filters=f, title="Calls", rows=rows, offset=offset,
            more=more and f.page < MAX_PAGE, cut=more and f.page >= MAX_PAGE,
        )  # fmt: skip

    async def calls_csv(self, request: Request) -> Response:
        f = self.filters(request)
        name = f"llm-calls-{f.first.isoformat()}-{f.last.isoformat()}.csv"
        return StreamingResponse(
            _csv(export_rows(self.store, self.conditions(f))),
            media_type="text/csv; charset=utf-8",
            headers={"content-disposition": f'attachment; filename="{name}"'},
        )

    async def models(self, request: Request) -> Response:
        f = self.totals_filters(request)
        rows = by_cost(await self.report(f, "provider", "model"))
        return self.render(request, "models.html", filters=f, title="Models", rows=rows, top=_top(rows))

    async def tags(self, request: Request) -> Response:
        f = self.totals_filters(request)
        if f.key is None:
            keys = await find_tag_keys(self.store, self.conditions(f), limit=TAG_KEYS + 1)
            return self.render(request, "tags.html", filters=f, title="Tags", keys=keys[:TAG_KEYS],
                               more_keys=len(keys) > TAG_KEYS, rows=[], top=0)  # fmt: skip
        rows = await self.report(f, f.key, limit=TAG_VALUES + 1)
        spread = await tag_spread(self.store, self.conditions(f), f.key)
        values = [row for row in by_cost(rows) if row.key[0] is not None][:TAG_VALUES]
        rows = by_cost(values + ([spread.without] if spread.without else []))
        return self.render(
            request, "tags.html", filters=f, title=f"Tag {f.key}", keys=[], rows=rows, top=_top(rows),
            shown_values=len(values), all_values=spread.values,
        )  # fmt: skip

    async def budgets(self, request: Request) -> Response:
        statuses = await self.budgets_now(top=50)
        windows = [] if statuses else await current_windows(  # no day or month budget (per-call ones)
            self.store, self.tz, now=datetime.now(UTC)
        )  # fmt: skip
        return self.render(request, "budgets.html", title="Budgets", statuses=statuses, windows=windows)

    async def budgets_now(self, *, top: int) -> list[Any]:
        guard = self.tracker.budget_guard
        return await budget_status(self.store, guard.rules, guard.bounds, now=datetime.now(UTC), top=top)

    async def quality(self, request: Request) -> Response:
        f = self.filters(request)
        conditions = self.conditions(f, issue=False)
        postgres = self.store.dialect == "postgresql"
        found = await quality(self.store, conditions)
        unpriced = await models_with(self.store, [*conditions, issue_condition("unknown_price", postgres)])
        fallback = await models_with(self.store, [*conditions, issue_condition("fallback_price", postgres)])
        return self.render(
            request, "quality.html", filters=replace(f, issue=None), title="Data quality", quality=found,
            unpriced=unpriced, fallback=fallback,
        )  # fmt: skip


def _presets(f: Filters, today: date) -> list[tuple[str, str]]:
    """Links to the last 7, 30, 90 and 365 days, keeping the other filters."""
    found = []
    for n in (7, 30, 90, 365):
        first = (today - timedelta(days=n - 1)).isoformat()
        found.append((f"{n} days", f.query(**{"from": first, "to": today.isoformat(), "page": None})))
    return found


def _top(rows: Sequence[ReportRow]) -> Decimal:
    return max((row.cost for row in rows), default=Decimal(0))


def _labels(f: Filters, period: str) -> list[str]:
    """Every day (YYYY-MM-DD) or month (YYYY-MM) of the range, so empty ones show as empty."""
    days = [f.first + timedelta(days=n) for n in range(f.days)]
    if period == "day":
        return [d.isoformat() for d in days]
    return sorted({d.isoformat()[:7] for d in days})


async def _csv(batches: AsyncIterator[list[dict[str, Any]]]) -> AsyncIterator[str]:
    """CSV text, one chunk per batch of rows; cells that a spreadsheet would run are escaped."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*EXPORT_COLUMNS, "cost_usd"])
    yield buffer.getvalue()
    async for batch in batches:
        buffer.seek(0)
        buffer.truncate()
        for row in batch:
            writer.writerow([_cell(row[name]) for name in EXPORT_COLUMNS] + [_cost(row["cost_nanousd"])])
        yield buffer.getvalue()


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return safe_cell(json.dumps(value, separators=(",", ":"), ensure_ascii=False))
    return safe_cell(str(value))


def _cost(nanousd: int | None) -> str:
    return "" if nanousd is None else format_usd(from_nanousd(nanousd))
