"""The dashboard in headless Chromium, served by uvicorn on 127.0.0.1 from a seeded ledger.

Every page loads, a filter narrows the calls table, the CSV link downloads exactly the filtered rows,
a tag value holding <script> renders as text, one holding a line break stays a filter through the
forms, and requests without authorization are refused.

Chromium is Debian's (`apt-get install chromium chromium-driver`), driven through Playwright's Python
package (never `playwright install`). Without it the tests skip and say so, unless
LLM_SPEND_REQUIRE_BROWSER=1 (set by .ci/run), which makes a missing browser a failure.
LLM_SPEND_SCREENSHOT=docs/overview.png also saves a screenshot of the overview there.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import os
import random
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Mount

from conftest import served
from llm_spend import Budget, Tracker, Usage
from llm_spend.dashboard import create_app
from llm_spend.storage.store import PendingWrite

CHROMIUM = os.environ.get("LLM_SPEND_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
REQUIRE = os.environ.get("LLM_SPEND_REQUIRE_BROWSER") == "1"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run",
]  # fmt: skip
PASSWORD = "s3cret"
CHALLENGE = 'Basic realm="llm-spend"'
XSS = "<script>alert(1)</script>"
NOTE = "two\nlines"
BUDGETS = [Budget.monthly(40), Budget.daily("0.5", per="user_id"), Budget.daily(3)]
MODELS = [("openai", "gpt-4o"), ("openai", "gpt-4o-mini"), ("anthropic", "claude-sonnet-4-6"),
          ("google", "gemini-2.5-flash"), ("acme", "house-model")]  # fmt: skip


def browser_problem() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is missing (pip install playwright; the browser is Debian's)"
    if not os.path.isfile(CHROMIUM) or not os.access(CHROMIUM, os.X_OK):
        return f"Chromium not found at {CHROMIUM} (apt-get install chromium chromium-driver)"
    return None


def seed_calls(tracker: Tracker) -> list[Any]:
    """60 days of calls (the overview compares with the 30 before), one of them tagged with <script>."""
    rng = random.Random(7)
    now = datetime.now(UTC)
    records = []
    for n in range(420):
        days_ago = rng.random() ** 1.3 * 58
        provider, model = MODELS[min(int(rng.random() ** 1.7 * len(MODELS)), len(MODELS) - 1)]
        tags = {
            "user_id": rng.choice(["alice", "bob", "carol", "dave"]),
            "feature": rng.choice(["chat", "search"]),
        }
        if n % 60 == 5:
            tags["feature"] = "export"
        records.append(tracker._recorder.build(
            provider=provider, model=model, usage_source="manual", tags=tags,
            usage=Usage(input_tokens=rng.randint(200, 9000), output_tokens=rng.randint(20, 1500)),
            occurred_at=now - timedelta(days=days_ago, minutes=n),
        ))  # fmt: skip
    records.append(tracker._recorder.build(
        provider="openai", model="gpt-4o-mini", usage_source="manual", tags={"user_id": XSS},
        usage=Usage(input_tokens=100, output_tokens=10), occurred_at=now - timedelta(hours=2),
    ))  # fmt: skip
    records.append(tracker._recorder.build(
        provider="openai", model="gpt-4o", usage_source="manual", tags={"user_id": "alice", "note": NOTE},
        usage=Usage(input_tokens=100, output_tokens=10), occurred_at=now - timedelta(hours=1),
    ))  # fmt: skip
    return records


async def seed(url: str) -> list[Any]:
    async with Tracker(url, budgets=BUDGETS) as tracker:
        records = seed_calls(tracker)
        windows = tracker.budget_guard.windows
        await tracker.store.write([PendingWrite(r, windows(r.tags, r.occurred_at)) for r in records])
    return records


def authorize(request: Request) -> bool:
    """HTTP Basic: no credentials get a 401 challenge, wrong ones a 403."""
    header = request.headers.get("authorization")
    if header is None:
        raise HTTPException(401, "Sign in to see the dashboard.", headers={"WWW-Authenticate": CHALLENGE})
    return secrets.compare_digest(header, "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode())


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[Any]]]:
    """The host app (its lifespan enters the tracker) with the dashboard at /llm-spend, on a free port."""
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('dash') / 'ledger.db'}"
    records = asyncio.run(seed(url))
    tracker = Tracker(url, budgets=BUDGETS)
    app = Starlette(
        lifespan=tracker.lifespan, routes=[Mount("/llm-spend", create_app(tracker, authorize=authorize))]
    )
    with served(app) as port:
        yield f"http://127.0.0.1:{port}/llm-spend", records


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    problem = browser_problem()
    if problem:
        if REQUIRE:
            pytest.fail(f"LLM_SPEND_REQUIRE_BROWSER=1 but {problem}")
        pytest.skip(f"browser tests skipped: {problem}")
    from playwright.sync_api import sync_playwright

    # launch() starts Chromium with a fresh temporary --user-data-dir of its own.
    with sync_playwright() as p, tempfile.TemporaryDirectory() as downloads:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, downloads_path=downloads
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A signed-in page; any JavaScript dialog it opens is recorded (there must be none)."""
    context = browser.new_context(
        http_credentials={"username": "admin", "password": PASSWORD}, accept_downloads=True,
        viewport={"width": 1280, "height": 900},
    )  # fmt: skip
    page = context.new_page()
    page.dialogs = []
    page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
    yield page
    context.close()


