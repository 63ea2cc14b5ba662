"""Recorder: a call priced into a CallRecord, written to the ledger, then judged by the budgets.

While the tracker runs, a record goes to its writer (one transaction with its rollup increments and
its reservation's settlement), and once it is committed the budgets see what it took each window to:
``on_exceeded`` is called at a crossing, subscribers get the record, and a raise- or block-mode window
taken over its limit raises `BudgetExceeded(stage="post")`. A call recorded on another running event
loop is written and judged on the tracker's (`loops.hop`). A call recorded after the tracker closed,
or once its loop stopped, was billed all the same: it goes to the spool at once, for the next start.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import weakref
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from .context import current_request_id
from .exceptions import BudgetExceeded
from .guard import Guard
from .loops import Handoff, cut_off, receive, send
from .money import from_nanousd
from .pricing import Cost, Pricer
from .storage.spool import Spool
from .storage.store import PendingWrite
from .storage.writer import SPOOLED, Writer
from .usage import CallRecord, Usage, UsageSource, new_event_id

__all__ = ["Callback", "Recorder"]

logger = logging.getLogger("llm_spend")

Callback = Callable[[Any], Any]

BATCH: Mapping[str, Any] = {"batch": True}
"""A call recorded with service_tier "batch" is priced at batch rates."""


async def _call(callback: Callback, arg: Any, what: str) -> None:
    """Run a user callback (sync or async); its failure is logged, never raised. A CancelledError
    of its own (an await inside it that was cancelled) is a failure too; one that cancels this
    task goes on."""
    try:
        result = callback(arg)
        if inspect.isawaitable(result):
            await result
    except Exception:
        logger.exception("llm-spend: %s %r failed", what, callback)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise
        logger.exception("llm-spend: %s %r failed", what, callback)


class Recorder:
    """Builds, writes and judges the records of one tracker; the tracker attaches its writer while it
    runs (`attach`, `detach`)."""

    def __init__(
        self, pricer: Pricer, budget_guard: Guard, spool: Spool, on_exceeded: Callback | None
    ) -> None:
        self.pricer, self.budget_guard, self.spool = pricer, budget_guard, spool
        self.on_exceeded = on_exceeded
        self.subscribers: list[Callback] = []
        self.writer: Writer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        """The tracker's event loop while it is open; None once nothing may use its database."""
        self._closed: tuple[str | None] | None = None
        """Once the tracker closed: (the database's id, if known), for calls recorded after (spooled)."""
        self._background: set[asyncio.Task[None]] = set()
        """Budget checks of writes whose caller was cancelled while waiting (kept until they end)."""
        self.holding: weakref.WeakSet[Any] = weakref.WeakSet()
        """Guarded calls inside their block with a reservation: the tracker's exit waits for them
        (`Tracker.__aexit__`), as nothing of this process could settle them after it."""

    # -- where records go ---------------------------------------------------------------------------

    def attach(self, writer: Writer, loop: asyncio.AbstractEventLoop) -> None:
        """The tracker started on `loop`: records go to `writer`."""
        self.writer, self.loop, self._closed = writer, loop, None

    def detach(self) -> Writer | None:
        """The tracker is closing: records go to the spool from now on; returns the writer to close."""
        writer, self.writer = self.writer, None
        if writer is not None:
            self._closed = (writer.database_id,)
        return writer

    def never_started(self) -> bool:
        """Whether the tracker was never entered: a call would then be recorded nowhere (not even
        in the spool, which belongs to a database not yet known)."""
        return self.writer is None and self._closed is None

    def running_loop(self) -> asyncio.AbstractEventLoop | None:
        """The tracker's event loop while records go to its writer, else None."""
        return self.loop if self.writer is not None else None

    def abroad(self) -> asyncio.AbstractEventLoop | None:
        """The tracker's event loop when this runs on another one while the tracker is open and its
        loop runs: what needs the database is then handed to it (`loops.hop`). Else None."""
        loop = self.loop
        try:
            if asyncio.get_running_loop() is loop:  # first: what the tracker's own calls find
                return None
        except RuntimeError:
            return None
        if loop is None or self.writer is None or not loop.is_running() or cut_off():
            return None
        return loop

    def stranded(self) -> bool:
        """Whether the tracker is open but this runs where its database cannot be reached: on
        another loop while the tracker's is not running, or cut off from it (`loops.cut_off`)."""
        return self.writer is not None and not self.home() and self.abroad() is None

    def home(self) -> bool:
        """Whether this runs on the tracker's loop while the tracker is open: only then may it use
        the database (closed, or from a sync client's thread once the loop stopped, it may not)."""
        try:
            return self.loop is not None and asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    # -- recording ----------------------------------------------------------------------------------

    def build(
        self,
        *,
        provider: str,
        model: str,
        usage: Usage | None,
        usage_source: UsageSource,
        tags: Mapping[str, str],
        occurred_at: datetime | None = None,
        stream: bool = False,
        latency_ms: int | None = None,
        service_tier: str | None = None,
        provider_response_id: str | None = None,
        event_id: str | None = None,
    ) -> CallRecord:
        """The record of a call, priced (usage None: billed, but its usage is unknown, never $0).
        `event_id`: a guarded call's is its reservation's id (new, and made at the same instant
        as its `occurred_at`); else a new one."""
        at = occurred_at or datetime.now(UTC)
        if usage is None:
            cost = Cost(None, None, "unknown_usage", None, None)
            usage, usage_source = Usage(), "unknown"
        else:
            cost = self.pricer.price(
                provider,
                model,
                usage,
                at=at,
                **BATCH if service_tier == "batch" else {"service_tier": service_tier},
            )
        return CallRecord(
            event_id=event_id or new_event_id(),
            occurred_at=at,
            provider=provider,
            model=model,
            usage=usage,
            cost=None if cost.nanousd is None else from_nanousd(cost.nanousd),  # as stored, to the nano-USD
            cost_nanousd=cost.nanousd,
            pricing_status=cost.status,
            price_source=cost.source,
            usage_source=usage_source,
            stream=stream,
            latency_ms=latency_ms,
            service_tier=service_tier,
            provider_response_id=provider_response_id,
            request_id=current_request_id(),
            tags=tags,
        )

    async def record(self, record: CallRecord) -> CallRecord:
        """Write a record, then apply the budgets: notify crossings, raise for raise/block modes."""
        return await self.recorded(record, self.submit(record))

    def submit(self, record: CallRecord, reserved: int | None = None, **settle: Any) -> Awaitable[Any]:
        """Queue the record's write (with its reservation's settlement); it is under way on return.
        On another running loop, the record is handed to the tracker's at once, to be written and
        judged there (`reserved`: as `recorded` takes it), and `recorded` awaits that."""
        writer = self.writer
        if writer is None or asyncio.get_running_loop() is not self.loop:
            if (loop := self.abroad()) is not None:
                return _Abroad(send(loop, self._recorded_home(record, settle, reserved)))
            return self._late(self._item(record, settle))
        windows = self.budget_guard.windows(record.tags, record.occurred_at)
        return writer.submit(PendingWrite(record, windows, **settle))

    def _item(self, record: CallRecord, settle: Mapping[str, Any]) -> PendingWrite:
        return PendingWrite(record, self.budget_guard.windows(record.tags, record.occurred_at), **settle)

    def _late(self, item: PendingWrite) -> Awaitable[Any]:
        """A call recorded after the tracker closed (a guard or stream still open at shutdown), or off
        its loop (a sync client's thread, once the loop stopped): it was billed, so it is appended to
        the spool at once, where nothing can cancel it (a blocking append: this happens at shutdown),
        and written, its reservation settled, at the next start."""
        writer, closed = self.writer, self._closed
        if writer is not None:
            database_id, why = writer.database_id, "off the tracker's event loop"
        elif closed is not None:
            database_id, why = closed[0], "after the tracker closed"
        else:
            raise RuntimeError("the tracker is not running: use `async with tracker:` or its lifespan")
        written: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        kept = self.spool.append_or_drop([item], database_id)
        if kept:
            logger.warning(
                "llm-spend: a %s/%s call was recorded %s; spooled to %s for the next start",
                item.record.provider, item.record.model, why, self.spool.path,
            )  # fmt: skip
        written.set_result(SPOOLED if kept else None)
        return written

    async def recorded(
        self, record: CallRecord, written: Awaitable[Any], reserved: int | None = None
    ) -> CallRecord:
        """Wait for a queued write, then apply the budgets: notify crossings, hand the record to
        subscribers, raise for raise/block modes (`reserved`: what a guarded call reserved in its
        block-mode windows). (A caller cancelled while it waits leaves that to `abandoned`, so a
        crossing it made is still noticed and notified.) A record made on another running loop is
        written, judged and handed to the callbacks on the tracker's loop."""
        if type(written) is _Abroad:
            made: CallRecord = await receive(written.handoff)
            return made
        to_raise, to_notify = self._judge(record, await written, reserved)
        if (to_notify and self.on_exceeded is not None) or self.subscribers:
            await self._callbacks(record, to_notify)
        if to_raise is not None:
            raise to_raise
        return record

    async def _recorded_home(
        self, record: CallRecord, settle: Mapping[str, Any], reserved: int | None
    ) -> CallRecord:
        """`recorded` for a record made on another loop, on the tracker's; or spooled, where
        `loops.hop` runs it on the other loop, cut off (the tracker's stopped, or did not take it)."""
        return await self.recorded(record, self.submit(record, **settle), reserved)

    def abandoned(self, item: PendingWrite, spent_after: Any) -> None:
        """The writer committed a record whose caller stopped waiting: its crossings are still
        notified, and subscribers still get it."""
        _, to_notify = self._judge(item.record, spent_after)
        if (to_notify and self.on_exceeded is not None) or self.subscribers:
            task = asyncio.ensure_future(self._callbacks(item.record, to_notify))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _judge(
        self, record: CallRecord, spent_after: Any, reserved: int | None = None
    ) -> tuple[BudgetExceeded | None, list[Any]]:
        if spent_after is None or spent_after is SPOOLED:
            return None, []  # already recorded under this event_id, or waiting in the spool for replay
        assert isinstance(spent_after, dict)
        guard = self.budget_guard
        return guard.after(record.tags, record.occurred_at, record.cost_nanousd, spent_after, reserved)

    async def _callbacks(self, record: CallRecord, to_notify: list[BudgetExceeded]) -> None:
        if self.on_exceeded is not None:
            for crossing in to_notify:
                await _call(self.on_exceeded, crossing, "on_exceeded callback")
        for subscriber in tuple(self.subscribers):
            await _call(subscriber, record, "subscriber")


class _Abroad:
    """The write of a record made on another running loop, handed to the tracker's."""

    __slots__ = ("handoff",)

    def __init__(self, handoff: Handoff) -> None:
        self.handoff = handoff

    def __await__(self) -> Any:  # never awaited: `recorded` hands it to the tracker's loop
        raise RuntimeError("a record made on another event loop is awaited through Recorder.recorded")
