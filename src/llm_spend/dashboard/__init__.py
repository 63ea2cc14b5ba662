"""A dashboard to mount in your app: where the money goes, server-rendered (no JavaScript).

    from llm_spend.dashboard import create_app

    app.mount("/llm-spend", create_app(tracker, authorize=lambda request: is_admin(request)))

Pages: overview, calls (filterable, paginated, CSV export), models, tags, budgets, data quality.
It reads through the tracker the host app enters (its lifespan) and has no lifespan of its own.
Needs Jinja2 (`pip install 'llm-spend[dashboard]'`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .filters import BadFilter

if TYPE_CHECKING:
    from ..tracker import Tracker
    from .pages import Pages

__all__ = ["Authorize", "create_app"]

logger = logging.getLogger("llm_spend")

Authorize = Callable[[Request], "bool | Awaitable[bool]"]
"""Takes the request; returns (or resolves to) True to allow it, False to refuse it with 403. It may
also raise `starlette.exceptions.HTTPException` (e.g. 401 with a WWW-Authenticate header)."""

SECURITY_HEADERS = (
    (b"content-security-policy", b"default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
     b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
)  # fmt: skip


def create_app(
    tracker: Tracker,
    *,
    authorize: Authorize | None = None,
    public: bool = False,
    page_size: int = 50,
    title: str = "LLM spend",
) -> Starlette:
    """The dashboard as a Starlette app to mount (e.g. at /llm-spend).

    `authorize` is required: every request goes through it before any page is read. To serve the
    dashboard to anyone who can reach it (say, behind your own auth proxy), pass `public=True` instead.
    """
    if authorize is None and public is not True:
        raise ValueError(
            "create_app needs authorize= (a callable taking the request and returning True to allow it), "
            "or public=True to serve spend data to anyone who can reach the mount"
        )
    if authorize is not None and (public or not callable(authorize)):
        raise ValueError(f"authorize must be a callable (and public left False), got {authorize!r}")
    if isinstance(page_size, bool) or not isinstance(page_size, int) or not 1 <= page_size <= 1000:
        raise ValueError(f"page_size must be an integer from 1 to 1000, got {page_size!r}")
    try:
        from .pages import Pages, environment
    except ImportError as exc:
        if exc.name != "jinja2":
            raise
        raise ImportError("llm_spend.dashboard needs Jinja2: pip install 'llm-spend[dashboard]'") from None
    pages = Pages(tracker, environment(tracker.timezone), page_size=page_size, title=title)
    routes = [
        Route("/", pages.overview, name="overview"),
        Route("/calls", pages.calls, name="calls"),
        Route("/calls.csv", pages.calls_csv, name="calls_csv"),
        Route("/models", pages.models, name="models"),
        Route("/tags", pages.tags, name="tags"),
        Route("/budgets", pages.budgets, name="budgets"),
        Route("/quality", pages.quality, name="quality"),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(_Gate, authorize=authorize, pages=pages)],
        exception_handlers={
            HTTPException: _http_error(pages),
            BadFilter: _bad_filter(pages),
            Exception: _server_error(pages),
        },
    )


def _http_error(pages: Pages) -> Callable[[Request, Exception], Response]:
    def handle(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return pages.error(request, exc.status_code, exc.detail, exc.headers)

    return handle


def _bad_filter(pages: Pages) -> Callable[[Request, Exception], Response]:
    def handle(request: Request, exc: Exception) -> Response:
        return pages.error(request, 400, str(exc))

    return handle


def _server_error(pages: Pages) -> Callable[[Request, Exception], Response]:
    """The 500 page. Starlette sends it from outside every middleware (the exception still reaches
    the server's log), so it carries the security headers itself."""

    def handle(request: Request, exc: Exception) -> Response:
        response = pages.error(request, 500, "The dashboard failed to answer; the server log has the error.")
        for name, value in SECURITY_HEADERS:
            response.headers[name.decode()] = value.decode()
        return response

    return handle


class _Gate:
    """Pure ASGI: asks `authorize` before anything else runs, and adds the security headers."""

    def __init__(self, app: ASGIApp, *, authorize: Authorize | None, pages: Pages) -> None:
        self.app = app
        self.authorize = authorize
        self.pages = pages

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        refusal = await self._refusal(Request(scope, receive))
        if refusal is not None:
            await refusal(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)

    async def _refusal(self, request: Request) -> Response | None:
        if self.authorize is None:
            return None
        try:
            allowed: Any = self.authorize(request)
            if inspect.isawaitable(allowed):
                allowed = await allowed
        except HTTPException as exc:
            return self.pages.error(request, exc.status_code, exc.detail, exc.headers)
        if allowed is True:
            return None
        if allowed is not False:
            raise TypeError(f"authorize must return True or False, got {allowed!r}")
        return self.pages.error(request, 403, "You are not allowed to see this dashboard.")
