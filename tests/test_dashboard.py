"""The dashboard app, driven over ASGI: authorization, validated filters, escaping, CSV, every page on
SQLite and PostgreSQL. (The same pages in a real browser: test_dashboard_browser.py.)"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from html import unescape
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from llm_spend import Budget, Tracker, Usage
from llm_spend.dashboard import create_app
from llm_spend.dashboard.svg import usd
from llm_spend.storage.store import PendingWrite
from llm_spend.usage import CallRecord

XSS = "<script>alert(1)</script>"
FORMULA = '=HYPERLINK("http://evil")'


async def seed(tracker: Tracker) -> list[CallRecord]:
    """Six calls in the last seconds (so all of them today, even just after midnight): priced, unknown
    model, unknown-usage stream, untagged, hostile tags."""
    now = datetime.now(UTC)
    alice_chat, bob_chat = {"user_id": "alice", "feature": "chat"}, {"user_id": "bob", "feature": "chat"}
    specs: list[tuple[str, str, Usage | None, dict[str, str], bool]] = [
        ("openai", "gpt-4o", Usage(input_tokens=1000, output_tokens=100), alice_chat, False),
        ("openai", "gpt-4o-mini", Usage(input_tokens=2000, output_tokens=50), bob_chat, False),
        ("acme", "mystery", Usage(input_tokens=10, output_tokens=10), {"user_id": "alice"}, False),
        ("openai", "gpt-4o", None, {"user_id": "bob"}, True),
        ("openai", "gpt-4o-mini", Usage(input_tokens=300, output_tokens=30), {}, False),
        (
            "openai",
            "gpt-4o-mini",
            Usage(input_tokens=5, output_tokens=5),
            {"user_id": XSS, "note": FORMULA},
            False,
        ),
    ]
    records = [
        tracker._recorder.build(provider=p, model=m, usage=u, usage_source="manual", tags=tags, stream=stream,
                       occurred_at=now - timedelta(seconds=i + 1))
        for i, (p, m, u, tags, stream) in enumerate(specs)
    ]  # fmt: skip
    records[-1] = replace(records[-1], request_id=FORMULA)  # e.g. a client-chosen X-Request-ID
    windows = tracker.budget_guard.windows
    await tracker.store.write([PendingWrite(r, windows(r.tags, r.occurred_at)) for r in records])
    return records


def allow(request: Request) -> bool:
    return request.headers.get("x-key") == "yes"


@pytest.fixture
async def client(db_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, list[CallRecord]]]:
    """The dashboard mounted at /spend of a host app, with a seeded tracker, signed in."""
    budgets = [Budget.monthly(100), Budget.daily(1, per="user_id")]
    async with Tracker(db_url, budgets=budgets) as tracker:
        records = await seed(tracker)
        host = Starlette(routes=[Mount("/spend", create_app(tracker, authorize=allow, page_size=2))])
        transport = httpx.ASGITransport(host)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", headers={"x-key": "yes"}) as c:
            yield c, records


def cells(html: str, table: str) -> list[list[str]]:
    """The text of each body row of the table with id `table`."""
    body = html.split(f'id="{table}"', 1)[1].split("</tbody>", 1)[0].split("<tbody>", 1)[1]
    rows = re.findall(r"<tr>(.*?)</tr>", body, re.S)
    return [
        [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", r, re.S)] for r in rows
    ]


def test_create_app_refuses_to_build_without_authorize_unless_public(sqlite_url: str) -> None:
    """No authorize and no public=True is an error naming both; so is a non-callable authorize."""
    tracker = Tracker(sqlite_url)
    with pytest.raises(ValueError, match=r"authorize=.*public=True"):
        create_app(tracker)
    with pytest.raises(ValueError, match="authorize must be a callable"):
        create_app(tracker, authorize="admin")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="page_size"):
        create_app(tracker, public=True, page_size=0)
    assert isinstance(create_app(tracker, public=True), Starlette)


async def test_authorize_refusals_are_401_or_403_and_show_nothing(sqlite_url: str) -> None:
    """False is 403; an HTTPException keeps its status and headers; async callables work; a result
    that is not a bool is a server error, never an open door."""

    async def gate(request: Request) -> Any:
        key = request.headers.get("x-key")
        if key is None:
            raise HTTPException(401, "sign in", headers={"WWW-Authenticate": 'Basic realm="spend"'})
        return {"yes": True, "no": False}.get(key, key)

    async with Tracker(sqlite_url) as tracker:
        await seed(tracker)
        app = create_app(tracker, authorize=gate)
        transport = httpx.ASGITransport(app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            anonymous = await c.get("/calls")
            refused = await c.get("/calls.csv", headers={"x-key": "no"})
            odd = await c.get("/", headers={"x-key": "maybe"})
            allowed = await c.get("/calls", headers={"x-key": "yes"})
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == 'Basic realm="spend"'
    assert refused.status_code == 403 and "text/html" in refused.headers["content-type"]
    for response in (anonymous, refused, odd):
        assert "gpt-4o" not in response.text and "$" not in response.text
    assert odd.status_code == 500
    assert allowed.status_code == 200 and "gpt-4o" in allowed.text
    # Starlette answers a server error from outside every middleware: the page sets its own headers
    assert "default-src 'none'" in odd.headers["content-security-policy"]
    assert odd.headers["cache-control"] == "no-store" and odd.headers["x-content-type-options"] == "nosniff"
    assert "text/html" in odd.headers["content-type"] and "the server log has the error" in odd.text


async def test_the_pages_of_sums_leave_out_the_issue_filter_rather_than_show_it_unapplied(
    client: tuple[httpx.AsyncClient, list[CallRecord]],
) -> None:
    """`issue=` selects calls (on /calls); the overview, models and tags pages showed it as an active
    filter while summing every call. They leave it out: the same figures, no chip for it."""
    c, _ = client
    for page, table in (("/spend/models", "models"), ("/spend/tags", "tag-keys")):
        plain = await c.get(page)
        with_issue = await c.get(page, params={"issue": "unknown_price"})
        assert cells(with_issue.text, table) == cells(plain.text, table)
        assert 'class="chip"' not in with_issue.text
    overview = await c.get("/spend/", params={"issue": "unknown_price"})
    assert 'class="chip"' not in overview.text
    calls = await c.get("/spend/calls", params={"issue": "unknown_price"})
    [row] = cells(calls.text, "calls")
    assert row[1] == "mystery acme"
    assert 'class="chip"' in calls.text


async def test_every_page_renders_the_ledger(client: tuple[httpx.AsyncClient, list[CallRecord]]) -> None:
    """Overview total, models, tag keys and values, budgets, data quality and paginated calls all match
    the seeded calls, on SQLite and PostgreSQL."""
    c, records = client
    total = sum((r.cost or Decimal(0) for r in records), Decimal(0))
    overview = await c.get("/spend/")
    assert overview.status_code == 200
    assert f'id="total-cost">{usd(total)}<' in overview.text
    models = cells((await c.get("/spend/models")).text, "models")
    assert [(row[1], row[2]) for row in models][:1] == [("gpt-4o", "2")]
    assert sorted(row[1] for row in models) == ["gpt-4o", "gpt-4o-mini", "mystery"]
    [mystery] = [row for row in models if row[1] == "mystery"]
    assert (mystery[7], mystery[9]) == ("unknown", "1")  # not "$0": its price is unknown
    keys = cells((await c.get("/spend/tags")).text, "tag-keys")
    assert keys == [["user_id", "5"], ["feature", "2"], ["note", "1"]]
    users = cells((await c.get("/spend/tags", params={"key": "user_id"})).text, "tag-values")
    assert [row[0] for row in users] == [
        "alice",
        "bob",
        "(no user_id)",
        "&lt;script&gt;alert(1)&lt;/script&gt;",
    ]
    quality = cells((await c.get("/spend/quality")).text, "quality")
    assert [row[1] for row in quality] == ["1", "1", "0", "1", "1"]
    budgets = (await c.get("/spend/budgets")).text
    assert "monthly $100" in budgets and "daily $1 per user_id: alice" in budgets
    months = await c.get("/spend/", params={"from": "2026-01-01", "to": "2026-05-31"})
    assert "Spend per month" in months.text and months.text.count('class="col"') == 5
    first = await c.get("/spend/calls")
    second = await c.get("/spend/calls", params={"page": 2})
    assert len(cells(first.text, "calls")) == 2 and 'rel="next"' in first.text
    assert len(cells(second.text, "calls")) == 2 and 'rel="prev"' in second.text


async def test_filters_narrow_and_links_stay_under_the_mount(
    client: tuple[httpx.AsyncClient, list[CallRecord]],
) -> None:
    """model=, tag= and issue= narrow the calls table; every link points under the mount path."""
    c, _ = client
    mini = await c.get("/spend/calls", params={"model": "gpt-4o-mini", "tag": "user_id=bob"})
    rows = cells(mini.text, "calls")
    assert len(rows) == 1 and rows[0][1].startswith("gpt-4o-mini")
    unknown = cells((await c.get("/spend/calls", params={"issue": "stream_no_usage"})).text, "calls")
    assert len(unknown) == 1 and unknown[0][4] == "unknown usage"
    hrefs = re.findall(r'href="([^"]+)"', mini.text)
    assert hrefs and all(h.startswith("/spend/") for h in hrefs)


async def test_a_secret_looking_tag_is_filtered_by_its_redacted_value(db_url: str) -> None:
    """The tags page of a secret-looking key links its one value, [REDACTED]; that link lists the
    calls (it was a 500 while a report refused such keys), and a real secret finds none."""
    async with Tracker(db_url) as tracker:
        await tracker.track(provider="openai", model="gpt-4o-mini", input_tokens=1, output_tokens=1,
                            tags={"auth_method": "oauth"})  # fmt: skip
        app = create_app(tracker, authorize=allow)
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", headers={"x-key": "yes"}) as c:
            listed = await c.get("/calls", params={"tag": "auth_method=[REDACTED]"})
            secret = await c.get("/calls", params={"tag": "auth_method=oauth"})
    assert (listed.status_code, len(cells(listed.text, "calls"))) == (200, 1)
    assert (secret.status_code, cells(secret.text, "calls")) == (200, [["No calls match."]])


async def test_every_tag_value_is_html_escaped(client: tuple[httpx.AsyncClient, list[CallRecord]]) -> None:
    """A tag value <script>alert(1)</script> appears escaped on every page that shows it, never raw."""
    c, _ = client
    pages = ["/spend/", "/spend/calls?tag=user_id%3D%3Cscript%3Ealert(1)%3C%2Fscript%3E",
             "/spend/tags?key=user_id", "/spend/budgets"]  # fmt: skip
    for path in pages:
        html = (await c.get(path)).text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html, path
        assert "<script" not in html, path


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"from": "2026-02-30"}, "from must be a date"),
        ({"from": "20260101"}, "from must be a date such as 2026-11-30"),  # ISO, but not YYYY-MM-DD
        ({"to": "2026-W01-1"}, "to must be a date such as 2026-11-30"),
        ({"from": "2020-01-01", "to": "2026-01-01"}, "longer than 366 days"),
        ({"from": "2025-01-01", "to": "2026-01-02"}, "longer than 366 days"),  # 367 days
        ({"page": "\u00b2"}, "page must be"),  # a superscript two: isdigit() but not int()
        ({"model": "gpt\x00"}, "model contains a NUL character"),
        ({"tag": "user_id=a\x00"}, "contains a NUL character"),
        ({"from": "2026-03-02", "to": "2026-03-01"}, "must not be after"),
        ({"tag": "no equals"}, "KEY=VALUE"),
        ({"tag": "bad key=1"}, "KEY=VALUE"),
        ({"issue": "<b>"}, "issue must be one of"),
        ({"page": "0"}, "page must be"),
        ({"key": "a b"}, "is not a tag key"),
        ({"key": "model"}, "is not a tag key"),
        ({"tag": "provider=openai"}, "use the provider field"),
        ({"model": "x" * 201}, "longer than 200"),
        ({"kept": "issue=unknown_usage"}, "kept holds issue: only model, provider and tag filters"),
        ({"kept": "tag"}, "kept must be a query string"),
        ({"kept": "tag=user_id%3Da%00"}, "contains a NUL character"),
        ({"kept": "model=a%0A&model=b%0A"}, "model is given 2 times"),
    ],
)
async def test_bad_filters_get_a_400_page(db_url: str, query: dict[str, str], message: str) -> None:
    """Bad dates, ranges over 366 days, malformed tag filters, unknown issues and pages, NUL (no call
    holds one: PostgreSQL refuses it in text): a 400 page on both databases."""
    async with Tracker(db_url) as tracker:
        app = create_app(tracker, public=True)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            for path in ("/", "/calls", "/calls.csv", "/tags", "/models", "/quality"):
                response = await c.get(path, params=query)
                assert response.status_code == 400, (path, query)
                assert message in response.text and "<b>" not in response.text


async def test_csv_export_is_the_filtered_rows_with_formulas_defused(
    client: tuple[httpx.AsyncClient, list[CallRecord]],
) -> None:
    """calls.csv streams exactly the filtered calls; a cell starting with = never becomes a formula."""
    c, records = client
    response = await c.get("/spend/calls.csv", params={"model": "gpt-4o-mini"})
    assert response.headers["content-disposition"].startswith('attachment; filename="llm-calls-')
    assert response.headers["x-content-type-options"] == "nosniff"
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert {r["event_id"] for r in rows} == {r.event_id for r in records if r.model == "gpt-4o-mini"}
    hostile = next(r for r in rows if "note" in r["tags"])
    assert hostile["request_id"] == "'" + FORMULA
    assert json.loads(hostile["tags"]) == {"user_id": XSS, "note": FORMULA}
    costs = {r["event_id"]: r["cost_usd"] for r in rows}
    assert all(Decimal(costs[r.event_id]) == r.cost for r in records if r.model == "gpt-4o-mini")
    by_tag = list(
        csv.DictReader(io.StringIO((await c.get("/spend/calls.csv", params={"tag": f"note={FORMULA}"})).text))
    )
    assert len(by_tag) == 1


async def test_pages_carry_a_script_free_content_security_policy(
    client: tuple[httpx.AsyncClient, list[CallRecord]],
) -> None:
    """Every answer, errors included, forbids scripts and framing and is not cached."""
    c, _ = client
    for path in ("/spend/", "/spend/calls?page=x", "/spend/nowhere"):
        response = await c.get(path)
        assert "default-src 'none'" in response.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        assert response.headers["cache-control"] == "no-store"
    assert (await c.get("/spend/nowhere")).status_code == 404


def test_the_host_app_lifespan_is_all_it_needs(sqlite_url: str) -> None:
    """Mounted in a host app whose lifespan enters the tracker, the dashboard shows calls the app records."""
    tracker = Tracker(sqlite_url)

    async def work(request: Request) -> Any:
        from starlette.responses import JSONResponse

        record = await tracker.track(provider="openai", model="gpt-4o", input_tokens=10, output_tokens=1,
                                     tags={"feature": "host"})  # fmt: skip
        return JSONResponse({"cost": str(record.cost)})

    app = Starlette(
        lifespan=tracker.lifespan,
        routes=[Route("/work", work), Mount("/spend", create_app(tracker, public=True))],
    )
    with TestClient(app) as c:
        cost = Decimal(c.get("/work").json()["cost"])
        page = c.get("/spend/calls", params={"tag": "feature=host"})
    assert page.status_code == 200 and len(cells(page.text, "calls")) == 1
    assert usd(cost) in page.text


async def test_a_366_day_range_is_allowed(sqlite_url: str) -> None:
    """The limit's edge: exactly 366 days renders."""
    async with Tracker(sqlite_url) as tracker:
        app = create_app(tracker, public=True)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            response = await c.get("/calls", params={"from": "2025-01-01", "to": "2026-01-01"})
    assert response.status_code == 200


