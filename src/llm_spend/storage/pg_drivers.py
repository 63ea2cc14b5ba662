"""asyncpg's own connections, lent by the SQLAlchemy engine's pool, for the hot PostgreSQL writes.

The reservations and the ledger writes are single statements sent on the driver connection (see
pg_reserve and pg_write). Checking a connection out of SQLAlchemy's pool and back costs about as
much as a round trip on a slow machine, so each of those two streams of statements keeps one
connection checked out (a lane) while the store is open; anything else borrows one per use. A task
that made a lane's connection while another task was making it too (the writer and the spool's replay
after an outage) uses it once and gives it back.

A lane belongs to the event loop it was made on. Used after its loop stopped or closed (a store kept
from one loop to the next), it is ended (`_end_stranded`) and the new loop makes its own. (Used from
another loop while its own runs, in another thread, it is forgotten and the other loop makes its own:
SQLAlchemy's pool does not tell loops apart, so a store serves one running loop at a time.)

SQLAlchemy does not see what fails on a driver connection: one that broke (closed, cancelled
mid-statement, an error that is neither the server's answer nor a value refused before it was sent)
is invalidated here, so the pool replaces it instead of lending it again, and a lane holding it
takes a new one next time.

A lane's connection plans its hot statements once: its first use sets `plan_cache_mode =
force_generic_plan` on it (PostgreSQL 12 and later; a server that refuses the setting is left as
it is), and the lane resets it when it gives the connection back to the pool, or else ends the
connection. Left to choose (`auto`), PostgreSQL plans a prepared statement anew at each of its
first five executions, then keeps its generic plan only if that is estimated no dearer than the
custom ones were. For the ledger write, once the tables hold some thousands of rows, it often is
not, and the server then plans that statement, a dozen CTEs, again at every write; with its generic
plan a guarded call is faster, not slower (docs/performance.md, twenty-sixth session; decisions §18).
The setting is made as part of the lane's first work, so a connection found lost there is retried
as the work would be.

A server that restarted, or closed idle connections, leaves every connection of the pool dead, and
the first statement on each would fail. `run` therefore tries its work once more when the connection
turned out lost, after emptying the pool (`engine.dispose()`: what SQLAlchemy does itself when it
sees a disconnect), so that the second try gets a new connection. The work given to `run` must be
safe to repeat: the hot statements are (a ledger write inserts each call once by its event id and
releases each reservation once; a reservation that did commit before its answer was lost is made
again under the same id, which the database refuses: the call then fails instead of holding two).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = ["Drivers", "Work"]

logger = logging.getLogger("llm_spend")

_PLAN_ONCE = "SET plan_cache_mode = force_generic_plan"
_PLAN_AS_LENT = "RESET plan_cache_mode"
_RESET_WITHIN = 2.0
"""Seconds a lane's connection is given to reset before it is ended instead (a server that stopped
answering would hold the store's close otherwise)."""

T = TypeVar("T")
Work = Callable[[Any], Awaitable[T]]
"""What `Drivers.run` does with a driver connection."""


