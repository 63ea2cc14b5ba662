"""asyncpg's own connections, lent by the SQLAlchemy engine's pool, for the hot PostgreSQL writes.

The reservations and the ledger writes are single statements sent on the driver connection (see
pg_reserve and pg_write). Checking a connection out of SQLAlchemy's pool and back costs about as
much as a round trip on a slow machine, so each of those two streams of statements keeps one
connection checked out (a lane) while the store is open; anything else borrows one per use.

SQLAlchemy does not see what fails on a driver connection: one that broke (closed, cancelled
mid-statement, an error that is not the server's answer) is invalidated here, so the pool replaces
it instead of lending it again, and a lane holding it takes a new one next time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = ["Drivers"]


class _Lane:
    __slots__ = ("busy", "conn", "driver", "loop")

    def __init__(self, conn: AsyncConnection, driver: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.conn, self.driver, self.loop = conn, driver, loop
        self.busy = False


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
            held = self._lanes[lane] = _Lane(conn, (await conn.get_raw_connection()).driver_connection, loop)
        if held is None or held.busy:  # no lane asked for, or its connection is in use
            async with self._engine.connect() as conn:
                driver = (await conn.get_raw_connection()).driver_connection
                async with _invalidating(conn, driver):
                    yield driver
            return
        held.busy = True
        try:
            async with _invalidating(held.conn, held.driver):
                yield held.driver
        except BaseException:
            if held.driver.is_closed() or held.conn.invalidated:
                await self._drop(lane, held)
            raise
        finally:
            held.busy = False

    async def _drop(self, lane: str | None, held: _Lane) -> None:
        if lane is not None and self._lanes.get(lane) is held:
            del self._lanes[lane]
        if held.loop is asyncio.get_running_loop():
            if held.driver.is_closed() and not held.conn.invalidated:  # else the pool lends it again
                await held.conn.invalidate()
            await held.conn.close()

    async def close(self) -> None:
        """Give the lanes' connections back to the pool (before the engine is disposed)."""
        for lane, held in list(self._lanes.items()):
            await self._drop(lane, held)


@asynccontextmanager
async def _invalidating(conn: AsyncConnection, driver: Any) -> AsyncIterator[None]:
    import asyncpg

    try:
        yield
    except BaseException as exc:
        if driver.is_closed() or not isinstance(exc, asyncpg.PostgresError):
            await asyncio.shield(conn.invalidate(exc if isinstance(exc, Exception) else None))
        raise
