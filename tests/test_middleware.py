"""SpendMiddleware: request scope (request id, tags) and budget refusals as HTTP responses."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from llm_spend import Budget, BudgetExceeded, SpendMiddleware, Tracker, current_tags, with_tags
from llm_spend.context import current_request_id

Factory = Callable[..., Awaitable[Tracker]]

CALL: dict[str, Any] = {"provider": "openai", "model": "gpt-4o", "input_tokens": 1200, "output_tokens": 300}
# gpt-4o: $0.006 per CALL


def user_tags(request: Request) -> dict[str, str]:
    return {"user_id": request.headers.get("x-user", "anonymous"), "route": request.url.path}


def build_app(
    tracker: Tracker,
    routes: list[Any],
    *,
    tags: Any = user_tags,
    lifespan: Any = None,
    **options: Any,
) -> Starlette:
    return Starlette(
        routes=routes,
        middleware=[Middleware(SpendMiddleware, tracker=tracker, tags=tags, **options)],
        lifespan=lifespan,
    )


def client_for(app: Any, *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url="http://t")


async def ledger(url: str) -> list[dict[str, Any]]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(text("SELECT request_id, tags, event_id FROM llm_calls"))
            rows = [dict(r) for r in result.mappings().all()]
    finally:
        await engine.dispose()
    for row in rows:
        if isinstance(row["tags"], str):
            row["tags"] = json.loads(row["tags"])
    return rows


def track_endpoint(tracker: Tracker) -> Callable[[Request], Awaitable[JSONResponse]]:
    async def endpoint(request: Request) -> JSONResponse:
        record = await tracker.track(**CALL)
        return JSONResponse(
            {"event_id": record.event_id, "request_id": record.request_id, "tags": dict(current_tags())}
        )

    return endpoint


# -- request id and tags ---------------------------------------------------------------------------------


async def test_request_id_header_lands_in_the_ledger(sqlite_url: str, tracker_factory: Factory) -> None:
    """X-Request-ID from the request is the ledger row's request_id."""
    tracker = await tracker_factory(sqlite_url)
    app = build_app(tracker, [Route("/", track_endpoint(tracker))])
    async with client_for(app) as client:
        response = await client.get("/", headers={"X-Request-ID": "req-123.abc"})
    assert response.status_code == 200
    assert response.json()["request_id"] == "req-123.abc"
    assert [r["request_id"] for r in await ledger(sqlite_url)] == ["req-123.abc"]


async def test_request_id_is_generated_without_header(sqlite_url: str, tracker_factory: Factory) -> None:
    """Without X-Request-ID each request gets its own generated id, stored on its rows."""
    tracker = await tracker_factory(sqlite_url)
    app = build_app(tracker, [Route("/", track_endpoint(tracker))])
    async with client_for(app) as client:
        ids = [(await client.get("/")).json()["request_id"] for _ in range(3)]
    assert all(isinstance(i, str) and i for i in ids)
    assert len(set(ids)) == 3
    assert sorted(r["request_id"] for r in await ledger(sqlite_url)) == sorted(ids)


async def test_every_call_of_a_request_gets_its_one_id(sqlite_url: str, tracker_factory: Factory) -> None:
    """The id is worked out when a call is recorded: two calls in the request and one in a task that
    records after the response all carry the same id, generated or from a header."""
    tracker = await tracker_factory(sqlite_url)
    later: list[asyncio.Task[Any]] = []

    async def endpoint(request: Request) -> JSONResponse:
        first = await tracker.track(**CALL)
        second = await tracker.track(**CALL)

        async def after() -> Any:
            await asyncio.sleep(0.05)
            return await tracker.track(**CALL)

        later.append(asyncio.create_task(after()))
        return JSONResponse({"ids": [first.request_id, second.request_id]})

    app = build_app(tracker, [Route("/", endpoint)])
    async with client_for(app) as client:
        generated = (await client.get("/")).json()["ids"]
        given = (await client.get("/", headers={"X-Request-ID": "req-7"})).json()["ids"]
    late = [(await task).request_id for task in later]
    assert generated[0] == generated[1] == late[0] and generated[0] != "req-7"
    assert given == ["req-7", "req-7"] and late[1] == "req-7"
    rows = sorted(r["request_id"] for r in await ledger(sqlite_url))
    assert rows == sorted([generated[0]] * 3 + ["req-7"] * 3)


