"""Work handed to the tracker's event loop from another thread, and waited for there.

A running tracker's writer, its PostgreSQL lanes and its budgets' memory belong to the event loop
that entered it (its home loop). Whatever a call made elsewhere needs of them is handed to that loop:

- `run_on`, from a thread that runs no loop (a sync client's worker thread): it blocks;
- `hop`, from a coroutine on another running loop (``asyncio.run`` in a worker thread, as a sync
  FastAPI endpoint may do): it awaits, and that loop goes on meanwhile. It is `send`, which hands
  the coroutine over at once, then `receive`, which awaits it: what must be done even if the task
  that would await it never starts (a record, a release) is sent first.

Both wait in slices of `_SLICE` seconds, looking between slices whether the home loop still runs,
so a wait never outlasts it. The work is claimed (a lock taken without blocking) by whichever side
runs it first: the home loop, in the coroutine's first step, or the waiter, once the home loop has
stopped, closed or cancelled the work before that, or has not started it within `_PATIENCE` seconds
(a loop blocked waiting for this very thread would otherwise never answer). Exactly one of the two
runs it. The waiter runs what it claimed itself (`here`), marked `cut_off()`, so the tracker touches
no database there and hands nothing on again: a record goes to the spool, a renewal or a release is
left to the sweep. A reservation or a read is not run there (not `here`): it raises RuntimeError, and
a call is not made. Work the home loop started and then stopped under gets `_PATIENCE` seconds for
the loop to run again, and a RuntimeError once the loop is closed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["Handoff", "cut_off", "hop", "receive", "run_after", "run_on", "running_loop", "send"]

logger = logging.getLogger("llm_spend")

_monotonic = time.monotonic
_SLICE = 0.2
"""How often a waiter looks whether the tracker's loop still runs (seconds)."""
_PATIENCE = 10.0
"""How long a waiter waits for the loop to start the work, or to run again once it stopped in the
middle of it (seconds)."""
_CUT_OFF: contextvars.ContextVar[asyncio.Task[Any] | None] = contextvars.ContextVar(
    "llm_spend_cut_off", default=None
)
"""The task running work a waiter claimed (a task it spawns copies the context, not the mark)."""


def cut_off() -> bool:
    """Whether this runs work a waiter claimed from the tracker's loop: it must not reach the
    database, nor hand anything to that loop again (which would wait for it a second time)."""
    task = _CUT_OFF.get()
    return task is not None and task is asyncio.current_task()


class Handoff:
    """One coroutine sent to the home loop: the claim, the result, and the waiter's reading of the loop."""

    __slots__ = ("claim", "coroutine", "done", "loop", "sent_at", "stopped_at", "task", "why")

    def __init__(self, loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, Any]) -> None:
        self.loop, self.coroutine = loop, coroutine
        self.claim = threading.Lock()
        self.done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.task: asyncio.Task[Any] | None = None
        self.sent_at = _monotonic()
        self.stopped_at: float | None = None
        self.why = "is gone"
        with contextlib.suppress(RuntimeError):  # a closed loop refuses it
            loop.call_soon_threadsafe(self._start)  # with the sender's context (its tags)

    def _start(self) -> None:  # on the home loop
        if self.claim.locked():  # the waiter took it while the loop was stopped: nothing to start
            return
        self.task = self.loop.create_task(self._claimed())
        self.task.add_done_callback(functools.partial(_copy, self.done))

    async def _claimed(self) -> Any:  # on the home loop: the work, unless the waiter took it first
        if self.claim.acquire(blocking=False):
            return await self.coroutine
        return None

    def mine(self) -> bool:
        """After a slice without a result: whether the waiter now runs the coroutine itself (the loop
        stopped, or did not start it in time); RuntimeError when the loop closed or stayed stopped
        in the middle of it."""
        loop = self.loop
        if loop.is_running():
            self.stopped_at = None
            if _monotonic() - self.sent_at > _PATIENCE and self.claim.acquire(blocking=False):
                self.why = f"did not take the call's work in {_PATIENCE:.0f} s"
                logger.error(
                    "llm-spend: the tracker's event loop did not take a call's work for %.0f s (is it "
                    "blocked waiting for this thread?); it is done here, cut off from the database",
                    _PATIENCE,
                )
                return True
            return False
        if self.claim.acquire(blocking=False):
            return True  # it stopped before it started the coroutine
        if loop.is_closed() or (self.stopped_at is not None and _monotonic() - self.stopped_at > _PATIENCE):
            raise RuntimeError("llm-spend: the tracker's event loop stopped in the middle of a call's work")
        if self.stopped_at is None:
            self.stopped_at = _monotonic()
        return False

    def cancel(self, undo: Callable[[Any], Coroutine[Any, Any, Any]]) -> None:
        """On the home loop, for a waiter cancelled meanwhile: cancel the work, and undo what it still
        made (a reservation that ended before the cancellation reached it)."""
        task = self.task
        if task is None:
            return
        if task.done():
            _undo(undo, task)
        else:
            task.add_done_callback(functools.partial(_undo, undo))
            task.cancel()

    def here(self, here: bool) -> Coroutine[Any, Any, Any]:
        """The coroutine the waiter claimed, to run itself, cut off; RuntimeError if it may not (not
        `here`)."""
        if not here:
            self.coroutine.close()
            raise RuntimeError(f"llm-spend: the tracker's event loop {self.why}")
        return self._cut_off()

    async def _cut_off(self) -> Any:
        token = _CUT_OFF.set(asyncio.current_task())
        try:
            return await self.coroutine
        finally:
            _CUT_OFF.reset(token)