async def test_tags_named_like_report_columns_are_shown_but_never_grouped(sqlite_url: str) -> None:
    """Tags named model, provider, day or month are legal tags. The dashboard shows them on their
    calls (as text, not filter links) and leaves them out of the tag keys it groups by, so the
    overview's top tags are real tags and no page links to a 400."""
    async with Tracker(sqlite_url) as tracker:
        record = tracker._recorder.build(
            provider="openai", model="gpt-4o-mini", usage=Usage(input_tokens=10, output_tokens=1),
            usage_source="manual", tags={"model": "variant-b", "day": "monday", "team": "search"},
        )  # fmt: skip
        windows = tracker.budget_guard.windows(record.tags, record.occurred_at)
        await tracker.store.write([PendingWrite(record, windows)])
        app = create_app(tracker, public=True)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            overview, tags, calls_page = [await c.get(path) for path in ("/", "/tags", "/calls")]
            assert overview.status_code == tags.status_code == calls_page.status_code == 200
            assert "Top team" in overview.text and "Top day" not in overview.text
            assert "Top models" in overview.text and "Top model<" not in overview.text
            assert "key=team" in tags.text and "key=day" not in tags.text and "key=model" not in tags.text
            assert "model=variant-b" in calls_page.text and "tag=model" not in calls_page.text
            for link in re.findall(r'href="([^"]+)"', overview.text + tags.text + calls_page.text):
                if link.startswith("/"):
                    response = await c.get(link.replace("&amp;", "&"))
                    assert response.status_code == 200, link