async def test_middleware_tags_land_in_the_row(sqlite_url: str, tracker_factory: Factory) -> None:
    """The tags callable's mapping is in context during the request and stored on the row."""
    tracker = await tracker_factory(sqlite_url)
    app = build_app(tracker, [Route("/chat", track_endpoint(tracker))])
    async with client_for(app) as client:
        response = await client.get("/chat", headers={"x-user": "u-7"})
    assert response.json()["tags"] == {"user_id": "u-7", "route": "/chat"}
    rows = await ledger(sqlite_url)
    assert [r["tags"] for r in rows] == [{"user_id": "u-7", "route": "/chat"}]


async def test_middleware_tags_are_normalized(sqlite_url: str, tracker_factory: Factory) -> None:
    """Middleware tags go through the same rules as with_tags: strings, secrets redacted."""
    tracker = await tracker_factory(sqlite_url)
    app = build_app(
        tracker,
        [Route("/", track_endpoint(tracker))],
        tags=lambda r: {"tenant": 12, "authorization": "Bearer x"},
    )
    async with client_for(app) as client:
        await client.get("/")
    assert [r["tags"] for r in await ledger(sqlite_url)] == [{"tenant": "12", "authorization": "[REDACTED]"}]


async def test_200_concurrent_requests_never_bleed_tags(db_url: str, tracker_factory: Factory) -> None:
    """200 concurrent requests for different users: every row carries exactly its own request's tags."""
    tracker = await tracker_factory(db_url)
    rng = random.Random(3)
    delays = [rng.random() * 0.01 for _ in range(200)]

    async def endpoint(request: Request) -> JSONResponse:
        i = int(request.query_params["i"])
        await asyncio.sleep(delays[i])
        with with_tags(step="inner"):
            await asyncio.sleep(delays[199 - i])
            record = await tracker.track(**CALL)
        return JSONResponse({"tags": dict(record.tags), "after": dict(current_tags())})

    app = build_app(tracker, [Route("/", endpoint)])
    async with client_for(app) as client:

        async def one(i: int) -> httpx.Response:
            return await client.get(
                "/", params={"i": i}, headers={"x-user": f"user-{i}", "x-request-id": f"r{i}"}
            )

        responses = await asyncio.gather(*(one(i) for i in range(200)))
    for i, response in enumerate(responses):
        assert response.status_code == 200
        assert response.json()["tags"] == {"user_id": f"user-{i}", "route": "/", "step": "inner"}
        assert response.json()["after"] == {"user_id": f"user-{i}", "route": "/"}
    rows = await ledger(db_url)
    assert len(rows) == 200
    for row in rows:
        i = int(row["request_id"][1:])
        assert row["tags"] == {"user_id": f"user-{i}", "route": "/", "step": "inner"}
    assert dict(current_tags()) == {}


async def test_async_tags_callable(sqlite_url: str, tracker_factory: Factory) -> None:
    """An async tags callable is awaited and its tags are used."""
    tracker = await tracker_factory(sqlite_url)

    async def tags(request: Request) -> Mapping[str, str]:
        await asyncio.sleep(0)
        return {"tenant": request.headers["x-tenant"]}

    app = build_app(tracker, [Route("/", track_endpoint(tracker))], tags=tags)
    async with client_for(app) as client:
        response = await client.get("/", headers={"x-tenant": "acme"})
    assert response.json()["tags"] == {"tenant": "acme"}
    assert [r["tags"] for r in await ledger(sqlite_url)] == [{"tenant": "acme"}]


async def test_no_tags_callable_still_sets_request_id(sqlite_url: str, tracker_factory: Factory) -> None:
    """Without tags=, requests still get a request id and empty middleware tags."""
    tracker = await tracker_factory(sqlite_url)
    app = build_app(tracker, [Route("/", track_endpoint(tracker))], tags=None)
    async with client_for(app) as client:
        response = await client.get("/", headers={"x-request-id": "abc"})
    assert response.json() == {"event_id": response.json()["event_id"], "request_id": "abc", "tags": {}}