def run_on(loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, Any], *, here: bool = True) -> Any:
    """Run a coroutine on the tracker's loop from a thread that runs no loop, and wait for its result
    (see the module's text). What this thread claims runs here on a loop of its own (`here`), or is
    dropped with a RuntimeError (not `here`: a reservation needs the tracker's loop)."""
    handoff = Handoff(loop, coroutine)
    done = handoff.done
    while True:
        try:
            return done.result(0 if loop.is_closed() else _SLICE)
        except TimeoutError:
            if done.done():  # done since: its result, or the coroutine's own error
                return done.result()
        except concurrent.futures.CancelledError:
            if handoff.claim.acquire(blocking=False):
                break  # cancelled before its first step (an ending `asyncio.run`): this thread's now
            raise
        if handoff.mine():
            break
    if running_loop() is not None:  # a thread running a loop of its own cannot run another
        here = False
    return asyncio.run(handoff.here(here))


def send(loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, Any]) -> Handoff:
    """Hand a coroutine to the tracker's loop now, from another running loop; `receive` awaits it.
    Sent before any task of this loop is made, it is done even if no such task ever runs (an ending
    `asyncio.run` cancels the tasks it has not started)."""
    return Handoff(loop, coroutine)


async def hop(
    loop: asyncio.AbstractEventLoop,
    coroutine: Coroutine[Any, Any, Any],
    *,
    here: bool = True,
    undo: Callable[[Any], Coroutine[Any, Any, Any]] | None = None,
) -> Any:
    """Run a coroutine on the tracker's loop from a coroutine on another running loop, and await its
    result (see the module's text): `send`, then `receive`."""
    return await receive(send(loop, coroutine), here=here, undo=undo)


async def receive(
    handoff: Handoff, *, here: bool = True, undo: Callable[[Any], Coroutine[Any, Any, Any]] | None = None
) -> Any:
    """Await the result of what `send` handed to the tracker's loop. What this side claims runs here
    (`here`), or is dropped with a RuntimeError (not `here`).

    Cancelled while it waits, the caller leaves, and the wait goes on in a task of its own, so that
    the work is done, at home or here (a record is written, or spooled, all the same); unless there
    is `undo`: then the work is cancelled, and `undo(result)` runs at home on what it still made (a
    reservation that came back as the cancellation went out)."""
    if undo is not None:  # the wait in this task: a cancellation reaches it, which cancels the work
        return await _wait(handoff, here, undo)
    waiting = asyncio.ensure_future(_wait(handoff, here, undo))
    _waits.add(waiting)
    waiting.add_done_callback(_waited)
    return await asyncio.shield(waiting)


async def _wait(handoff: Handoff, here: bool, undo: Callable[[Any], Coroutine[Any, Any, Any]] | None) -> Any:
    loop = handoff.loop
    done = asyncio.wrap_future(handoff.done)
    try:
        while True:
            await asyncio.wait((done,), timeout=0 if loop.is_closed() else _SLICE)
            if done.done():
                if not done.cancelled():
                    return done.result()  # its result, or the coroutine's own error
                if handoff.claim.acquire(blocking=False):
                    break  # cancelled before its first step (an ending `asyncio.run`): this side's now
                raise RuntimeError("llm-spend: the tracker's event loop cancelled a call's work")
            if handoff.mine():
                break
    except asyncio.CancelledError:
        done.cancel()  # nobody here hears the result any more (this loop may be closing)
        if undo is not None:
            if handoff.claim.acquire(blocking=False):
                handoff.coroutine.close()  # never started: nothing to undo
            else:
                with contextlib.suppress(RuntimeError):  # a closed loop: the sweep frees what it held
                    loop.call_soon_threadsafe(handoff.cancel, undo)
        elif not loop.is_running() and handoff.claim.acquire(blocking=False):
            # this loop is ending (its caller left already) and the tracker's is not running: done
            # here now (a record spooled), rather than left to a loop that may never take it
            if here:
                return await handoff.here(here)
            handoff.coroutine.close()
        raise
    return await handoff.here(here)


_waits: set[asyncio.Future[Any]] = set()
"""Waits behind a shield, which go on if their caller is cancelled (kept from the garbage collector
until they end)."""


def _waited(wait: asyncio.Future[Any]) -> None:
    _waits.discard(wait)
    if not wait.cancelled() and (error := wait.exception()) is not None:
        logger.debug("llm-spend: work handed to the tracker's loop raised %r", error)


def run_after(loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, Any]) -> None:
    """`run_on` for what follows a call that went out (renewing its lease, recording, releasing):
    if that cannot run anywhere, or is cancelled midway, it is logged, never raised, as the call
    itself went through. (A `BudgetExceeded` the record raises is raised.)"""
    try:
        run_on(loop, coroutine)
    except (RuntimeError, concurrent.futures.CancelledError) as exc:
        logger.error("llm-spend: a captured call may not be recorded: %r", exc)


def running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _copy(done: concurrent.futures.Future[Any], task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        done.cancel()
        return
    with contextlib.suppress(concurrent.futures.InvalidStateError):  # its waiter cancelled it
        if (error := task.exception()) is not None:
            done.set_exception(error)
        else:
            done.set_result(task.result())


def _undo(undo: Callable[[Any], Coroutine[Any, Any, Any]], task: asyncio.Task[Any]) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    work = asyncio.ensure_future(undo(task.result()))
    _undoing.add(work)
    work.add_done_callback(_undoing.discard)


_undoing: set[asyncio.Future[Any]] = set()
"""Undos under way (kept from the garbage collector until they end)."""