def links(html: str) -> dict[str, str]:
    """Each link of the page under the mount, by its text (unescaped, tags stripped)."""
    found = re.findall(r'<a [^>]*href="(/spend[^"]*)"[^>]*>(.*?)</a>', html, re.S)
    return {unescape(re.sub(r"<[^>]+>", "", text)): unescape(href) for href, text in found}


async def test_tabs_and_newlines_in_tag_values_and_model_names_are_filters_that_open(db_url: str) -> None:
    """track() accepts a tag value with a tab and a model name ending in a newline (only NUL is
    refused). The calls, models, tags and overview pages show them visibly (␉, ␊), escaped, and link to
    them; every link opens (200) on exactly their calls, and the CSV of that filter holds them as
    they are. A call's every tag can be a filter, so the link adding its last tag opens too."""
    many = {f"k{n:02d}": "v" for n in range(12)}
    async with Tracker(db_url) as tracker:
        await tracker.track(provider="openai", model="gpt-4o", input_tokens=10, output_tokens=1,
                            tags={"user_id": "Jane\tDoe", "note": '"><b>x\n'})  # fmt: skip
        await tracker.track(provider="openai", model="gpt-4o", input_tokens=20, output_tokens=1,
                            tags={"user_id": "Jane Doe"})  # fmt: skip
        await tracker.track(provider="openai", model="gpt-4o\n", input_tokens=30, output_tokens=1)
        await tracker.track(provider="openai", model="gpt-4o", input_tokens=40, output_tokens=1, tags=many)
        host = Starlette(routes=[Mount("/spend", create_app(tracker, public=True))])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(host), base_url="http://t") as c:
            eleven = [f"{k}={v}" for k, v in list(many.items())[:11]]
            pages = {name: await c.get(path, params=params) for name, path, params in (
                ("overview", "/spend/", {}), ("calls", "/spend/calls", {}), ("models", "/spend/models", {}),
                ("tags", "/spend/tags", {"key": "user_id"}), ("eleven", "/spend/calls", {"tag": eleven}),
            )}  # fmt: skip
            assert all(page.status_code == 200 for page in pages.values())
            assert all("<b>" not in page.text for page in pages.values())
            targets = {href for page in pages.values() for href in links(page.text).values()}
            answers = {href: await c.get(href) for href in sorted(targets)}
            assert {href: r.status_code for href, r in answers.items() if r.status_code != 200} == {}
            jane = answers[links(pages["calls"].text)["user_id=Jane␉Doe"]]
            [[*_, jane_tags]] = cells(jane.text, "calls")
            assert "user_id=Jane␉Doe" in jane_tags and 'note="><b>x␊' in unescape(jane_tags)
            assert "<b>" not in jane.text
            tagged = answers[links(pages["tags"].text)["Jane␉Doe"]]
            assert len(cells(tagged.text, "calls")) == 1 and "user_id = Jane␉Doe" in tagged.text
            model = answers[links(pages["models"].text)["gpt-4o␊"]]
            assert [row[1] for row in cells(model.text, "calls")] == ["gpt-4o␊ openai"]
            last = answers[links(pages["eleven"].text)["k11=v"]]
            assert len(cells(last.text, "calls")) == 1 and last.text.count('class="chip"') == 12
            export = await c.get("/spend/calls.csv", params={"tag": "user_id=Jane\tDoe"})
            model_csv = await c.get("/spend/calls.csv", params={"model": "gpt-4o\n"})
    [row] = csv.DictReader(io.StringIO(export.text))
    assert json.loads(row["tags"]) == {"user_id": "Jane\tDoe", "note": '"><b>x\n'}
    assert [r["model"] for r in csv.DictReader(io.StringIO(model_csv.text))] == ["gpt-4o\n"]