@pytest.mark.parametrize(
    "tags",
    [
        pytest.param(lambda request: 1 / 0, id="raises"),
        pytest.param(lambda request: ["user_id", "1"], id="returns-list"),
        pytest.param(lambda request: "user_id=1", id="returns-str"),
        pytest.param(lambda request: None, id="returns-none"),
        pytest.param(lambda request: {"bad key": "x"}, id="bad-key"),
    ],
)
async def test_failing_tags_callable_is_a_500(sqlite_url: str, tracker_factory: Factory, tags: Any) -> None:
    """A tags callable that raises or returns a non-mapping gives a 500; the endpoint does not run."""
    tracker = await tracker_factory(sqlite_url)
    calls: list[int] = []

    async def endpoint(request: Request) -> PlainTextResponse:
        calls.append(1)
        return PlainTextResponse("ok")

    app = build_app(tracker, [Route("/", endpoint)], tags=tags)
    async with client_for(app, raise_app_exceptions=False) as client:
        response = await client.get("/")
    assert response.status_code == 500
    assert calls == []
    assert dict(current_tags()) == {}


async def test_a_tag_value_that_cannot_be_kept_is_left_out_and_the_request_served(
    sqlite_url: str, tracker_factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """A value with no string of its own (an ORM object, bytes) is logged once and left out; the
    other tags stay, and the endpoint runs: the app's own request path does not fail for it."""
    tracker = await tracker_factory(sqlite_url)
    app = build_app(
        tracker,
        [Route("/", track_endpoint(tracker))],
        tags=lambda request: {"user": object(), "feature": "chat"},
    )
    async with client_for(app) as client:
        responses = [await client.get("/") for _ in range(2)]
    assert [r.status_code for r in responses] == [200, 200]
    assert [row["tags"] for row in await ledger(sqlite_url)] == [{"feature": "chat"}] * 2
    assert caplog.text.count("tags callable gave a tag that cannot be kept (tag 'user'") == 1


async def test_failing_async_tags_callable_is_a_500(sqlite_url: str, tracker_factory: Factory) -> None:
    """An async tags callable that raises gives a 500 too."""
    tracker = await tracker_factory(sqlite_url)

    async def tags(request: Request) -> Mapping[str, str]:
        raise LookupError("no session")

    app = build_app(tracker, [Route("/", track_endpoint(tracker))], tags=tags)
    async with client_for(app, raise_app_exceptions=False) as client:
        response = await client.get("/")
    assert response.status_code == 500


def test_constructor_validates_options(sqlite_url: str) -> None:
    """A non-callable tags, a non-error status_code, no Tracker, a preflight that is not a bool or a
    request_id_header that is not a header name is refused when the middleware is built."""
    tracker = Tracker(sqlite_url)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    with pytest.raises(ValueError, match="tags"):
        SpendMiddleware(app, tracker=tracker, tags={"user_id": "1"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="status_code"):
        SpendMiddleware(app, tracker=tracker, status_code=200)
    for bad in (None, "tracker"):
        with pytest.raises(ValueError, match=r"tracker must be a llm_spend\.Tracker"):
            SpendMiddleware(app, tracker=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="preflight must be True or False"):
        SpendMiddleware(app, tracker=tracker, preflight="no")  # type: ignore[arg-type]
    for header in (None, b"x-id", "", "x id", "x-ид"):
        with pytest.raises(ValueError, match="request_id_header must be an HTTP header name"):
            SpendMiddleware(app, tracker=tracker, request_id_header=header)  # type: ignore[arg-type]


# -- budget refusals ---------------------------------------------------------------------------------


async def _over_budget(
    tracker_factory: Factory, url: str, **middleware: Any
) -> tuple[httpx.Response, Tracker]:
    tracker = await tracker_factory(url, budgets=[Budget.daily("0.01", mode="raise")])
    app = build_app(tracker, [Route("/", track_endpoint(tracker))], **middleware)
    async with client_for(app) as client:
        first = await client.get("/")
        assert first.status_code == 200
        response = await client.get("/")  # $0.012 > $0.01
    return response, tracker


async def test_budget_exceeded_in_endpoint_becomes_402_json(
    sqlite_url: str, tracker_factory: Factory
) -> None:
    """A BudgetExceeded escaping the endpoint is a 402 JSON with the exception's fields and Retry-After."""
    response, _ = await _over_budget(tracker_factory, sqlite_url)
    assert response.status_code == 402
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"] == "budget_exceeded"
    assert body["stage"] == "post"
    assert body["period"] == "day"
    assert body["scope"] is None
    assert Decimal(body["limit"]) == Decimal("0.01")
    assert Decimal(body["spent"]) == Decimal("0.012")
    assert Decimal(body["requested"]) == Decimal("0.006")
    start = datetime.fromisoformat(body["window_start"])
    end = datetime.fromisoformat(body["window_end"])
    assert start.utcoffset() is not None and end.utcoffset() is not None
    assert start <= datetime.now(UTC) < end
    retry_after = int(response.headers["retry-after"])
    assert 0 < retry_after <= 86_400
    assert body["retry_after"] == retry_after
    assert len(await ledger(sqlite_url)) == 2  # the crossing call is recorded


async def test_fastapi_app_turns_budget_exceeded_into_402(sqlite_url: str, tracker_factory: Factory) -> None:
    """With FastAPI and app.add_middleware(SpendMiddleware, ...), an over-budget endpoint answers 402."""
    from fastapi import FastAPI

    tracker = await tracker_factory(sqlite_url, budgets=[Budget.daily("0.01", per="user_id", mode="raise")])
    app = FastAPI()
    app.add_middleware(
        SpendMiddleware, tracker=tracker, tags=lambda request: {"user_id": request.headers["x-user"]}
    )

    @app.get("/chat")
    async def chat() -> dict[str, Any]:
        record = await tracker.track(**CALL)
        return {"cost": str(record.cost), "tags": dict(current_tags())}

    async with client_for(app) as client:
        ok = await client.get("/chat", headers={"x-user": "u1"})
        over = await client.get("/chat", headers={"x-user": "u1"})
    assert ok.status_code == 200
    assert Decimal(ok.json()["cost"]) == Decimal("0.006")
    assert ok.json()["tags"] == {"user_id": "u1"}
    assert over.status_code == 402
    assert over.json()["scope_value"] == "u1"
    assert int(over.headers["retry-after"]) > 0


async def test_budget_exceeded_in_a_task_group_becomes_402(sqlite_url: str, tracker_factory: Factory) -> None:
    """An endpoint that fans calls out in a TaskGroup gets an ExceptionGroup of BudgetExceeded: still a
    402 with the first one's fields. A group holding any other error stays the app's error (500)."""
    tracker = await tracker_factory(sqlite_url, budgets=[Budget.daily("0.01", mode="raise")])

    async def fan_out(request: Request) -> JSONResponse:
        async with asyncio.TaskGroup() as group:
            for _ in range(2):
                group.create_task(tracker.track(**CALL))
        return JSONResponse({})

    async def mixed(request: Request) -> JSONResponse:
        async def fail() -> None:
            raise ValueError("not a budget")

        async with asyncio.TaskGroup() as group:
            group.create_task(tracker.track(**CALL))
            group.create_task(fail())
        return JSONResponse({})

    app = build_app(tracker, [Route("/fan", fan_out), Route("/mixed", mixed)])
    async with client_for(app, raise_app_exceptions=False) as client:
        crossing = await client.get("/fan")  # the second call takes the day to $0.012: a group of one
        over = await client.get("/fan")  # both calls raise: a group of two
        mixed_response = await client.get("/mixed")
    for response in (crossing, over):
        assert response.status_code == 402
        assert response.json()["stage"] == "post" and response.json()["period"] == "day"
        assert int(response.headers["retry-after"]) > 0
    assert Decimal(over.json()["spent"]) in (Decimal("0.018"), Decimal("0.024"))
    assert mixed_response.status_code == 500
    assert len(await ledger(sqlite_url)) == 5


async def test_budget_exceeded_wrapped_by_an_sdk_becomes_402(
    sqlite_url: str, tracker_factory: Factory
) -> None:
    """An SDK that wraps the refusal in its own error (openai 2.x, anthropic: APIConnectionError with
    the BudgetExceeded as `__cause__`) still answers 402 when the endpoint lets it escape."""
    import anthropic

    from llm_spend.testing import FakeProviderTransport

    tracker = await tracker_factory(sqlite_url, budgets=[Budget.daily("0.000001", mode="block")])
    client = anthropic.AsyncAnthropic(
        api_key="test", max_retries=0, http_client=tracker.httpx_client(transport=FakeProviderTransport())
    )

    async def chat(request: Request) -> JSONResponse:
        await client.messages.create(
            model="claude-sonnet-4-5", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
        )
        return JSONResponse({})

    app = build_app(tracker, [Route("/chat", chat)])
    async with client_for(app) as http:
        response = await http.get("/chat")
    assert response.status_code == 402
    assert response.json()["stage"] == "preflight"
    assert await ledger(sqlite_url) == []


async def test_status_code_429(sqlite_url: str, tracker_factory: Factory) -> None:
    """status_code=429 answers budget refusals with 429 and Retry-After."""
    response, _ = await _over_budget(tracker_factory, sqlite_url, status_code=429)
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) > 0
    assert response.json()["error"] == "budget_exceeded"


async def test_per_call_budget_refusal_has_no_retry_after(sqlite_url: str, tracker_factory: Factory) -> None:
    """A per-call budget refusal (no window) is a 402 without a Retry-After header."""
    tracker = await tracker_factory(sqlite_url, budgets=[Budget.per_call("0.001", mode="raise")])
    app = build_app(tracker, [Route("/", track_endpoint(tracker))])
    async with client_for(app) as client:
        response = await client.get("/")
    assert response.status_code == 402
    assert "retry-after" not in response.headers
    assert response.json()["period"] == "call"
    assert response.json()["window_start"] is None


async def test_budget_exceeded_after_response_started_is_reraised(
    sqlite_url: str, tracker_factory: Factory
) -> None:
    """Once the response has started, a BudgetExceeded is re-raised, not turned into a 402."""
    tracker = await tracker_factory(sqlite_url, budgets=[Budget.daily("0.01", mode="raise")])
    chunks_sent: list[bytes] = []

    async def stream(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            chunks_sent.append(b"first")
            yield b"first"
            await tracker.track(**CALL)
            await tracker.track(**CALL)  # crosses: raises BudgetExceeded mid-stream
            yield b"never"

        return StreamingResponse(body(), media_type="text/plain")

    app = build_app(tracker, [Route("/", stream)])
    async with client_for(app) as client:
        with pytest.raises(BudgetExceeded) as info:
            await client.get("/")
    assert info.value.stage == "post"
    assert chunks_sent == [b"first"]
    assert len(await ledger(sqlite_url)) == 2


async def test_block_budget_known_exhausted_refuses_before_the_endpoint(
    db_url: str, tracker_factory: Factory
) -> None:
    """After a track() crossed a block-mode per-user budget, that user's next request is refused
    before the endpoint runs, while another user is still served."""
    tracker = await tracker_factory(db_url, budgets=[Budget.daily("0.01", per="user_id", mode="block")])
    runs: list[str] = []

    async def endpoint(request: Request) -> JSONResponse:
        runs.append(request.headers["x-user"])
        await tracker.track(**CALL)
        return JSONResponse({"ok": True})

    app = build_app(tracker, [Route("/", endpoint)])
    async with client_for(app) as client:
        assert (await client.get("/", headers={"x-user": "alice"})).status_code == 200
        crossed = await client.get("/", headers={"x-user": "alice"})
        assert crossed.status_code == 402
        assert crossed.json()["stage"] == "post"
        assert runs == ["alice", "alice"]

        refused = await client.get("/", headers={"x-user": "alice"})
        assert refused.status_code == 402
        assert runs == ["alice", "alice"]  # the endpoint did not run
        body = refused.json()
        assert body["stage"] == "preflight"
        assert (body["scope"], body["scope_value"]) == ("user_id", "alice")
        assert Decimal(body["spent"]) == Decimal("0.012")
        assert int(refused.headers["retry-after"]) > 0

        served = await client.get("/", headers={"x-user": "bob"})
        assert served.status_code == 200
        assert runs == ["alice", "alice", "bob"]
    assert len(await ledger(db_url)) == 3


async def test_preflight_false_lets_requests_reach_the_endpoint(
    sqlite_url: str, tracker_factory: Factory
) -> None:
    """With preflight=False the middleware does not refuse up front; the endpoint runs."""
    tracker = await tracker_factory(sqlite_url, budgets=[Budget.daily("0.01", mode="block")])
    runs: list[int] = []

    async def endpoint(request: Request) -> JSONResponse:
        runs.append(1)
        return JSONResponse({"ok": True})

    app = build_app(tracker, [Route("/", endpoint)], preflight=False)
    await tracker.track(**CALL)
    with pytest.raises(BudgetExceeded):
        await tracker.track(**CALL)
    async with client_for(app) as client:
        assert (await client.get("/")).status_code == 200
    assert runs == [1]


async def test_notify_budget_never_refuses_requests(sqlite_url: str, tracker_factory: Factory) -> None:
    """Crossing a notify-mode budget does not change any response."""
    seen: list[BudgetExceeded] = []
    tracker = await tracker_factory(sqlite_url, budgets=[Budget.daily("0.01")], on_exceeded=seen.append)
    app = build_app(tracker, [Route("/", track_endpoint(tracker))])
    async with client_for(app) as client:
        statuses = [(await client.get("/")).status_code for _ in range(4)]
    assert statuses == [200] * 4
    assert len(seen) == 1


# -- scope types and context hygiene ---------------------------------------------------------------------


def test_lifespan_and_websocket_pass_through(sqlite_url: str) -> None:
    """Under the middleware, the app's lifespan runs and a websocket endpoint works."""
    tracker = Tracker(sqlite_url)
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with tracker:
            events.append("startup")
            yield
            events.append("shutdown")

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        message = await websocket.receive_text()
        await websocket.send_text(f"echo:{message}:{dict(current_tags())}")
        await websocket.close()

    async def http(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = build_app(tracker, [WebSocketRoute("/ws", ws), Route("/", http)], lifespan=lifespan)
    with TestClient(app) as client:
        assert events == ["startup"]
        with client.websocket_connect("/ws") as websocket:
            websocket.send_text("hi")
            assert websocket.receive_text() == "echo:hi:{}"
        assert client.get("/").text == "ok"
    assert events == ["startup", "shutdown"]


async def test_context_is_reset_after_the_request_in_the_same_task(
    sqlite_url: str, tracker_factory: Factory
) -> None:
    """After a request returns (ok, 402 or error) current_tags() and the request id are back to empty."""
    tracker = await tracker_factory(sqlite_url, budgets=[Budget.daily("0.01", mode="raise")])

    async def fail(request: Request) -> PlainTextResponse:
        raise RuntimeError("endpoint failed")

    app = build_app(tracker, [Route("/", track_endpoint(tracker)), Route("/fail", fail)])
    async with client_for(app, raise_app_exceptions=False) as client:
        for path, status in [("/", 200), ("/", 402), ("/fail", 500)]:
            response = await client.get(path, headers={"x-user": "u1", "x-request-id": "rid"})
            assert response.status_code == status
            assert dict(current_tags()) == {}
            assert current_request_id() is None


async def test_context_is_reset_when_called_directly(sqlite_url: str, tracker_factory: Factory) -> None:
    """Calling the middleware as a plain ASGI app in this task leaves no tags or request id behind."""
    tracker = await tracker_factory(sqlite_url)
    seen: list[tuple[dict[str, str], str | None]] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append((dict(current_tags()), current_request_id()))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = SpendMiddleware(inner, tracker=tracker, tags=lambda request: {"user_id": "x"})
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": "/", "raw_path": b"/", "query_string": b"", "root_path": "",
        "headers": [(b"x-request-id", b"direct-1")], "server": ("t", 80), "client": ("c", 1),
    }  # fmt: skip
    with with_tags(outer="kept"):
        await middleware(scope, receive, send)
        assert dict(current_tags()) == {"outer": "kept"}
    assert seen == [({"outer": "kept", "user_id": "x"}, "direct-1")]
    assert sent[0]["status"] == 204
    assert dict(current_tags()) == {}
    assert current_request_id() is None
