"""Reserving: what a guarded call holds in its block-mode windows before it is made.

An upper bound of the call's cost: its input tokens, and the output it may ask for (its max output
tokens, else the model's context window less the input, else `default_max_output_tokens`), priced
by the Pricer and reserved through the Guard, all windows or none. With `clamp_max_tokens`, a refused
call reserves for as many output tokens as the tightest window can still pay for, and the capture
transport lowers the request to them. A database that fails refuses the call (fail_closed) or lets
it go out unreserved (fail_open).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from .exceptions import BudgetExceeded, LLMSpendError, StorageError, UnknownPriceError
from .guard import Guard, Reservation
from .money import limit_nanousd
from .pricing import Pricer
from .usage import check_tokens, new_event_id

__all__ = ["Reserver"]

logger = logging.getLogger("llm_spend")


class Reserver:
    """Sizes and makes the reservation of a guarded call, renews its lease and releases it (one per
    tracker; its settings are fixed)."""

    def __init__(
        self,
        guard: Guard,
        pricer: Pricer,
        *,
        lease: timedelta,
        unknown_price: str,
        on_storage_error: str,
        clamp_max_tokens: bool,
        clamp_min_output_tokens: int,
        default_max_output_tokens: int | None,
    ) -> None:
        self.guard, self.pricer, self.lease = guard, pricer, lease
        self.unknown_price, self.on_storage_error = unknown_price, on_storage_error
        self.clamp_max_tokens, self.clamp_min_output_tokens = clamp_max_tokens, clamp_min_output_tokens
        self.default_max_output_tokens = default_max_output_tokens

    async def extend(self, reservation: Reservation) -> None:
        """Renew a reservation's lease (a long call renews it so that the sweep leaves it alone)."""
        await self.guard.store.extend(reservation.id, datetime.now(UTC) + self.lease)

    async def release(self, reservation: Reservation) -> None:
        """Free what a call that will not be recorded reserved."""
        await self.guard.store.release(reservation.id)

    async def reserve(
        self,
        provider: str,
        model: str,
        input_tokens: int,
        max_output_tokens: int | None,
        tags: Mapping[str, str],
        choices: int = 1,
    ) -> tuple[Reservation | None, int | None]:
        """Reserve for a call with these (merged) tags: (its reservation, or None when no block-mode
        window applies, the price is unknown and allowed, or fail_open let it go unreserved; the
        output tokens a clamp granted, else None). Raises BudgetExceeded when a window refuses, and
        UnknownPriceError for a model without a price (unless `unknown_price="allow"`)."""
        if not self.guard.blocking(tags):
            return None, None
        estimate = self.estimate(provider, model, input_tokens, max_output_tokens, choices)
        if estimate is None:
            if self.unknown_price == "refuse":
                raise UnknownPriceError(provider, model)
            return None, None
        try:
            return await self._reserve(tags, estimate), None
        except BudgetExceeded as refused:
            return await self._clamped(provider, model, input_tokens, tags, refused)

    async def _reserve(self, tags: Mapping[str, str], estimate: int) -> Reservation | None:
        """Reserve, or, when the database fails, refuse (fail_closed) or go unreserved (fail_open)."""
        try:
            return await self.guard.reserve(new_event_id(), tags, estimate, lease=self.lease)
        except LLMSpendError:
            raise
        except Exception as exc:
            if self.on_storage_error == "fail_closed":
                raise StorageError(
                    f"cannot reserve for a block-mode budget, the database failed: {exc} "
                    "(on_storage_error='fail_closed')"
                ) from exc
            logger.warning(
                "llm-spend: reservation failed (%s); the call goes out unreserved (fail_open)", exc
            )
            return None

    async def _clamped(
        self, provider: str, model: str, input_tokens: int, tags: Mapping[str, str], refused: BudgetExceeded
    ) -> tuple[Reservation | None, int]:
        """With `clamp_max_tokens`: reserve for as many output tokens as the refusing window can pay
        for; when another window refuses that, as many as it can (the tightest window decides), each
        window refusing at most about once; else the refusal stands."""
        for _ in range(len(self.guard.rules) + 1):
            granted = self._affordable_output(provider, model, input_tokens, refused)
            if granted is None:
                break
            smaller = self.estimate(provider, model, input_tokens, granted)
            assert smaller is not None
            try:
                return await self._reserve(tags, smaller), granted
            except BudgetExceeded as again:
                refused = again
        raise refused

    def _affordable_output(
        self, provider: str, model: str, input_tokens: int, refused: BudgetExceeded
    ) -> int | None:
        """With `clamp_max_tokens`: the most output tokens the refusing window can still pay for, if
        at least `clamp_min_output_tokens`; else None (the refusal stands)."""
        if not self.clamp_max_tokens:
            return None
        room = limit_nanousd(refused.limit - refused.spent - refused.reserved)
        now = datetime.now(UTC)
        base = self.pricer.bound(provider, model, input_tokens=input_tokens, output_tokens=0, at=now).nanousd
        per_million = self.pricer.bound(provider, model, input_tokens=0, output_tokens=10**6, at=now).nanousd
        if base is None or not per_million or room <= base:
            return None
        granted = (room - base) * 10**6 // per_million
        while granted > 0:  # rounding to the nano-dollar may cost a token or two
            cost = self.pricer.bound(
                provider, model, input_tokens=input_tokens, output_tokens=granted, at=now
            )
            if cost.nanousd is not None and cost.nanousd <= room:
                break
            granted -= max(1, granted // 1000)
        return granted if granted >= self.clamp_min_output_tokens else None

    def estimate(
        self, provider: str, model: str, input_tokens: int, max_output_tokens: int | None, choices: int = 1
    ) -> int | None:
        """An upper bound of the call's cost in nano-USD, or None when the model has no price.
        `max_output_tokens` bounds all the `choices` answers together; without it, each answer is
        bounded by the context window less the input (or `default_max_output_tokens`)."""
        if max_output_tokens is None:
            window = self.pricer.context_window(provider, model)
            if window is not None:
                max_output_tokens = max(window - input_tokens, 0) * choices
            elif self.default_max_output_tokens is not None:
                max_output_tokens = self.default_max_output_tokens * choices
            elif self._bound(provider, model, input_tokens, 0) is None:
                return None  # no price either: `unknown_price` decides, as for any unpriced model
            else:
                raise LLMSpendError(
                    f"cannot bound the cost of a {provider}/{model} call that sets no max output tokens: "
                    "its context window is unknown; set max tokens on the request or "
                    "Tracker(default_max_output_tokens=...)"
                )
        check_tokens("max_output_tokens", max_output_tokens)
        return self._bound(provider, model, input_tokens, max_output_tokens)

    def _bound(self, provider: str, model: str, input_tokens: int, output_tokens: int) -> int | None:
        bound = self.pricer.bound(
            provider, model, input_tokens=input_tokens, output_tokens=output_tokens, at=datetime.now(UTC)
        )
        nanousd: int | None = bound.nanousd
        return nanousd