def form_fields(html: str) -> list[tuple[str, str]]:
    """What submitting the page's first form sends: each named input's value, as a browser keeps
    it (a text field strips line breaks; a hidden one, sent, has each one as CR LF)."""
    form = html.split("<form", 1)[1].split("</form>", 1)[0]
    fields = []
    for attributes in re.findall(r"<input ([^>]*)>", form):
        name = re.search(r'name="([^"]*)"', attributes)
        if name is not None:
            value = unescape(re.search(r'value="([^"]*)"', attributes).group(1))  # type: ignore[union-attr]
            if 'type="hidden"' in attributes:
                value = re.sub(r"\r\n|\r|\n", "\r\n", value)
            else:
                value = value.replace("\r", "").replace("\n", "")
            fields.append((name.group(1), value))
    return fields


async def test_filters_with_line_breaks_survive_the_filter_forms(db_url: str) -> None:
    """A model or tag value holding a line break is a filter a form's field cannot carry: each form
    keeps it in a hidden `kept` field (a query string: no line break in it), so submitting the
    calls page's Filter form or a range form's Apply leaves the same calls shown. A field the form
    gives itself wins over a kept one: a model typed in replaces the kept model."""
    async with Tracker(db_url) as tracker:
        for model, note in (
            ("gpt-4o\n", "a\nb"),
            ("gpt-4o\n", "a\r\nb"),
            ("gpt-4o", "a\nb"),
            ("gpt-4o\n", "ab"),
        ):
            await tracker.track(provider="openai", model=model, input_tokens=10, output_tokens=1,
                                tags={"note": note, "user_id": "u1"})  # fmt: skip
        host = Starlette(routes=[Mount("/spend", create_app(tracker, public=True))])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(host), base_url="http://t") as c:
            wanted = {"model": "gpt-4o\n", "tag": ["note=a\nb", "user_id=u1"]}
            calls = await c.get("/spend/calls", params=wanted)
            assert len(cells(calls.text, "calls")) == 1
            sent = form_fields(calls.text)
            assert ("kept", "model=gpt-4o%0A&tag=note%3Da%0Ab") in sent and ("tag", "user_id=u1") in sent
            again = await c.get("/spend/calls", params=sent)
            assert cells(again.text, "calls") == cells(calls.text, "calls")
            typed = [(n, "gpt-4o" if n == "model" else v) for n, v in sent]
            assert [r[1] for r in cells((await c.get("/spend/calls", params=typed)).text, "calls")] == [
                "gpt-4o openai"
            ]
            overview = await c.get("/spend/", params=wanted)
            applied = await c.get("/spend/", params=form_fields(overview.text))
            assert 'class="chip"' in applied.text and applied.text == overview.text
            carried = await c.get("/spend/calls", params=[(n, v) for n, v in form_fields(overview.text)])
            assert cells(carried.text, "calls") == cells(calls.text, "calls")


