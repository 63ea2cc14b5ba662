"""GuardedCall: one call inside `tracker.guard()`, holding its reservation until it is recorded."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .guard import Reservation
from .loops import receive, send
from .money import from_nanousd
from .usage import (
    USAGE_SOURCES,
    CallRecord,
    Usage,
    UsageSource,
    check_latency,
    check_optional_text,
    check_text,
)

if TYPE_CHECKING:
    from .recorder import Recorder
    from .reserving import Reserver

__all__ = ["GuardedCall", "Guarding"]

logger = logging.getLogger("llm_spend")


class GuardedCall:
    """A call inside `tracker.guard()`: record its usage once with `await call.record(usage)`."""

    def __init__(
        self,
        recorder: Recorder,
        reserver: Reserver,
        provider: str,
        model: str,
        tags: Mapping[str, str],
        reservation: Reservation | None,
    ) -> None:
        self.provider = provider
        self.model = model
        self.tags = tags
        self.reservation = reservation
        self._recorder, self._reserver = recorder, reserver
        self._pending: _Recording | None = None
        self.task: asyncio.Task[Any] | None = None
        """The task that entered the guard, while its call holds a reservation; None again for a
        sync client's call, which its thread holds (the task that entered it on the tracker's loop
        has ended), and which the tracker's exit waits for all the same."""
        self.max_output_tokens: int | None = None
        """With `clamp_max_tokens`: the output tokens granted when the budget could not pay for the
        request's; the capture transport lowers the request to this."""

    @property
    def estimate(self) -> Decimal | None:
        """The reserved upper bound in USD, or None when nothing was reserved."""
        return None if self.reservation is None else from_nanousd(self.reservation.estimate)

    def record(
        self,
        usage: Usage | None,
        *,
        model: str | None = None,
        usage_source: UsageSource = "manual",
        stream: bool = False,
        latency_ms: int | None = None,
        service_tier: str | None = None,
        provider_response_id: str | None = None,
    ) -> _Recording:
        """Record the call and settle its reservation in the same transaction (or, with no usage,
        hold it until its windows end).

        Returns an awaitable: `await` it for the CallRecord; if not awaited, leaving the block does.
        `usage=None` records a billed call whose usage never arrived (unknown usage, NULL cost): its
        reservation is then kept, the estimate held in its windows until they end (the call cost
        at most that).
        `model` overrides the requested model, e.g. with the dated snapshot the response names.
        """
        if self._pending is not None:
            raise RuntimeError("this guarded call was already recorded")
        if usage is not None and not isinstance(usage, Usage):
            raise ValueError(f"usage must be a llm_spend.Usage or None, got {type(usage).__name__}")
        if usage_source not in USAGE_SOURCES:
            raise ValueError(f"usage_source must be one of {', '.join(USAGE_SOURCES)}, got {usage_source!r}")
        if type(stream) is not bool:
            raise ValueError(f"stream must be True or False, got {stream!r}")
        recorder, reservation = self._recorder, self.reservation
        record = recorder.build(
            provider=self.provider, model=self.model if model is None else check_text("model", model, 200),
            usage=usage, usage_source=usage_source, tags=self.tags,
            occurred_at=reservation.at if reservation else None,
            event_id=reservation.id if reservation else None, stream=stream,
            latency_ms=check_latency(latency_ms),
            service_tier=check_optional_text("service_tier", service_tier, 64),
            provider_response_id=check_optional_text("provider_response_id", provider_response_id, 200),
        )  # fmt: skip
        if reservation is None:
            self._pending = _Recording(recorder, record, recorder.submit(record))
            return self._pending
        if record.cost_nanousd is not None and record.cost_nanousd > reservation.estimate:
            recorder.budget_guard.excess_calls += 1
            logger.warning(
                "llm-spend: %s/%s cost %s, above its reserved estimate %s; recorded in full",
                self.provider, self.model, record.cost, from_nanousd(reservation.estimate),
            )  # fmt: skip
        settle: dict[str, Any] = {"reservation_id": reservation.id, "release": reservation.windows}
        if record.pricing_status == "unknown_usage" and reservation.windows:
            # Billed, at a cost nobody knows but at most the estimate: the windows keep it reserved
            # until they end, so that a call cut short never counts $0 against a block-mode budget.
            # (A model with no price is settled at $0 as before: `reprice` adds its cost later.)
            bounds = recorder.budget_guard.bounds
            settle["hold_until"] = max(
                bounds(key.period, reservation.at)[1] for key, _ in reservation.windows
            )
        written = recorder.submit(record, reservation.estimate, **settle)
        self._pending = _Recording(recorder, record, written, reservation.estimate)
        return self._pending

    async def extend(self) -> None:
        """Renew the reservation's lease (a long stream calls this so the sweep leaves it alone);
        nothing once the call is recorded (its write settles or holds the reservation)."""
        if self.reservation is not None and self._pending is None:
            await self._at_home(self._extend)

    async def _extend(self, reservation: Reservation) -> None:
        if self._recorder.home():  # else closed, or cut off from its loop: the next start settles it
            await self._reserver.extend(reservation)

    def _at_home(self, step: Callable[[Reservation], Coroutine[Any, Any, None]]) -> Awaitable[None]:
        """A step of the reservation on the tracker's loop: here, or handed to it now from another
        running loop (`loops.send`), awaited by what this returns; each step skips the database
        where it finds itself cut off."""
        assert self.reservation is not None
        loop = self._recorder.abroad()
        if loop is None:
            return step(self.reservation)
        return receive(send(loop, step(self.reservation)))

    def _unfinished(self) -> bool:
        """Whether leaving the block still has work: a record nobody awaited, or a reservation."""
        if self._pending is not None:
            return not self._pending.awaited
        return self.reservation is not None

    def _finishing(self) -> Awaitable[Any]:
        """What leaving the block awaits: the record nobody awaited, or the release (handed to the
        tracker's loop now when this runs on another, so that it is made even if the task awaiting
        it never starts)."""
        if self._pending is not None and not self._pending.awaited:
            return self._pending
        return self._at_home(self._release)

    async def _release(self, reservation: Reservation) -> None:
        if not self._recorder.home():  # closed, or its loop stopped: no database to release in
            logger.warning("llm-spend: a reservation left at shutdown is released once its lease ends")
            return
        try:
            await self._reserver.release(reservation)
        except Exception as exc:  # the sweep releases it when its lease runs out
            logger.warning("llm-spend: releasing a reservation failed (%s); the sweep will", exc)