class _Lane:
    __slots__ = ("busy", "conn", "driver", "loop", "planned")

    def __init__(self, conn: AsyncConnection, driver: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.conn, self.driver, self.loop = conn, driver, loop
        self.busy = False
        self.planned: bool | None = None
        """Whether the connection plans its statements once (set at its first use; None before)."""


class Drivers:
    """Lends asyncpg connections of `engine`'s pool; `lend("name")` reuses that lane's connection."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._lanes: dict[str, _Lane] = {}

    @asynccontextmanager
    async def lend(self, lane: str | None = None) -> AsyncIterator[Any]:
        held = self._lanes.get(lane) if lane is not None else None
        loop = asyncio.get_running_loop()
        if held is not None and (held.loop is not loop or held.driver.is_closed()):
            await self._drop(lane, held)
            held = None
        if lane is not None and held is None:
            conn = await self._engine.connect()
            driver = (await conn.get_raw_connection()).driver_connection
            if lane in self._lanes:  # another task made the lane while this one connected: a loan
                try:
                    async with _invalidating(conn, driver):
                        yield driver
                finally:
                    await conn.close()
                return
            held = self._lanes[lane] = _Lane(conn, driver, loop)
        if held is None or held.busy:  # no lane asked for, or its connection is in use
            async with self._engine.connect() as conn:
                driver = (await conn.get_raw_connection()).driver_connection
                async with _invalidating(conn, driver):
                    yield driver
            return
        held.busy = True
        try:
            yield held.driver
        except BaseException as exc:
            await self._failed(lane, held, exc)
            raise
        finally:
            held.busy = False

    async def run(self, lane: str, work: Work[T]) -> T:
        """`await work(connection)` on the lane's connection; once more on a new connection when that
        one was lost (see the module docstring). A failure to connect at all is raised at once.

        The lane's own connection, free and alive, is used without `lend`'s two context managers
        (what they do on a failure, `_failed` does): this runs before every hot statement, and the
        Python between a lane's statements adds to every guarded call's wait (docs/performance.md)."""
        held = self._lanes.get(lane)
        if (
            held is not None
            and not held.busy
            and held.loop is asyncio.get_running_loop()
            and not held.driver.is_closed()
        ):
            held.busy = True
            try:
                if held.planned is None:
                    await _plan_once(held)
                return await work(held.driver)
            except BaseException as exc:
                await self._failed(lane, held, exc)
                if not isinstance(exc, Exception) or not _lost(exc, held.driver):
                    raise
                logger.warning("llm-spend: a PostgreSQL connection was lost (%s); trying on a new one", exc)
            finally:
                held.busy = False
            return await self._again(lane, work)
        lent: Any = None
        try:
            async with self.lend(lane) as conn:
                lent = conn
                await self._plan_lane(lane, conn)
                return await work(conn)
        except Exception as exc:
            if lent is None or not _lost(exc, lent):
                raise
            logger.warning("llm-spend: a PostgreSQL connection was lost (%s); trying on a new one", exc)
        return await self._again(lane, work)

    async def _again(self, lane: str, work: Work[T]) -> T:
        """The second try of `run`'s work, on a new connection of an emptied pool."""
        await self._engine.dispose()  # the pool's other connections are likely gone too
        async with self.lend(lane) as conn:
            await self._plan_lane(lane, conn)
            return await work(conn)

    async def _plan_lane(self, lane: str, conn: Any) -> None:
        """Plan once on `conn` if it is the lane's own connection, used for the first time."""
        held = self._lanes.get(lane)
        if held is not None and held.driver is conn and held.planned is None:
            await _plan_once(held)

    async def _failed(self, lane: str | None, held: _Lane, exc: BaseException) -> None:
        """What `lend` and `_invalidating` do when work on a lane's connection failed: a connection
        that broke is invalidated (the pool replaces it), and the lane lets it go."""
        if _broke(exc, held.driver):
            await asyncio.shield(held.conn.invalidate(exc if isinstance(exc, Exception) else None))
        if held.driver.is_closed() or held.conn.invalidated:
            await self._drop(lane, held)

    async def _drop(self, lane: str | None, held: _Lane) -> None:
        if lane is not None and self._lanes.get(lane) is held:
            del self._lanes[lane]
        if held.loop is asyncio.get_running_loop():
            if held.driver.is_closed() and not held.conn.invalidated:  # else the pool lends it again
                await held.conn.invalidate()
            elif held.planned and not held.conn.invalidated:
                await _reset(held)
            await held.conn.close()
        elif not held.loop.is_running():
            await _end_stranded(held)
        # else a loop running in another thread, the only one that could close it: it is forgotten

    async def close(self) -> None:
        """Give the lanes' connections back to the pool (before the engine is disposed). A lane of a
        loop that runs in another thread is left to that loop, which alone can close it."""
        loop = asyncio.get_running_loop()
        for lane, held in list(self._lanes.items()):
            if held.loop is not loop and held.loop.is_running():
                logger.warning(
                    "llm-spend: a PostgreSQL store closed on another event loop than the one its "
                    "connections belong to; close it on that loop"
                )
                continue
            await self._drop(lane, held)


async def _end_stranded(held: _Lane) -> None:
    """End a lane's connection whose event loop has stopped or closed (a store kept from one loop
    to the next, as a test suite whose loops end with each test does). Only that loop could close it
    cleanly: the connection is aborted here (asyncpg tells the server, which ends the session) and
    invalidated, so the pool forgets it now instead of warning when the garbage collector finds it
    checked out. Its socket is closed by its own loop if that runs again, else when nothing refers
    to it any more (with Python's ResourceWarning for a transport never closed)."""
    with contextlib.suppress(RuntimeError):  # "Event loop is closed": it is marked aborted all the same
        held.driver.terminate()
    await held.conn.invalidate()
    await held.conn.close()  # the Connection itself: invalidated, it does no I/O


async def _plan_once(held: _Lane) -> None:
    """Make the lane's connection plan its statements once, where the server can."""
    import asyncpg

    held.planned = False
    if held.driver.get_server_version().major < 12:  # no `plan_cache_mode`: planned as before
        return
    try:
        await held.driver.execute(_PLAN_ONCE)
    except asyncpg.PostgresError as exc:  # a server that speaks PostgreSQL but has no such setting
        logger.info(
            "llm-spend: the server refused plan_cache_mode (%s); statements are planned as it chooses", exc
        )
        return
    held.planned = True


async def _reset(held: _Lane) -> None:
    """Reset what `_plan_once` set before the lane's connection goes back to the pool; a connection
    that cannot be reset in time is ended instead (invalidated, so the pool forgets it), with no
    wait for a server that stopped answering."""
    try:
        await held.driver.execute(_PLAN_AS_LENT, timeout=_RESET_WITHIN)
    except BaseException as exc:
        with contextlib.suppress(RuntimeError):  # "Event loop is closed": aborted all the same
            held.driver.terminate()
        await asyncio.shield(held.conn.invalidate(exc if isinstance(exc, Exception) else None))
        if not isinstance(exc, Exception):  # cancelled: that goes on, once the connection is ended
            await held.conn.close()
            raise


def _lost(exc: Exception, driver: Any) -> bool:
    """Whether `exc` means the connection is gone (not the server's answer to the statement)."""
    import asyncpg

    if driver.is_closed() or isinstance(exc, OSError):
        return True
    if isinstance(exc, asyncpg.InterfaceError):  # a closed or confused connection, not bad arguments
        return not isinstance(exc, asyncpg.DataError)
    return isinstance(
        exc,
        (
            asyncpg.PostgresConnectionError,
            asyncpg.AdminShutdownError,
            asyncpg.CrashShutdownError,
            asyncpg.CannotConnectNowError,
        ),
    )


def _broke(exc: BaseException, driver: Any) -> bool:
    """Whether work that raised `exc` may have left the connection unusable: anything but the server's
    answer, or a value refused before anything was sent (asyncpg's encoding of an argument, or ours of
    a document: text or an integer no database stores)."""
    import asyncpg

    return driver.is_closed() or not isinstance(
        exc, (asyncpg.PostgresError, asyncpg.DataError, UnicodeError, OverflowError)
    )


@asynccontextmanager
async def _invalidating(conn: AsyncConnection, driver: Any) -> AsyncIterator[None]:
    try:
        yield
    except BaseException as exc:
        if _broke(exc, driver):
            await asyncio.shield(conn.invalidate(exc if isinstance(exc, Exception) else None))
        raise
