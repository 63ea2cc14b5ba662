"""Capture configuration: given to the Tracker's constructor, frozen afterwards."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

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
    """Input tokens counted per image, audio or file part in the preflight bound."""
    lease_renewal: float = 60.0
    """Seconds of streaming between renewals of the call's reservation lease."""
    router: Router = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.providers is not None and not isinstance(self.providers, Mapping):
            raise ValueError(f"providers must be a mapping of host to adapter, got {self.providers!r}")
        if type(self.media_allowance_tokens) is not int or self.media_allowance_tokens < 0:
            raise ValueError(
                f"media_allowance_tokens must be a non-negative int, got {self.media_allowance_tokens!r}"
            )
        if isinstance(self.lease_renewal, bool) or not isinstance(self.lease_renewal, int | float):
            raise ValueError(f"lease_renewal must be a number of seconds, got {self.lease_renewal!r}")
        frozen = MappingProxyType(dict(self.providers)) if self.providers is not None else None
        object.__setattr__(self, "providers", frozen)
        object.__setattr__(self, "router", Router(frozen))