async def test_a_slow_csv_download_in_memory_holds_no_write_up() -> None:
    """On an in-memory database (one connection, lent to one user at a time) a CSV download whose
    client reads slowly does not hold the connection while it waits: a call recorded meanwhile is
    written at once. The export held it through the download, and the write waited for the client
    (the pool's 30 s, then retries)."""
    async with Tracker("sqlite+aiosqlite://", budgets=[Budget.daily(100, mode="block")]) as tracker:
        first = await tracker.track(provider="openai", model="gpt-4o", input_tokens=10, output_tokens=1)
        app = create_app(tracker, public=True)
        recorded: list[CallRecord] = []
        body: list[bytes] = []

        requested = asyncio.Event()

        async def receive() -> dict[str, Any]:
            if requested.is_set():
                await asyncio.Event().wait()  # the client never leaves
            requested.set()
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                body.append(message.get("body", b""))
                if first.event_id.encode() in body[-1] and not recorded:  # a row went out: the client pauses
                    call = tracker.track(
                        provider="openai", model="gpt-4o-mini", input_tokens=5, output_tokens=1
                    )
                    recorded.append(await asyncio.wait_for(call, 20))  # a guard against a hang only

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
            "scheme": "http", "path": "/calls.csv", "raw_path": b"/calls.csv", "query_string": b"",
            "root_path": "", "headers": [(b"host", b"t")], "server": ("t", 80), "client": ("c", 1),
        }  # fmt: skip
        await app(scope, receive, send)
        rows = list(csv.DictReader(io.StringIO(b"".join(body).decode())))
        assert [row["event_id"] for row in rows] == [first.event_id] and len(recorded) == 1
        [status] = await tracker.budget_status()
        assert status.spent == first.cost + recorded[0].cost  # type: ignore[operator]