class _Recording:
    """The write of a guarded call's record, already queued; awaiting it (once) gives the CallRecord
    after the commit, and applies the budgets."""

    def __init__(
        self, recorder: Recorder, record: CallRecord, written: Awaitable[Any], reserved: int | None = None
    ) -> None:
        self._recorder, self._record, self._written, self._reserved = recorder, record, written, reserved
        self.awaited = False

    def __await__(self) -> Generator[Any, None, CallRecord]:
        if self.awaited:
            raise RuntimeError("a guarded call's record is awaited once")
        self.awaited = True
        return self._recorder.recorded(self._record, self._written, self._reserved).__await__()


class Guarding:
    """What `tracker.guard(...)` returns: ``async with`` it to reserve and get the `GuardedCall`;
    leaving settles what the call recorded, or releases its reservation (shielded from cancellation)."""

    __slots__ = ("_args", "_call", "_open")

    def __init__(self, open_call: Callable[..., Awaitable[GuardedCall]], *args: Any) -> None:
        self._open, self._args = open_call, args
        self._call: GuardedCall | None = None

    async def __aenter__(self) -> GuardedCall:
        if self._call is not None:
            raise RuntimeError("a tracker.guard(...) is entered once; call guard() again for another call")
        self._call = call = await self._open(*self._args)
        if call.reservation is not None and (task := asyncio.current_task()) is not None:
            call.task = task
            call._recorder.holding.add(call)
        return call

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        call = self._call
        if call is None:
            return
        holding = call._recorder.holding
        if not call._unfinished():
            holding.discard(call)
            return
        finishing = asyncio.ensure_future(call._finishing())
        finishing.add_done_callback(lambda _: holding.discard(call))  # done, even if we are cancelled
        try:
            await asyncio.shield(finishing)
        except asyncio.CancelledError:  # this task stops waiting (cancelled again): the tracker's exit waits
            recorder = call._recorder
            if not finishing.done() and recorder.home():
                recorder.budget_guard.leaving.add(finishing)
                finishing.add_done_callback(recorder.budget_guard.leaving.discard)
            raise