def test_every_page_loads_from_the_navigation(site: tuple[str, list[Any]], page: Any) -> None:
    """Each nav link opens its page (200, its heading, no script element); the overview shows the total."""
    base, _ = site
    response = page.goto(f"{base}/")
    assert response.status == 200
    assert page.locator("h1").inner_text() == "Overview"
    assert page.locator("svg.chart rect.col").count() == 30
    assert page.locator(".budget").count() >= 2
    if os.environ.get("LLM_SPEND_SCREENSHOT"):
        page.screenshot(path=os.environ["LLM_SPEND_SCREENSHOT"], full_page=True)
    for label in ("Calls", "Models", "Tags", "Budgets", "Data quality", "Overview"):
        with page.expect_navigation() as navigation:
            page.locator("header nav a", has_text=label).click()
        assert navigation.value.status == 200, label
        assert page.locator("h1").inner_text() == label
        assert page.locator("script").count() == 0
    page.goto(f"{base}/tags?key=user_id")
    assert page.locator("#tag-values tbody tr").count() == 5
    bad = page.goto(f"{base}/calls?from=2026-13-01")
    assert bad.status == 400 and "from must be a date" in page.locator("main").inner_text()


def test_a_filter_narrows_the_calls_table_and_the_csv_has_those_rows(
    site: tuple[str, list[Any]], page: Any
) -> None:
    """Typing feature=export into the tag filter leaves those calls; the CSV link downloads exactly them."""
    base, records = site
    cutoff = datetime.now(UTC) - timedelta(days=29)
    expected = {r.event_id for r in records if r.tags.get("feature") == "export" and r.occurred_at > cutoff}
    page.goto(f"{base}/calls")
    assert page.locator("#calls tbody tr").count() == 50  # a full page before filtering
    page.locator("#filter input[name=tag]").last.fill("feature=export")
    with page.expect_navigation():
        page.locator("#filter button").click()
    rows = page.locator("#calls tbody tr")
    assert 0 < rows.count() == len(expected)
    assert all("feature=export" in text for text in rows.all_inner_texts())
    with page.expect_download() as download:
        page.locator("#csv").click()
    text = Path(download.value.path()).read_text(encoding="utf-8")
    exported = list(csv.DictReader(io.StringIO(text)))
    assert {row["event_id"] for row in exported} == expected
    assert download.value.suggested_filename.startswith("llm-calls-")


def test_a_script_tag_value_renders_as_text(site: tuple[str, list[Any]], page: Any) -> None:
    """A tag value <script>alert(1)</script> shows literally, in the table and the links; nothing runs."""
    base, _ = site
    page.goto(f"{base}/calls?model=gpt-4o-mini")
    assert page.get_by_text(f"user_id={XSS}").count() == 1
    page.goto(f"{base}/tags?key=user_id")
    assert page.locator("#tag-values").get_by_text(XSS, exact=True).count() == 1
    page.locator("#tag-values").get_by_text(XSS, exact=True).click()
    page.wait_for_load_state()
    assert page.locator("#calls tbody tr").count() == 1 and XSS in page.locator(".chips").inner_text()
    assert page.locator("script").count() == 0
    assert page.dialogs == []


def test_a_tag_value_with_a_line_break_stays_the_filter_through_the_forms(
    site: tuple[str, list[Any]], page: Any
) -> None:
    """A call tagged note="two\\nlines": its filter shows one row; submitting the calls page's Filter
    form, or the overview's range form and then its Calls link, keeps that filter exactly (a text
    field would strip the line break, a hidden one send it as CR LF: the forms carry it in `kept`)."""
    base, _ = site
    chip = "note = two\u240alines"
    page.goto(f"{base}/calls?" + urlencode({"tag": f"note={NOTE}"}))
    assert page.locator("#calls tbody tr").count() == 1 and chip in page.locator(".chips").inner_text()
    with page.expect_navigation():
        page.locator("#filter button").click()
    assert "kept=" in page.url
    assert page.locator("#calls tbody tr").count() == 1 and chip in page.locator(".chips").inner_text()
    page.goto(f"{base}/?" + urlencode({"tag": f"note={NOTE}"}))
    with page.expect_navigation():
        page.locator("form.range button").click()
    assert chip in page.locator(".chips").inner_text()
    with page.expect_navigation():
        page.locator("header nav a", has_text="Calls").click()
    assert page.locator("#calls tbody tr").count() == 1 and chip in page.locator(".chips").inner_text()


def test_requests_without_authorization_are_refused(site: tuple[str, list[Any]], browser: Any) -> None:
    """No credentials: 401 with a Basic challenge (the browser gives up: it has none to offer); wrong
    ones: a 403 page. Neither shows any spend, on any page or the CSV."""
    from playwright.sync_api import Error

    base, _ = site
    anonymous = browser.new_context()
    try:
        for path in ("/", "/calls", "/calls.csv"):
            response = anonymous.request.get(f"{base}{path}")
            assert response.status == 401 and response.headers["www-authenticate"] == CHALLENGE
            assert "$" not in response.text()
        with pytest.raises(Error, match="ERR_INVALID_AUTH_CREDENTIALS"):
            anonymous.new_page().goto(f"{base}/")
    finally:
        anonymous.close()
    intruder = browser.new_context(http_credentials={"username": "admin", "password": "guess"})
    try:
        page = intruder.new_page()
        for path in ("/", "/calls", "/calls.csv"):
            response = page.goto(f"{base}{path}")
            assert response.status == 403
            assert page.locator("h1").inner_text() == "Error 403"
            assert "$" not in page.locator("body").inner_text()
    finally:
        intruder.close()
