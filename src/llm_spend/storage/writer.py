"""Writer: group commit, retries, and the spool. One task writes everything pending in one transaction.

`await writer.submit(item)` returns after the transaction holding that item committed, with the
item's window totals; `submit` queues the item at once (it returns a future while the queue has
room), so a write is under way even before anybody awaits it. Under load the queue fills while a
transaction runs and the next transaction takes all of it (up to `max_batch`): one commit per call
caps out near 1,000 calls/s on SQLite; batches reach tens of thousands. The queue is bounded: when
it is full, callers wait.

When the database fails, a batch is retried with backoff; if it still fails, the writer enters an
outage: batches are tried once and spooled when they fail, so callers are not held up, and a probe
replays the spool in order once the database answers again. Nothing accepted is dropped, short of a
full spool, which is logged as an error with the number of calls lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from .spool import Spool
from .store import PendingWrite, Store, WindowKey

__all__ = ["SPOOLED", "Writer"]

logger = logging.getLogger("llm_spend")


def _data_error(exc: BaseException | None) -> bool:
    """Whether the database refused the data itself (DB-API DataError, text it cannot encode, an
    integer its driver cannot bind: SQLite's "Python int too large"), as opposed to failing
    (unreachable, locked, read-only, ...): following the chain of causes."""
    seen = 0
    while exc is not None and seen < 8:
        if any(cls.__name__ in ("DataError", "UnicodeError", "OverflowError") for cls in type(exc).__mro__):
            return True
        exc = getattr(exc, "orig", None) or exc.__cause__
        seen += 1
    return False


class _Spooled:
    def __repr__(self) -> str:
        return "SPOOLED"


SPOOLED = _Spooled()
"""The result of a submission that the database could not take now and that waits in the spool."""

Result = dict[WindowKey, int] | None | _Spooled
_RETRY_DELAYS = (0.05, 0.25, 1.0)
_PROBE_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Writer:
    """Batches submitted writes into transactions on one background task."""

    def __init__(
        self,
        store: Store,
        spool: Spool,
        *,
        max_batch: int = 500,
        max_queue: int = 10_000,
        abandoned: Callable[[PendingWrite, Result], object] | None = None,
    ) -> None:
        """`abandoned(item, result)` is called for a committed item whose caller stopped waiting
        (its future was cancelled), so what follows the write can still be done for it."""
        self._abandoned = abandoned
        self._store = store
        self._spool = spool
        self._database_id: str | None = None
        self._max_batch = max_batch
        self._queue: asyncio.Queue[tuple[PendingWrite, asyncio.Future[Result]] | None] = asyncio.Queue(
            max_queue
        )
        self._task: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None
        self._closing = False
        self._replaying = asyncio.Lock()
        self.outage = False
        self.unreplayed = False
        """Calls this writer spooled wait for the probe's replay."""
        self._failing = False
        """A batch's write failed and is being tried again (until it is written or spooled)."""
        self._settling_since: datetime | None = None
        self._wake = asyncio.Event()
        """Set when a write succeeds again: the probe replays at once, not after its backoff."""
        self._waiting = 0
        """Submissions waiting for room in the queue (they go in before the end of the queue)."""
        self._none_waiting = asyncio.Event()
        self._none_waiting.set()
        self._putting: set[asyncio.Future[None]] = set()
        """The tasks of those submissions (held here: the loop keeps only weak references)."""
        self.waits = 0
        """How many submissions found the queue full and waited (backpressure)."""
        self.spooled = 0
        """How many calls went to the spool because the database failed."""

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="llm-spend-writer")

    @property
    def database_id(self) -> str | None:
        """The database's identity once a write or a replay asked for it (spooled lines carry it)."""
        return self._database_id

    def submit(self, item: PendingWrite) -> Awaitable[Result]:
        """Queue `item`; the awaitable gives its result once its transaction committed."""
        if self._task is None or self._task.done():
            raise RuntimeError("the tracker is not running: use `async with tracker:` or its lifespan")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        if self._queue.full():
            self.waits += 1
            self._waiting += 1
            self._none_waiting.clear()
            # A task of its own puts the item in once there is room, whatever becomes of the caller
            # (cancelled while it waits, its call is still written, as any other; see `abandoned`).
            waiting = asyncio.ensure_future(self._wait_for_room(item, future))
            self._putting.add(waiting)
            waiting.add_done_callback(self._putting.discard)
            return future
        self._queue.put_nowait((item, future))
        return future

    async def _wait_for_room(self, item: PendingWrite, future: asyncio.Future[Result]) -> None:
        try:
            await self._queue.put((item, future))
        finally:
            self._waiting -= 1
            if not self._waiting:
                self._none_waiting.set()

    async def close(self, timeout: float) -> None:  # noqa: ASYNC109 - a drain deadline, not a cancel
        """Write what was submitted, within `timeout` seconds; what remains goes to the spool."""
        if self._task is None:
            return
        self._closing = True  # a batch written from now on starts no replay probe
        await self._stop_probe()
        before = self.spooled
        try:
            async with asyncio.timeout(timeout):  # a full queue counts against the deadline too
                await self._none_waiting.wait()  # the end comes after the calls waiting for room
                await self._queue.put(None)
                await asyncio.shield(self._task)
        except TimeoutError:
            self._task.cancel()  # its batch in flight goes to the spool
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            logger.warning("llm-spend: shutdown drain timed out after %.1f s", timeout)
        await self._to_spool(await self._leftovers())
        await self._stop_probe()  # one started while the drain ran, if any
        if self.spooled != before:
            logger.warning(
                "llm-spend: %d calls went to the spool %s at shutdown; the next start replays them",
                self.spooled - before, self._spool.path,
            )  # fmt: skip
        self._task = None

    async def _leftovers(self) -> list[tuple[PendingWrite, asyncio.Future[Result]]]:
        """Everything still queued, including submissions that were waiting for room in the queue."""
        left = []
        while True:
            while not self._queue.empty():
                entry = self._queue.get_nowait()  # and a waiting submission takes the room
                if entry is not None:
                    left.append(entry)
            await asyncio.sleep(0)  # let the woken submissions put their items
            if self._queue.empty():
                return left

    async def replay(self) -> int:
        """Write the spool's calls for this database, in order; returns how many were replayed."""
        async with self._replaying:
            done = 0
            database_id = await self._identity()  # first, so that lines spooled later carry it
            if not (await asyncio.to_thread(self._spool.backlog))[0]:
                return 0
            for path in await asyncio.to_thread(self._spool.claim):
                held = await asyncio.to_thread(self._spool.hold, path)
                if held is None:  # another process (sharing this spool) replays it
                    continue
                try:
                    done += await self._replay_file(path, database_id)
                finally:
                    os.close(held)
            if done:
                logger.warning("llm-spend: replayed %d spooled calls into the database", done)
            return done

    async def _replay_file(self, path: Path, database_id: str) -> int:
        done = 0
        items, foreign = await asyncio.to_thread(self._spool.read, path, database_id)
        for start in range(0, len(items), self._max_batch):
            done += await self._replay_chunk(items[start : start + self._max_batch])
        if foreign:  # never replayed into this database; kept for its own
            logger.error("llm-spend: %d spool lines in %s belong to another database", len(foreign), path)
            await asyncio.to_thread(self._spool.keep, path, foreign)
        else:
            await asyncio.to_thread(path.unlink)
        return done

    async def _replay_chunk(self, items: Sequence[PendingWrite]) -> int:
        """Write replayed items. Rows the database cannot store (a data error, such as text it refuses)
        are set aside, logged and kept in `<spool>.rejected`, so that they cannot hold back every call
        spooled after them. Any other failure means the database is failing: it raises."""
        try:
            await self._store.write(items)
            return len(items)
        except Exception as exc:
            if not _data_error(exc):
                raise
        refused = list(items)
        if len(items) > 1:  # find the refused rows, one by one
            refused = []
            for item in items:
                try:
                    await self._store.write([item])
                except Exception as exc:
                    if not _data_error(exc):
                        raise
                    refused.append(item)
        if refused:
            path = await asyncio.to_thread(self._spool.reject, refused)
            logger.error("llm-spend: the database refuses %d spooled calls; kept in %s", len(refused), path)
        return len(items) - len(refused)

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self._max_batch and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            await self._commit(batch)

    async def _commit(self, batch: Sequence[tuple[PendingWrite, asyncio.Future[Result]]]) -> None:
        try:
            await self._try_commit(batch)
        except asyncio.CancelledError:  # the shutdown deadline passed mid-batch: keep it in the spool
            # Every item of it, those whose caller stopped waiting too: the batch did not commit (or
            # its answer was lost; a replay then changes nothing twice).
            kept = self._spool.append_or_drop([item for item, _ in batch], self._database_id)
            self.spooled += kept
            for _, future in batch:
                if not future.done():
                    future.set_result(SPOOLED)
            raise

    async def _try_commit(self, batch: Sequence[tuple[PendingWrite, asyncio.Future[Result]]]) -> None:
        try:
            await self._commit_or_spool(batch)
        finally:
            self._failing = False  # retried no more: written, or spooled (then `unreplayed`)

    async def _commit_or_spool(self, batch: Sequence[tuple[PendingWrite, asyncio.Future[Result]]]) -> None:
        items = [item for item, _ in batch]
        delays = () if self.outage else _RETRY_DELAYS
        for attempt in range(len(delays) + 1):
            try:
                results = await self._store.write(items)
            except Exception as exc:
                self._failing = True
                self._settle_later()
                if attempt == len(delays):
                    logger.error("llm-spend: writing %d calls failed (%s); spooling them", len(items), exc)
                    await self._to_spool(batch)
                    self.enter_outage()
                    return
                logger.warning("llm-spend: writing %d calls failed (%s); retrying", len(items), exc)
                await asyncio.sleep(delays[attempt])
            else:
                for (item, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
                    elif future.cancelled() and self._abandoned is not None:
                        self._abandoned(item, result)
                if self.outage:
                    self.outage = False
                    self._start_probe()  # the database is back: replay what waited, now
                    self._wake.set()
                return

    async def _identity(self) -> str:
        """The database's id, read anew at every replay (a database dropped and created again at
        the same URL while this process ran has a new one, and gets none of the old one's calls);
        it raises while the database is unreachable."""
        found = await self._store.identity()
        if self._database_id is not None and found != self._database_id:
            logger.error(
                "llm-spend: the database at this URL is not the one this tracker started with (its id "
                "changed from %s to %s); calls spooled for the old one are kept, never written here",
                self._database_id, found,
            )  # fmt: skip
        self._database_id = found
        return found

    async def _to_spool(self, batch: Sequence[tuple[PendingWrite, asyncio.Future[Result]]]) -> int:
        if not batch:
            return 0
        # Written before this database's id could be read, a line is marked for this URL's database.
        owner = self._database_id
        kept = await asyncio.to_thread(self._spool.append_or_drop, [item for item, _ in batch], owner)
        self.spooled += kept
        self.unreplayed = self.unreplayed or kept > 0
        for _, future in batch:
            if not future.done():
                future.set_result(SPOOLED)
        return kept

    def sweep_before(self, now: datetime) -> datetime:
        """Until when expired reservations may be swept: now, or while calls are settling (their
        writes retried, or spooled for the probe's replay), the moment that began. Those settle
        their reservations, whose leases may have ended meanwhile, but were alive when the calls
        were recorded; a dead process's that expired before are freed all the same, however long
        a replay keeps failing."""
        if not (self._failing or self.unreplayed):
            self._settling_since = None
            return now
        return self._settling_since or now

    def _settle_later(self) -> None:
        """A write failed: settling begins now, unless it had begun already."""
        if self._settling_since is None:
            self._settling_since = datetime.now(UTC)

    def enter_outage(self) -> None:
        self.outage = True
        self.unreplayed = True  # at a start whose replay failed, too
        self._settle_later()
        self._start_probe()

    async def _stop_probe(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
            self._probe = None

    def _start_probe(self) -> None:
        if self._closing:
            return  # the spool is replayed at the next start
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._probe_until_replayed(), name="llm-spend-replay")

    async def _probe_until_replayed(self) -> None:
        for attempt in itertools.count():
            if attempt:
                with contextlib.suppress(TimeoutError):
                    delay = _PROBE_DELAYS[min(attempt, len(_PROBE_DELAYS)) - 1]
                    await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()  # a write that succeeds from now on wakes the next wait
            spooled = self.spooled
            try:
                await self.replay()
            except Exception as exc:
                logger.warning("llm-spend: the database is still failing (%s); calls wait in the spool", exc)
            else:
                if self.spooled != spooled:
                    continue  # calls were spooled while we replayed: replay them too
                self.outage = self.unreplayed = False  # what is left, if anything, is another database's
                return
