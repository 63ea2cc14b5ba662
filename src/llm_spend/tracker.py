"""Tracker: the composition root and the public async API.

It wires pricing, storage, budgets and capture together, and holds no provider parsing and no SQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from types import MappingProxyType, TracebackType
from typing import Any, Final, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy.exc import DBAPIError

from . import capture
from .budgets import Budget, resolve_rules, watched
from .capture.base import MEDIA_ALLOWANCE
from .capture.manual import ManualStream
from .capture.options import CaptureOptions
from .context import current_tags, merge_tags, normalize_tags
from .exceptions import BudgetExceeded, StorageError
from .guard import Guard, Reservation
from .guarded import GuardedCall, Guarding
from .health import Health, check_health
from .loops import hop
from .pricing import Pricer
from .recorder import Callback, Recorder
from .reports import BudgetStatus, ReportRow, budget_status, report
from .reserving import Reserver
from .storage.spool import Spool, default_spool_path, url_key
from .storage.store import Store
from .storage.writer import Writer
from .usage import CallRecord, Usage, check_latency, check_optional_text, check_text, check_tokens

__all__ = ["Tracker"]

logger = logging.getLogger("llm_spend")

_T = TypeVar("_T")


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ValueError(
            f"timezone must be an IANA time zone name such as 'Europe/Paris', got {name!r}"
        ) from None


_MAX_SECONDS: Final = 30 * 86400
"""Of `reservation_ttl`, `sweep_interval` and `shutdown_timeout`: 30 days."""


async def _to_the_end(work: Coroutine[Any, Any, None], grace: float) -> None:
    """Run `work` in a task of its own and wait until it ended, however often this task is cancelled
    meanwhile (anyio's cancel scopes cancel it again on every loop turn): the cancellation is raised
    once it ended. Each step of `work` is bounded; as a last resort, `grace` seconds after the first
    cancellation `work` is cancelled and left to end by itself."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    cancelled: asyncio.CancelledError | None = None
    until: float | None = None
    while not task.done():
        try:
            await asyncio.wait({task}, timeout=None if until is None else max(until - loop.time(), 0))
        except asyncio.CancelledError as exc:  # asyncio.wait leaves `task` running
            cancelled = exc
            until = loop.time() + grace if until is None else until
        if until is not None and loop.time() >= until and not task.done():
            logger.error("llm-spend: closing the tracker went on %.1f s after a cancel; given up", grace)
            task.add_done_callback(lambda done: done.cancelled() or done.exception())
            task.cancel()
            break
    if cancelled is None:
        task.result()
        return
    if task.done() and not task.cancelled() and (error := task.exception()) is not None:
        logger.error("llm-spend: closing the tracker failed: %s", error, exc_info=error)
    raise cancelled


def _check_spool_path(path: object) -> None:
    """A spool path names a file: replay renames it aside, which must never move a directory."""
    if not isinstance(path, str | os.PathLike) or not os.fspath(path) or "\x00" in str(os.fspath(path)):
        raise ValueError(f"spool_path must be the path of a file, got {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"spool_path must be the path of a file, not of a directory: {os.fspath(path)!r}")


def _callable(name: str, value: Callback | None) -> Callback | None:
    if value is not None and not callable(value):
        raise ValueError(f"{name} must be callable, got {value!r}")
    return value


class Tracker:
    """Records LLM calls into your database and enforces budgets. Enter it before use."""

    def __init__(
        self,
        url: str = "sqlite+aiosqlite:///llm_spend.db",
        *,
        budgets: Sequence[Budget] = (),
        mode: str = "notify",
        timezone: str = "UTC",
        on_exceeded: Callback | None = None,
        auto_migrate: bool = True,
        unknown_price: str = "refuse",
        on_storage_error: str = "fail_closed",
        spool_path: str | os.PathLike[str] | None = None,
        shutdown_timeout: float = 10.0,
        reservation_ttl: float = 600.0,
        sweep_interval: float = 60.0,
        max_batch: int = 500,
        max_queue: int = 10_000,
        providers: Mapping[str, str] | None = None,
        include_stream_usage: bool = True,
        media_allowance_tokens: int = MEDIA_ALLOWANCE,
        clamp_max_tokens: bool = False,
        clamp_min_output_tokens: int = 256,
        default_max_output_tokens: int | None = None,
        price_overrides: Mapping[str, Mapping[str, object]] | None = None,
        prices_file: str | os.PathLike[str] | None = None,
        fallback_price: Mapping[str, object] | None = None,
    ) -> None:
        _callable("on_exceeded", on_exceeded)
        for name, number in (("max_batch", max_batch), ("max_queue", max_queue)):
            if not isinstance(number, int) or isinstance(number, bool) or number < 1:
                raise ValueError(f"{name} must be a positive integer, got {number!r}")
        for name, flag in (("auto_migrate", auto_migrate), ("clamp_max_tokens", clamp_max_tokens)):
            if not isinstance(flag, int) or flag not in (0, 1):  # a bool, or 0 / 1; never "false"
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        if unknown_price not in ("refuse", "allow"):
            raise ValueError(f"unknown_price must be 'refuse' or 'allow', got {unknown_price!r}")
        if on_storage_error not in ("fail_closed", "fail_open"):
            raise ValueError(
                f"on_storage_error must be 'fail_closed' or 'fail_open', got {on_storage_error!r}"
            )
        for name, seconds, least in (
            ("reservation_ttl", reservation_ttl, 1.0),  # shorter, a lease could end before its call began
            ("sweep_interval", sweep_interval, 0.1),
            ("shutdown_timeout", shutdown_timeout, 0.0),
        ):
            number = isinstance(seconds, int | float) and not isinstance(seconds, bool)
            if not number or not least <= seconds <= _MAX_SECONDS or seconds <= 0:
                raise ValueError(
                    f"{name} must be a number of seconds above 0, from {least:g} to {_MAX_SECONDS:,}, "
                    f"got {seconds!r}"
                )
        for name, tokens in (
            ("clamp_min_output_tokens", clamp_min_output_tokens),
            ("default_max_output_tokens", default_max_output_tokens),
        ):
            if tokens is not None and check_tokens(name, tokens) < 1:
                raise ValueError(f"{name} must be at least 1, got {tokens}")
        if spool_path is not None:
            _check_spool_path(spool_path)
        if prices_file is not None and not isinstance(prices_file, str | os.PathLike):
            raise ValueError(f"prices_file must be a path, got {prices_file!r}")
        self.url = url
        self.timezone = _zone(timezone)
        self.auto_migrate = bool(auto_migrate)
        self.lease = timedelta(seconds=reservation_ttl)
        self.sweep_interval = float(sweep_interval)
        self.shutdown_timeout = float(shutdown_timeout)
        self.capture = CaptureOptions(
            providers=providers,
            include_stream_usage=include_stream_usage,
            media_allowance_tokens=media_allowance_tokens,
            lease_renewal=min(60.0, reservation_ttl / 2),  # renewed well before the lease ends
        )
        rules = resolve_rules(budgets, mode)
        self.store = Store(url, watch=watched(rules))
        self.spool = Spool(
            spool_path if spool_path is not None else default_spool_path(self.store), url_key=url_key(url)
        )
        self.pricer = Pricer(
            price_overrides=price_overrides, prices_file=prices_file, fallback_price=fallback_price
        )
        self.budget_guard = Guard(rules, tz=self.timezone, store=self.store)
        self._reserver = Reserver(
            self.budget_guard,
            self.pricer,
            lease=self.lease,
            unknown_price=unknown_price,
            on_storage_error=on_storage_error,
            clamp_max_tokens=bool(clamp_max_tokens),
            clamp_min_output_tokens=clamp_min_output_tokens,
            default_max_output_tokens=default_max_output_tokens,
        )
        self._recorder = Recorder(self.pricer, self.budget_guard, self.spool, on_exceeded)
        self._sweeper: asyncio.Task[None] | None = None
        self._max_batch, self._max_queue = max_batch, max_queue
        self._entered = 0
        self._lifecycles: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}
        """Held while the tracker starts or stops: tasks entering it together start it once (one
        lock per event loop, as a lock belongs to one: a tracker may be entered again under another
        `asyncio.run`)."""

    @property
    def budgets(self) -> tuple[Budget, ...]:
        return tuple(rule.budget for rule in self.budget_guard.rules)

    @property
    def on_exceeded(self) -> Callback | None:
        """Called with each `BudgetExceeded` of a window crossing; may be replaced at any time."""
        return self._recorder.on_exceeded

    @on_exceeded.setter
    def on_exceeded(self, callback: Callback | None) -> None:
        self._recorder.on_exceeded = _callable("on_exceeded", callback)

    # -- lifecycle ----------------------------------------------------------------------------------

    async def __aenter__(self) -> Tracker:
        async with self._lifecycle():
            if self._entered == 0:
                await self._start()
            self._entered += 1
        return self

    def _lifecycle(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        lock = self._lifecycles.get(loop)
        if lock is None:
            self._lifecycles = {loop: (lock := asyncio.Lock())}  # the lock of a loop gone is dropped
        return lock

    def _check_folder(self) -> None:
        """The SQLite file's folder exists (checked at the start, not when built: an app may make
        the folder in between, in its lifespan)."""
        folder = None if self.store.path is None else os.path.dirname(self.store.path) or "."
        if folder is not None and not os.path.isdir(folder):
            raise ValueError(f"url: the folder of the SQLite database file, {folder!r}, does not exist")

    async def _start(self) -> None:
        """Migrate, replay the spool, sweep, and start the writer and the sweeper (first entry)."""
        self._check_folder()
        if self.auto_migrate:
            await self.store.migrate()
        writer = Writer(
            self.store,
            self.spool,
            max_batch=self._max_batch,
            max_queue=self._max_queue,
            abandoned=self._recorder.abandoned,
        )
        replayed = True
        try:
            await writer.replay()  # calls spooled during an outage or by a killed process
        except Exception as exc:
            replayed = False
            logger.warning("llm-spend: replaying the spool %s failed: %s", self.spool.path, exc)
        if replayed:  # else what the spool holds may settle reservations a sweep would free
            await self._sweep()
            try:
                await self.store.warm()
            except Exception as exc:  # the database failing now is the writer's to handle
                logger.warning("llm-spend: preparing the database's statements failed: %s", exc)
        writer.start()
        if not replayed:
            writer.enter_outage()  # the probe replays the spool once the database answers
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="llm-spend-sweeper")
        self._recorder.attach(writer, asyncio.get_running_loop())

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        async with self._lifecycle():
            self._entered -= 1
            if self._entered == 0 and self._recorder.writer is not None:
                try:
                    await self._outstanding()
                finally:  # cancelled while waiting, it closes all the same
                    await _to_the_end(self._close(), grace=4 * self.shutdown_timeout + 1)

    async def _outstanding(self) -> None:
        """Wait, up to `shutdown_timeout`, for guarded calls still out with a reservation, to settle
        them here rather than from the spool when this process next starts (another's sweep may
        have freed their room by then): calls of tasks, and sync clients' calls in their threads.
        Not for a call of this very task, or of a task that has ended (a stream never closed): they
        cannot end now. Polled: they may end on other threads or loops, which an asyncio.Event
        cannot hear."""
        me = asyncio.current_task()

        def out() -> list[GuardedCall]:
            return [
                c
                for c in list(self._recorder.holding)
                if c.task is None or (c.task is not me and not c.task.done())
            ]

        if not (calls := out()):
            return
        logger.warning(
            "llm-spend: waiting up to %s s for %d guarded calls still out", self.shutdown_timeout, len(calls)
        )
        deadline = time.monotonic() + self.shutdown_timeout
        while out() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    async def _close(self) -> None:
        """Stop the sweeper, drain the writer, close the store (the last exit)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        # Releases and records of calls whose callers stopped waiting for them (cancelled again).
        if leaving := self.budget_guard.leaving:
            await asyncio.wait(set(leaving), timeout=self.shutdown_timeout)
        writer = self._recorder.detach()  # a call recorded from now on goes to the spool
        assert writer is not None
        try:
            await writer.close(self.shutdown_timeout)
        finally:
            self._recorder.loop = None  # from now on nothing releases or renews in the database
        try:
            async with asyncio.timeout(self.shutdown_timeout):
                await self.store.close()
        except TimeoutError:  # a server that stopped answering: its connections are left to the end
            logger.warning(
                "llm-spend: the database's connections did not close within %.1f s; left open",
                self.shutdown_timeout,
            )

    async def _sweep_forever(self) -> None:
        """Release expired reservations (of processes that died, or held until their windows
        ended) every `sweep_interval` seconds; not while calls this process spooled wait for
        replay, which settles their reservations (an outage longer than a lease would otherwise
        free them, and their windows' room twice)."""
        while True:
            await asyncio.sleep(self.sweep_interval)
            writer, now = self._recorder.writer, datetime.now(UTC)
            await self._sweep(now if writer is None else writer.sweep_before(now))

    async def _sweep(self, before: datetime | None = None) -> None:
        try:
            released = await self.store.sweep(datetime.now(UTC) if before is None else before)
        except Exception as exc:  # e.g. auto_migrate=False and no schema yet: not fatal
            logger.warning("llm-spend: sweeping expired reservations failed: %s", exc)
        else:
            if released:
                logger.warning(
                    "llm-spend: released %d expired reservations (of calls whose process ended before"
                    " settling them, or estimates of calls of unknown cost held until their windows ended)",
                    released,
                )

    @asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """For `FastAPI(lifespan=tracker.lifespan)` / `Starlette(lifespan=...)`."""
        async with self:
            yield

    async def migrate(self) -> None:
        """Bring the database schema to the newest migration (idempotent)."""
        if self._recorder.writer is None:
            await self._unopened(Store.migrate)
        else:
            await self.store.migrate()

    @property
    def outage(self) -> bool:
        """The database failed and calls go to the spool until it answers again."""
        writer = self._recorder.writer
        return writer is not None and writer.outage

    @property
    def backpressure_waits(self) -> int:
        """How many track() calls found the write queue full and waited."""
        writer = self._recorder.writer
        return writer.waits if writer is not None else 0

    # -- recording ----------------------------------------------------------------------------------

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        """Call `callback(record)` (sync or async) after each call is committed; returns an unsubscribe."""
        if not callable(callback):
            raise ValueError(f"callback must be callable, got {callback!r}")
        subscribers = self._recorder.subscribers
        subscribers.append(callback)

        removed = False

        def unsubscribe() -> None:  # this subscription; called again, nothing
            nonlocal removed
            if not removed:
                removed = True
                with contextlib.suppress(ValueError):
                    subscribers.remove(callback)

        return unsubscribe

    async def track(
        self,
        *,
        provider: str,
        model: str,
        input_tokens: int,
        output_tokens: int,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        cache_write_1h_tokens: int = 0,
        reasoning_tokens: int = 0,
        latency_ms: int | None = None,
        service_tier: str | None = None,
        batch: bool = False,
        provider_response_id: str | None = None,
        tags: Mapping[str, object] | None = None,
    ) -> CallRecord:
        """Record one call after the fact and return its CallRecord (cost None if the price is unknown).

        Raises ValueError naming the field for invalid input (nothing is recorded), and
        BudgetExceeded(stage="post") when the call takes a raise- or block-mode window over its limit.
        """
        usage = Usage(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cache_read_tokens=cache_read_tokens,
            cache_write_tokens=cache_write_tokens,
            cache_write_1h_tokens=cache_write_1h_tokens,
            reasoning_tokens=reasoning_tokens,
        )
        if type(batch) is not bool:
            raise ValueError(f"batch must be True or False, got {batch!r}")
        service_tier = check_optional_text("service_tier", service_tier, 64)
        if batch and service_tier not in (None, "batch"):
            raise ValueError(f"batch=True contradicts service_tier={service_tier!r}")
        record = self._recorder.build(
            provider=check_text("provider", provider, 64),
            model=check_text("model", model, 200),
            usage=usage,
            usage_source="manual",
            latency_ms=check_latency(latency_ms),
            service_tier="batch" if batch else service_tier,
            provider_response_id=check_optional_text("provider_response_id", provider_response_id, 200),
            tags=self._tags(tags),
        )
        return await self._recorder.record(record)

    @asynccontextmanager
    async def track_stream(
        self, *, provider: str, model: str, tags: Mapping[str, object] | None = None
    ) -> AsyncIterator[ManualStream]:
        """Record a stream you read yourself: ``async with tracker.track_stream(...) as s:`` then
        ``s.event(chunk_dict)`` per provider event, or ``s.usage(...)`` with the totals.

        Recorded once on exit. When the block raises, the call is still recorded (tagged
        ``stream_errored``, a 51st tag if need be) and the error propagates; without usage it is stored as
        unknown usage.
        """
        provider, model = check_text("provider", provider, 64), check_text("model", model, 200)
        merged = self._tags(tags)
        at, started = datetime.now(UTC), time.monotonic()
        stream = ManualStream(provider)
        errored = False
        try:
            yield stream
        except BaseException:
            errored = True
            raise
        finally:
            outcome, given = stream.outcome()
            record = self._recorder.build(
                provider=provider,
                model=outcome.model or model,
                usage=outcome.usage,
                usage_source="manual" if given else "stream",
                tags=MappingProxyType({**merged, "stream_errored": "true"}) if errored else merged,
                occurred_at=at,
                stream=True,
                latency_ms=int((time.monotonic() - started) * 1000),
                service_tier=outcome.service_tier,
                provider_response_id=outcome.response_id,
            )
            recording = asyncio.ensure_future(self._recorder.record(record))
            if errored:  # the block's own error wins; a budget crossing is still recorded
                with contextlib.suppress(BudgetExceeded):
                    await asyncio.shield(recording)
            else:
                await asyncio.shield(recording)

    def _tags(self, tags: Mapping[str, object] | None) -> Mapping[str, str]:
        """Explicit tags over the context's (with_tags over the middleware's)."""
        return current_tags() if tags is None else merge_tags(current_tags(), normalize_tags(tags))

    async def _read(self, reading: Callable[[Store], Coroutine[Any, Any, _T]]) -> _T:
        """`reading(store)`. Made on another running loop, it is made on the tracker's, which holds
        the connections (a PostgreSQL connection serves the loop that made it); RuntimeError if
        that loop is not running, stops before the read, or does not take it in time. StorageError
        when the database has not the schema to read (`auto_migrate=False`, never migrated)."""
        try:
            return await self._read_once(reading)
        except DBAPIError as exc:
            why = await self._read_once(Store.missing_schema)
            if why is None:
                raise
            raise StorageError(f"{why}: run `llm-spend db upgrade` or `await tracker.migrate()`") from exc

    async def _read_once(self, reading: Callable[[Store], Coroutine[Any, Any, _T]]) -> _T:
        if self._recorder.writer is None:
            return await self._unopened(reading)
        loop = self._recorder.abroad()
        if loop is not None:
            read: _T = await hop(loop, reading(self.store), here=False)
            return read
        if self._recorder.stranded():
            raise RuntimeError(
                "llm-spend: the tracker's database cannot be read on this event loop while the "
                "tracker's own is not running"
            )
        return await reading(self.store)

    async def _unopened(self, work: Callable[[Store], Coroutine[Any, Any, _T]]) -> _T:
        """Database work while the tracker is not open (a read, a migration), on a store of its own
        that is closed after it: the tracker's belongs to its lifetime, which may begin meanwhile,
        on another loop, and a PostgreSQL connection left in a pool outlives its event loop. A
        database in memory is the tracker's store's own connection: it is used as it is."""
        if self.store.dialect == "sqlite" and self.store.path is None:
            return await work(self.store)
        store = Store(self.url)
        try:
            return await work(store)
        finally:
            await store.close()

    # -- health -------------------------------------------------------------------------------------

    async def health(self, *, database_timeout: float = 5.0) -> Health:
        """Schema revision, database reachability, spool backlog, reservations outstanding, unknown
        models in the last day, and whether each budget is enforced now. Never raises for a down
        database: that is what it reports; the database checks give up after `database_timeout` s."""
        return await self._read(
            lambda store: check_health(self, database_timeout=database_timeout, store=store)
        )

    # -- reports ------------------------------------------------------------------------------------

    async def report(
        self,
        *,
        start: datetime,
        end: datetime | None = None,
        group_by: Sequence[str] = (),
        where: Mapping[str, object] | None = None,
    ) -> list[ReportRow]:
        """Cost, calls and tokens of the calls in [start, end) (end: now), grouped by any of "day",
        "month" (in the tracker's time zone), "model", "provider" or a tag key, filtered by `where`
        ({"model": ..., "provider": ..., tag: value}). Groups are sorted by their key."""
        end = datetime.now(UTC) if end is None else end
        return await self._read(
            lambda store: report(store, self.timezone, start=start, end=end, group_by=group_by, where=where)
        )

    async def total(
        self, *, start: datetime, end: datetime | None = None, where: Mapping[str, object] | None = None
    ) -> ReportRow:
        """The sums of all calls in [start, end) matching `where`, as one ungrouped row."""
        rows = await self.report(start=start, end=end, where=where)
        return rows[0]

    async def budget_status(self, *, top: int = 20) -> list[BudgetStatus]:
        """Every day and month budget's current window: limit, spent, reserved, remaining, percent,
        window end and a linear projection to it; per-tag budgets list their `top` windows by spend."""
        now = datetime.now(UTC)
        rules = self.budget_guard.rules
        return await self._read(
            lambda store: budget_status(store, rules, self.budget_guard.bounds, now=now, top=top)
        )

    # -- capture ------------------------------------------------------------------------------------

    def httpx_transport(self, inner: Any = None) -> Any:
        """An httpx/httpx2 AsyncBaseTransport (of `inner`'s package; default httpx2) that records every
        LLM call made through it, streams included, and applies block-mode budgets before sending."""
        return capture.async_transport(self, inner, options=self.capture)

    def httpx_client(self, **kwargs: Any) -> Any:
        """An AsyncClient using `httpx_transport`, e.g. `openai.AsyncOpenAI(http_client=...)`.

        `transport=` becomes the inner transport (its package picks the client's: httpx or httpx2).
        """
        return capture.async_client(self, options=self.capture, **kwargs)

    def httpx_sync_transport(self, inner: Any = None) -> Any:
        """The sync variant, for sync SDK clients used in threads while the tracker runs on its loop."""
        return capture.sync_transport(self, inner, loop=self._recorder.running_loop, options=self.capture)

    def httpx_sync_client(self, **kwargs: Any) -> Any:
        """A sync Client using `httpx_sync_transport`; never call it on the tracker's own loop thread."""
        return capture.sync_client(self, loop=self._recorder.running_loop, options=self.capture, **kwargs)

    # -- budgets ------------------------------------------------------------------------------------

    @property
    def reserves(self) -> bool:
        """Whether a block-mode budget is configured: only then does `guard()` reserve (and read its
        `input_tokens`); capture skips working out the input bound when it does not."""
        return self.budget_guard.reserves

    def preflight(self, tags: Mapping[str, object]) -> BudgetExceeded | None:
        """A block-mode window applying to `tags` (normalized as `with_tags` does) known to be
        exhausted (memory only, no I/O)."""
        normalized = normalize_tags(tags)
        return self.budget_guard.refusal({k: v for k, v in normalized.items() if v is not None})

    def guard(
        self,
        *,
        provider: str,
        model: str,
        input_tokens: int,
        max_output_tokens: int | None = None,
        tags: Mapping[str, object] | None = None,
        choices: int = 1,
    ) -> Guarding:
        """Reserve an upper bound of a call's cost in every block-mode window, then make the call inside.

        Raises BudgetExceeded(stage="preflight") before the call when any window refuses (nothing
        stays reserved). Inside, `await call.record(usage)` settles (`record(None)`, usage that never
        arrived, holds the estimate until its windows end); leaving without a record releases.
        `input_tokens` must bound the input from above (UTF-8 bytes of the text do);
        `max_output_tokens` bounds the output of all the answers together; without it the bound is
        the model's context window minus the input, for each of the `choices` answers the request
        asks for (OpenAI's `n`, Gemini's `candidateCount`).
        """
        return Guarding(self._open, provider, model, input_tokens, max_output_tokens, tags, choices)

    async def _open(
        self,
        provider: str,
        model: str,
        input_tokens: int,
        max_output_tokens: int | None,
        tags: Mapping[str, object] | None,
        choices: int,
    ) -> GuardedCall:
        """Entering `guard()`: validate, reserve (block mode), and hand out the call."""
        provider, model = check_text("provider", provider, 64), check_text("model", model, 200)
        check_tokens("input_tokens", input_tokens)
        if type(choices) is not int or choices < 1:
            raise ValueError(f"choices must be a positive int, got {choices!r}")
        merged = self._tags(tags)
        reserving = self._reserver.reserve(provider, model, input_tokens, max_output_tokens, merged, choices)
        recorder = self._recorder
        home = recorder.home()
        if not home and recorder.never_started():
            reserving.close()  # the call would be made, billed, and recorded nowhere
            raise RuntimeError(
                "llm-spend: the tracker is not running; enter it (`async with tracker:` or its "
                "lifespan) before making guarded or captured calls"
            )
        if home or not self.budget_guard.blocking(merged):
            reservation, granted = await reserving
        elif (loop := recorder.abroad()) is not None:
            # on another running loop: reserved on the tracker's, whose database lanes it uses
            reservation, granted = await hop(loop, reserving, here=False, undo=self._unreserve)
        elif recorder.stranded():
            reserving.close()
            raise RuntimeError(
                "llm-spend: a guarded call cannot reserve on this event loop while the tracker's own "
                "is not running; enter the tracker on the loop that makes the calls"
            )
        else:  # nothing would release the reservation, which would hold its windows until it expired
            reserving.close()
            raise RuntimeError(
                "llm-spend: a guarded call under a block-mode budget needs the tracker open "
                "(`async with tracker`, or `lifespan=tracker.lifespan`); it is not"
            )
        call = GuardedCall(self._recorder, self._reserver, provider, model, merged, reservation)
        call.max_output_tokens = granted
        return call

    async def _unreserve(self, reserved: tuple[Reservation | None, int | None]) -> None:
        """Free a reservation made for a caller on another loop that was cancelled meanwhile."""
        if reserved[0] is not None:
            with contextlib.suppress(Exception):  # else the sweep does, when its lease ends
                await self._reserver.release(reserved[0])
