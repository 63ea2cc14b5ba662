"""SpendMiddleware: request scope for attribution, and budget refusals as HTTP responses.

Pure ASGI (never BaseHTTPMiddleware, which stops contextvar changes from propagating). Per HTTP
request it sets the request id and the request's tags in context and resets them in ``finally``;
lifespan and websocket scopes pass straight through. A `BudgetExceeded` escaping the endpoint (or an
error standing for one: an SDK's error wrapping it, a TaskGroup's group of them; `budget_error`)
becomes a JSON response (402 by default, or 429) while the response has not started; after, it is
re-raised.
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import math
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .context import UnusableTagValue, normalize_tags, reset_request_scope, set_request_scope
from .exceptions import BudgetExceeded, budget_error
from .tracker import Tracker

__all__ = ["SpendMiddleware"]

logger = logging.getLogger("llm_spend")

TagsCallable = Callable[[Request], Mapping[str, object] | Awaitable[Mapping[str, object]]]
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,200}")
_HEADER = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z\-]{1,100}")
"""An HTTP header name (a token, RFC 9110)."""


class SpendMiddleware:
    """ASGI middleware: `app.add_middleware(SpendMiddleware, tracker=tracker, tags=lambda request: {...})`."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        tracker: Tracker,
        tags: TagsCallable | None = None,
        status_code: int = 402,
        preflight: bool = True,
        request_id_header: str = "x-request-id",
    ) -> None:
        if not isinstance(tracker, Tracker):
            raise ValueError(f"tracker must be a llm_spend.Tracker, got {tracker!r}")
        if tags is not None and not callable(tags):
            raise ValueError(f"tags must be a callable taking the request, got {tags!r}")
        if type(preflight) is not bool:
            raise ValueError(f"preflight must be True or False, got {preflight!r}")
        if not isinstance(request_id_header, str) or not _HEADER.fullmatch(request_id_header):
            raise ValueError(f"request_id_header must be an HTTP header name, got {request_id_header!r}")
        if not isinstance(status_code, int) or not 400 <= status_code <= 599:
            raise ValueError(
                f"status_code must be an HTTP error status such as 402 or 429, got {status_code!r}"
            )
        self.app = app
        self.tracker = tracker
        self.tags = tags
        self.status_code = status_code
        self.preflight = preflight
        self._refusal = tracker.budget_guard.refusal if preflight else None  # = tracker.preflight
        self.request_id_header = request_id_header.lower().encode("latin-1")
        # Generated ids: a random per-instance prefix and a counter (uuid4 costs ~5 µs here).
        self._id_prefix = os.urandom(8).hex()
        self._id_counter = itertools.count(1)
        self._logged: set[str] = set()

    def _unusable(self, exc: UnusableTagValue) -> None:
        """Log, once per problem, a tag value the tags callable gave that cannot be kept."""
        problem = str(exc)
        if problem not in self._logged and len(self._logged) < 100:
            self._logged.add(problem)
            logger.error("llm-spend: the middleware's tags callable gave a tag that cannot be kept (%s); "
                         "requests with it are tracked without that tag", problem)  # fmt: skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tags: Mapping[str, str | None] = {}
        if self.tags is not None:
            found: Any = self.tags(Request(scope))
            if type(found) is not dict:  # the common case skips the slower checks
                found = await self._awaited_mapping(found)
            while True:
                try:
                    tags = normalize_tags(found)
                    break
                except UnusableTagValue as exc:  # the request goes on, that tag left out
                    self._unusable(exc)
                    found = {key: value for key, value in found.items() if key != exc.key}
        # The id is worked out only when a call is recorded: from the header, else from a number
        # drawn now (so every call of the request gets the same id).
        request_id = (self._request_id, scope["headers"], next(self._id_counter))
        token, merged = set_request_scope(request_id, tags)
        try:
            refusal = self._refusal(merged) if self._refusal is not None else None
            if refusal is not None:
                await self._refuse(refusal, send)
                return
            started = False  # once anything went out (a response starts with its first message)

            def send_wrapper(message: Message) -> Awaitable[None]:  # no coroutine of its own
                nonlocal started
                started = True
                return send(message)

            try:
                await self.app(scope, receive, send_wrapper)
            except Exception as exc:  # a BudgetExceeded, or an SDK's error or a group standing for one
                refused = budget_error(exc)
                if refused is None or started:
                    raise
                await self._refuse(refused, send)
        finally:
            reset_request_scope(token)

    def _request_id(self, headers: list[tuple[bytes, bytes]], number: int) -> str:
        for name, value in headers:
            if name == self.request_id_header:
                text: str = value.decode("latin-1")
                if _REQUEST_ID.fullmatch(text):
                    return text
                break
        return f"{self._id_prefix}-{number:x}"

    @staticmethod
    async def _awaited_mapping(result: Any) -> Mapping[str, object]:
        if inspect.isawaitable(result):
            result = await result
        if not isinstance(result, Mapping):
            raise TypeError(
                f"SpendMiddleware tags callable must return a mapping, got {type(result).__name__}"
            )
        return result

    async def _refuse(self, exc: BudgetExceeded, send: Send) -> None:
        headers = [(b"content-type", b"application/json")]
        body = exc.to_dict()
        if exc.window_end is not None:
            retry_after = max(1, math.ceil((exc.window_end - datetime.now(UTC)).total_seconds()))
            body["retry_after"] = retry_after
            headers.append((b"retry-after", str(retry_after).encode()))
        payload = json.dumps(body).encode()
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": self.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
