"""Guard: applies budgets to calls, before (reservations) and after (crossings).

Block mode reserves an upper bound of a call's cost in every window that applies, all or nothing,
with one conditional UPDATE per window in one transaction; so spend cannot pass a limit however
many tasks, processes and hosts share the database. After the call, settlement (reserved -= estimate,
spent += actual) rides in the ledger write's transaction; a call whose usage never arrived keeps its
estimate reserved until its windows end instead (`PendingWrite.hold_until`). The Guard also
remembers which block-mode windows are known exhausted, so the middleware can refuse without a
database read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from .budgets import BudgetRule, window_bounds
from .exceptions import BudgetExceeded
from .storage.store import Refusal, Store, WindowKey

__all__ = ["Guard", "Reservation"]

logger = logging.getLogger("llm_spend")

_MAX_EXHAUSTED = 100_000


@dataclass(frozen=True, slots=True)
class Reservation:
    """Money held for one call in flight: settled by its record, else released or swept."""

    id: str
    at: datetime
    estimate: int
    windows: tuple[tuple[WindowKey, int], ...]


def _may_hold(outcome: asyncio.Future[Refusal | None]) -> bool:
    """Whether a reservation's outcome may have left money held: granted, or failed (a commit whose
    answer was lost). Not a refusal, nor an outcome dropped because nothing will answer."""
    if not outcome.done() or outcome.cancelled():
        return False
    return outcome.exception() is not None or outcome.result() is None


def _quiet(task: asyncio.Future[Any]) -> None:
    """A release that failed: the sweep frees the reservation when its lease ends."""
    if not task.cancelled():
        task.exception()


class Guard:
    """The budget rules of one tracker, applied to calls."""

    def __init__(self, rules: tuple[BudgetRule, ...], *, tz: ZoneInfo, store: Store) -> None:
        self.rules = rules
        self.tz = tz
        self.store = store
        scopes = {(r.budget.period, r.scope_key) for r in rules if r.budget.per is not None}
        self._tag_scopes: tuple[tuple[str, str], ...] = tuple(sorted(scopes))
        self._global: tuple[datetime, datetime, tuple[WindowKey, ...]] | None = None
        """The global day and month windows, and the span of time in which both hold."""
        self._per_call = any(r.budget.period == "call" for r in rules)
        self._block = tuple((i, r) for i, r in enumerate(rules) if r.mode == "block")
        self._block_scopes = tuple((i, r.budget.per) for i, r in self._block)
        """(rule index, tag key or None for global) of each block-mode rule, for `refusal`."""
        self._bounds: dict[str, tuple[datetime, datetime]] = {}
        self._exhausted: dict[tuple[int, str], tuple[datetime, datetime, int]] = {}
        """(rule index, scope value) -> (window start, window end, spent when found exhausted)."""
        self.excess_calls = 0
        """Guarded calls whose actual cost came out above their estimate (recorded in full anyway)."""
        self.leaving: set[asyncio.Future[Any]] = set()
        """Work that ends guarded calls (a release, a record nobody awaited) under way on the
        tracker's loop, whose callers may stop waiting for it: the tracker's exit waits for it."""

    def bounds(self, period: str, at: datetime) -> tuple[datetime, datetime]:
        """The window of `period` containing `at` (the current window is cached)."""
        cached = self._bounds.get(period)
        if cached is not None and cached[0] <= at < cached[1]:
            return cached
        bounds = window_bounds(period, at, self.tz)
        if cached is None or bounds[0] >= cached[0]:
            self._bounds[period] = bounds
        return bounds

    def windows(self, tags: Mapping[str, str], at: datetime) -> tuple[WindowKey, ...]:
        """The rollup rows a call at `at` with `tags` counts in: global day and month, per-tag ones."""
        known = self._global
        if known is None or not known[0] <= at < known[1]:
            day, month = self.bounds("day", at), self.bounds("month", at)
            both = (WindowKey("day", day[0], "", ""), WindowKey("month", month[0], "", ""))
            known = self._global = (max(day[0], month[0]), min(day[1], month[1]), both)
        if not self._tag_scopes:
            return known[2]  # one tuple for every call of the day, which the writers recognize
        keys = list(known[2])
        for period, scope_key in self._tag_scopes:
            value = tags.get(scope_key)
            if value is not None:
                keys.append(WindowKey(period, self.bounds(period, at)[0], scope_key, value))
        return tuple(keys)

    @property
    def reserves(self) -> bool:
        """Whether any budget is in block mode (calls may reserve)."""
        return bool(self._block)

    def blocking(self, tags: Mapping[str, str]) -> bool:
        """Whether any block-mode budget applies to a call with these tags."""
        return any(rule.scope_value(tags) is not None for _, rule in self._block)

    # -- before the call ----------------------------------------------------------------------------

    async def reserve(
        self, reservation_id: str, tags: Mapping[str, str], estimate: int, *, lease: timedelta
    ) -> Reservation:
        """Hold `estimate` nano-USD in every block-mode window that applies, or raise BudgetExceeded."""
        at = datetime.now(UTC)
        limits: dict[WindowKey, int] = {}
        owners: dict[WindowKey, int] = {}
        for index, rule in self._block:
            value = rule.scope_value(tags)
            if value is None:
                continue
            if rule.budget.period == "call":
                if estimate > rule.limit_nanousd:
                    raise rule.exceeded(
                        window=None, scope_value=value, spent=0, reserved=0, requested=estimate,
                        stage="preflight", now=at,
                    )  # fmt: skip
                continue
            key = WindowKey(rule.budget.period, self.bounds(rule.budget.period, at)[0], rule.scope_key, value)
            if key not in limits or rule.limit_nanousd < limits[key]:
                limits[key], owners[key] = rule.limit_nanousd, index
        amounts = [(key, estimate, limit) for key, limit in limits.items()]
        if amounts:
            refusal = await self._reserve(reservation_id, amounts, at, lease)
            if refusal is not None:
                index = owners[refusal.key]
                window = self.bounds(refusal.key.period, at)
                if refusal.spent >= self.rules[index].limit_nanousd:
                    # Settled spend alone reached the limit: no call fits until the window ends, so
                    # remember it as exhausted. A refusal for the size of this call, or caused by
                    # concurrent reservations (whose money may come back), is not remembered.
                    self._mark_exhausted(index, refusal.key.scope_value, window, refusal.spent)
                raise self.rules[index].exceeded(
                    window=window, scope_value=refusal.key.scope_value, spent=refusal.spent,
                    reserved=refusal.reserved, requested=estimate, stage="preflight", now=at,
                )  # fmt: skip
        return Reservation(reservation_id, at, estimate, tuple((key, estimate) for key, _, _ in amounts))

    async def _reserve(
        self, reservation_id: str, amounts: list[tuple[WindowKey, int, int]], at: datetime, lease: timedelta
    ) -> Refusal | None:
        """The store's reservation; cancelled midway, it still ends, and what it took is given back."""
        under_way = self.store.reserve(reservation_id, amounts, now=at, expires_at=at + lease)
        try:
            if under_way.done():  # made already (on the SQLite connection of this thread)
                return under_way.result()
            return await under_way  # an `Outcome`: cancelling this task wakes it once that ended
        except asyncio.CancelledError:
            if _may_hold(under_way):
                await self._give_back(reservation_id)
            raise
        except Exception:  # it may have been made (a commit whose answer was lost): give it back
            await self._give_back(reservation_id)
            raise

    async def _give_back(self, reservation_id: str) -> None:
        """Release a reservation in a task of its own, which the caller waits for once: cancelled
        again meanwhile (anyio's cancel scopes cancel on every loop turn), it stops waiting, and the
        release goes on (the tracker's exit waits for it). One that fails is left to the sweep."""
        releasing = asyncio.ensure_future(self.store.release(reservation_id))
        self.leaving.add(releasing)
        releasing.add_done_callback(self.leaving.discard)
        releasing.add_done_callback(_quiet)
        with contextlib.suppress(Exception):
            await asyncio.shield(releasing)

    # -- after the call -----------------------------------------------------------------------------

    def after(
        self,
        tags: Mapping[str, str],
        at: datetime,
        cost: int | None,
        spent_after: Mapping[WindowKey, int],
        reserved: int | None = None,
    ) -> tuple[BudgetExceeded | None, list[BudgetExceeded]]:
        """Judge a recorded call: (the exception to raise or None, the crossings to notify).

        `reserved` is what a guarded call reserved in every block-mode window that applies: a call
        that cost no more than that was paid for before it went out, and raises in none of them
        (a window over its limit then is one that calls recorded after the fact took over)."""
        if not self.rules or (not spent_after and not self._per_call):
            return None, []  # no budget, or no total a budget judges (`Store(watch=...)`) and none per call
        now = datetime.now(UTC)
        to_raise: BudgetExceeded | None = None
        to_notify: list[BudgetExceeded] = []
        amount = cost or 0
        paid_for = reserved is not None and amount <= reserved
        for index, rule in enumerate(self.rules):
            value = rule.scope_value(tags)
            if value is None:
                continue
            window = None if rule.budget.period == "call" else self.bounds(rule.budget.period, at)
            if window is None:
                spent: int | None = amount
            else:
                spent = spent_after.get(WindowKey(rule.budget.period, window[0], rule.scope_key, value))
                if spent is not None and rule.mode == "block" and spent >= rule.limit_nanousd:
                    self._mark_exhausted(index, value, window, spent)
            if spent is None or spent <= rule.limit_nanousd:
                continue
            exc = rule.exceeded(
                window=window, scope_value=value, spent=spent, reserved=0, requested=amount,
                stage="post", now=now,
            )  # fmt: skip
            if rule.mode == "notify":
                if window is None or spent - amount <= rule.limit_nanousd:  # the crossing itself
                    to_notify.append(exc)
            elif to_raise is None and not (paid_for and rule.mode == "block"):
                to_raise = exc
        return to_raise, to_notify

    def _mark_exhausted(self, index: int, value: str, window: tuple[datetime, datetime], spent: int) -> None:
        known = self._exhausted.get((index, value))
        if known is not None and known[1] >= window[1]:  # a call settled late in an earlier window
            return
        if len(self._exhausted) >= _MAX_EXHAUSTED:
            self._exhausted.pop(next(iter(self._exhausted)))
        self._exhausted[(index, value)] = (window[0], window[1], spent)

    def refusal(self, tags: Mapping[str, str]) -> BudgetExceeded | None:
        """A block-mode window that applies to `tags` and is known exhausted, from memory only: a
        new BudgetExceeded each time (its `retry_after` counted from now; `spent` as it was when
        the window was found exhausted)."""
        exhausted = self._exhausted
        if not exhausted:
            return None
        for index, per in self._block_scopes:
            value = "" if per is None else tags.get(per)
            if value is None:
                continue
            entry = exhausted.get((index, value))
            if entry is None:
                continue
            now = datetime.now(UTC)
            if now < entry[1]:
                return self.rules[index].exceeded(
                    window=entry[:2], scope_value=value, spent=entry[2], reserved=0, requested=0,
                    stage="preflight", now=now,
                )  # fmt: skip
            del exhausted[(index, value)]
        return None
