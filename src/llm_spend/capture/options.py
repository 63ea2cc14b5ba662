"""Capture configuration: given to the Tracker's constructor, frozen afterwards."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..usage import MAX_TOKENS
from .base import MEDIA_ALLOWANCE
from .routes import Router

__all__ = ["CaptureOptions"]


@dataclass(frozen=True, slots=True)
class CaptureOptions:
    """How the transport captures; given to the Tracker's constructor, frozen afterwards."""

    providers: Mapping[str, str] | None = None
    """Extra hosts to capture, see `llm_spend.capture.routes`."""
    include_stream_usage: bool = True
    """Add ``stream_options.include_usage`` to OpenAI chat streams that do not set it."""
    media_allowance_tokens: int = MEDIA_ALLOWANCE
    """Input tokens counted per image, audio or file part in the preflight bound (0 to 10**9)."""
    lease_renewal: float = 60.0
    """Seconds of streaming between renewals of the call's reservation lease (finite, above 0)."""
    router: Router = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.providers is not None and not isinstance(self.providers, Mapping):
            raise ValueError(f"providers must be a mapping of host to adapter, got {self.providers!r}")
        if not isinstance(self.include_stream_usage, bool):
            raise ValueError(f"include_stream_usage must be True or False, got {self.include_stream_usage!r}")
        allowance = self.media_allowance_tokens
        if type(allowance) is not int or not 0 <= allowance <= MAX_TOKENS:
            raise ValueError(
                f"media_allowance_tokens must be an int from 0 to {MAX_TOKENS}, got {allowance!r}"
            )
        renewal = self.lease_renewal
        if isinstance(renewal, bool) or not isinstance(renewal, int | float) or not 0 < renewal < math.inf:
            raise ValueError(f"lease_renewal must be a finite positive number of seconds, got {renewal!r}")
        frozen = MappingProxyType(dict(self.providers)) if self.providers is not None else None
        object.__setattr__(self, "providers", frozen)
        object.__setattr__(self, "router", Router(frozen))