async def test_the_tags_page_says_it_shows_the_top_500_values_and_keeps_the_no_key_row(db_url: str) -> None:
    """Over 502 values of a key, the tags page lists the 500 costliest, says so ("top 500 of 502"),
    and still has the "(no user_id)" row for the calls without the key, however cheap they are."""
    async with Tracker(db_url) as tracker:
        now = datetime.now(UTC) - timedelta(seconds=1)
        specs = [(1000 + n, {"user_id": f"u{n:03d}"}) for n in range(502)] + [(1, {})]
        records = [
            tracker._recorder.build(provider="openai", model="gpt-4o", usage=Usage(input_tokens=i,
                                    output_tokens=1), usage_source="manual", tags=tags, occurred_at=now)
            for i, tags in specs
        ]  # fmt: skip
        windows = tracker.budget_guard.windows
        await tracker.store.write([PendingWrite(r, windows(r.tags, r.occurred_at)) for r in records])
        app = create_app(tracker, public=True)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            many = await c.get("/tags", params={"key": "user_id"})
            few = await c.get("/tags", params={"key": "user_id", "tag": "user_id=u000"})
    assert many.status_code == few.status_code == 200
    rows = cells(many.text, "tag-values")
    assert len(rows) == 501 and rows[0][0] == "u501" and rows[499][0] == "u002"
    assert rows[-1][:2] == ["(no user_id)", "1"]
    assert "Showing the top 500 of 502 values of user_id" in many.text
    assert [row[0] for row in cells(few.text, "tag-values")] == ["u000"] and 'id="cut"' not in few.text


