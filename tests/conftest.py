"""Shared fixtures: a fresh ledger database per test, on SQLite and on PostgreSQL.

PostgreSQL comes from LLM_SPEND_TEST_PG_URL, else the local server (127.0.0.1:5432, database
`test`) when it answers. Without a server the PostgreSQL cases skip and say why, unless
LLM_SPEND_REQUIRE_PG=1 (set by .ci/run), which turns a missing server into a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

PG_URL = os.environ.get("LLM_SPEND_TEST_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
REQUIRE_PG = os.environ.get("LLM_SPEND_REQUIRE_PG") == "1"


async def _pg_admin(sql: str) -> None:
    import asyncpg

    url = make_url(PG_URL)
    conn = await asyncpg.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        user=url.username or "postgres",
        password=url.password,
        database=url.database or "postgres",
        timeout=5,
    )
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _pg_unavailable() -> str | None:
    try:
        asyncio.run(_pg_admin("SELECT 1"))
    except Exception as exc:
        return f"PostgreSQL at {make_url(PG_URL).render_as_string(hide_password=True)} unavailable: {exc}"
    return None


_PG_PROBLEM: list[str | None] = []


def pg_problem() -> str | None:
    if not _PG_PROBLEM:
        _PG_PROBLEM.append(_pg_unavailable())
    return _PG_PROBLEM[0]


@pytest.fixture(autouse=True)
def _in_own_directory(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs in a directory of its own, so that a tracker's default spool
    (`./.llm_spend_spool/`, for a database that is not a SQLite file) is not left in the checkout."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A URL to a brand-new PostgreSQL database, dropped after the test."""
    problem = pg_problem()
    if problem:
        if REQUIRE_PG:
            pytest.fail(f"LLM_SPEND_REQUIRE_PG=1 but {problem}")
        pytest.skip(problem)
    name = f"llm_spend_t_{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def pg_sessions(url: str) -> int:
    """The server sessions open on the test's database, other than the one asking, once none is
    left or after 5 s: a session whose client went away ends in its server process, a moment later."""
    name = make_url(url).database
    sql = (
        f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        " AND backend_type = 'client backend'"
    )

    async def count() -> int:
        import asyncpg

        conn = await asyncpg.connect(make_url(url).set(drivername="postgresql").render_as_string(False))
        try:
            return int(await conn.fetchval(sql))
        finally:
            await conn.close()

    for _ in range(50):
        found = asyncio.run(count())
        if not found:
            break
        time.sleep(0.1)
    return found


@pytest.fixture(params=["sqlite", "postgresql"], ids=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """The same test against a SQLite file and a PostgreSQL database."""
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_url"
    url: str = request.getfixturevalue(fixture)
    return url


@pytest.fixture
async def tracker_factory() -> AsyncIterator[object]:
    """Build Trackers that are entered now and exited at teardown: `await tracker_factory(url, ...)`."""
    from llm_spend import Tracker

    entered: list[Tracker] = []

    async def make(url: str, **kwargs: object) -> Tracker:
        tracker = Tracker(url, **kwargs)  # type: ignore[arg-type]
        await tracker.__aenter__()
        entered.append(tracker)
        return tracker

    yield make
    for tracker in reversed(entered):
        await tracker.__aexit__(None, None, None)


@contextlib.contextmanager
def served(app: Any, **config: Any) -> Iterator[int]:
    """An ASGI app served by uvicorn on 127.0.0.1, on a free port (yielded), in a thread of its own."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


class FreezingProxy:
    """A TCP relay to the PostgreSQL server that can stop relaying (a server that stops answering,
    its connections left open)."""

    def __init__(self) -> None:
        self.frozen = asyncio.Event()
        self.pipes: list[asyncio.Task[None]] = []

    async def start(self, port: int) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = port
        return int(self.server.sockets[0].getsockname()[1])

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        to_reader, to_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.pipes += [asyncio.ensure_future(self._pipe(reader, to_writer)),
                       asyncio.ensure_future(self._pipe(to_reader, writer))]  # fmt: skip

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            if self.frozen.is_set():
                await asyncio.Event().wait()  # never relayed
            writer.write(data)

    async def close(self) -> None:
        for pipe in self.pipes:
            pipe.cancel()
        self.server.close()
