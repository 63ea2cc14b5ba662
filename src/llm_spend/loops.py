"""Work handed to the tracker's event loop from another thread, and waited for there.

A running tracker's writer, its PostgreSQL lanes and its budgets' memory belong to the event loop
that entered it (its home loop). Whatever a call made elsewhere needs of them is handed to that loop:

- `run_on`, from a thread that runs no loop (a sync client's worker thread): it blocks;
- `hop`, from a coroutine on another running loop (``asyncio.run`` in a worker thread, as a sync
  FastAPI endpoint may do): it awaits, and that loop goes on meanwhile.

Both wait in slices of `_SLICE` seconds, looking between slices whether the home loop still runs,
so a wait never outlasts it. The work is claimed (a lock taken without blocking) by whichever side
runs it first: the home loop, in the coroutine's first step, or the waiter, once the home loop has
stopped, closed or cancelled the work before that, or has not started it within `_PATIENCE` seconds
(a loop blocked waiting for this very thread would otherwise never answer). Exactly one of the two
runs it. The waiter runs what it claimed itself (`here`), where the tracker, cut off from its loop,
touches no database: a record goes to the spool, a renewal or a release is left to the sweep. A
reservation is not run there (not `here`): it raises RuntimeError and the call is not made. Work
the home loop started and then stopped under gets `_PATIENCE` seconds for the loop to run again, and
a RuntimeError once the loop is closed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["hop", "run_after", "run_on", "running_loop"]

logger = logging.getLogger("llm_spend")

_monotonic = time.monotonic
_SLICE = 0.2
"""How often a waiter looks whether the tracker's loop still runs (seconds)."""
_PATIENCE = 10.0
"""How long a waiter waits for the loop to start the work, or to run again once it stopped in the
middle of it (seconds)."""


class _Handoff:
    """One coroutine sent to the home loop: the claim, the result, and the waiter's reading of the loop."""

    __slots__ = ("claim", "coroutine", "done", "loop", "sent_at", "stopped_at", "task")

    def __init__(self, loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, Any]) -> None:
        self.loop, self.coroutine = loop, coroutine
        self.claim = threading.Lock()
        self.done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.task: asyncio.Task[Any] | None = None
        self.sent_at = _monotonic()
        self.stopped_at: float | None = None
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
        """The coroutine the waiter claimed, to run itself; RuntimeError if it may not (not `here`)."""
        if not here:
            self.coroutine.close()
            raise RuntimeError("llm-spend: the tracker's event loop is gone")
        return self.coroutine


def run_on(loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, Any], *, here: bool = True) -> Any:
    """Run a coroutine on the tracker's loop from a thread that runs no loop, and wait for its result
    (see the module's text). What this thread claims runs here on a loop of its own (`here`), or is
    dropped with a RuntimeError (not `here`: a reservation needs the tracker's loop)."""
    handoff = _Handoff(loop, coroutine)
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


async def hop(
    loop: asyncio.AbstractEventLoop,
    coroutine: Coroutine[Any, Any, Any],
    *,
    here: bool = True,
    undo: Callable[[Any], Coroutine[Any, Any, Any]] | None = None,
) -> Any:
    """Run a coroutine on the tracker's loop from a coroutine on another running loop, and await its
    result (see the module's text). What this side claims runs here (`here`), or is dropped with a
    RuntimeError (not `here`).

    Cancelled while it waits, the work goes on at home (a record is written all the same), unless
    there is `undo`: then the work is cancelled, and `undo(result)` runs at home on what it still
    made (a reservation that came back as the cancellation went out)."""
    handoff = _Handoff(loop, coroutine)
    waiting = asyncio.wrap_future(handoff.done)
    try:
        while True:
            await asyncio.wait((waiting,), timeout=0 if loop.is_closed() else _SLICE)
            if waiting.done():
                if not waiting.cancelled():
                    return waiting.result()  # its result, or the coroutine's own error
                if handoff.claim.acquire(blocking=False):
                    break  # cancelled before its first step (an ending `asyncio.run`): this side's now
                raise RuntimeError("llm-spend: the tracker's event loop cancelled a call's work")
            if handoff.mine():
                break
    except asyncio.CancelledError:
        if undo is not None:
            if handoff.claim.acquire(blocking=False):
                coroutine.close()  # never started: nothing to undo
            else:
                with contextlib.suppress(RuntimeError):  # a closed loop: the sweep frees what it held
                    loop.call_soon_threadsafe(handoff.cancel, undo)
        raise
    return await handoff.here(here)


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
    elif (error := task.exception()) is not None:
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