@pytest.mark.parametrize("budgets", [[], [Budget.per_call(5)]], ids=["no budgets", "a per-call budget"])
async def test_budgets_without_a_day_or_month_budget_list_the_windows_in_force(
    sqlite_url: str, budgets: list[Budget]
) -> None:
    """No day or month budget: /budgets lists today's and this month's windows as recorded, also
    when a per-call budget is configured (it said "Nothing recorded today or this month")."""
    async with Tracker(sqlite_url, budgets=budgets) as tracker:
        await tracker.track(provider="openai", model="gpt-4o", input_tokens=40_000, output_tokens=500)
        app = create_app(tracker, authorize=allow)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://t", headers={"x-key": "yes"}
        ) as c:
            page = (await c.get("/budgets")).text
    assert [(row[0], row[3], row[5]) for row in cells(page, "windows")] == [
        ("day", "$0.1050", "1"),
        ("month", "$0.1050", "1"),
    ]


async def test_the_overview_counts_the_unpriced_calls_of_the_period_before(sqlite_url: str) -> None:
    """The period before held one call, of unknown price: the spend card said "nothing in the 30
    days before" beside "1 before" in the calls card; it says $0 + 1 unpriced."""
    async with Tracker(sqlite_url) as tracker:
        before = tracker._recorder.build(
            provider="acme", model="mystery", usage=Usage(input_tokens=10, output_tokens=10),
            usage_source="manual", tags={}, occurred_at=datetime.now(UTC) - timedelta(days=40),
        )  # fmt: skip
        await tracker.store.write(
            [PendingWrite(before, tracker.budget_guard.windows({}, before.occurred_at))]
        )
        app = create_app(tracker, public=True)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            page = (await c.get("/")).text
    assert "nothing in the 30 days before" not in page
    assert "$0 + 1 unpriced in the 30 days before" in page


async def test_the_overview_shows_the_global_budgets_before_per_tag_ones(sqlite_url: str) -> None:
    """The overview shows 8 budget bars. Configured after three per-tag budgets whose top windows
    filled all 8, the global budget was left out; global budgets now come first, and a link says
    there are more on /budgets, which lists them all."""
    budgets = [Budget.daily(1, per=key) for key in ("user_id", "team", "feature")] + [Budget.monthly(100)]
    async with Tracker(sqlite_url, budgets=budgets) as tracker:
        for i in range(3):
            tags = {"user_id": f"u{i}", "team": f"t{i}", "feature": f"f{i}"}
            await tracker.track(
                provider="openai", model="gpt-4o", input_tokens=1_000, output_tokens=10, tags=tags
            )
        app = create_app(tracker, public=True)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            overview, every = (await c.get("/")).text, (await c.get("/budgets")).text
    assert "monthly $100" in overview and "More budgets on the Budgets page" in overview
    assert overview.index("monthly $100") < overview.index("daily $1 per user_id")
    assert "daily $1 per feature: f2" not in overview  # the ninth per-tag bar, left to /budgets
    assert all(f"daily $1 per {key}: {key[0]}" in every for key in ("user_id", "team", "feature"))
    assert "monthly $100" in every and "daily $1 per feature: f2" in every
