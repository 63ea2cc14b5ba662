"""Building capturing transports and clients for httpx or httpx2, whichever the caller uses.

The package is the one `inner` derives from (default: httpx2 when installed, else httpx), and the
transport returned derives from that package's base classes, as its clients require. Neither package
is imported before the first transport is built.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Mapping
from types import ModuleType
from typing import Any, NamedTuple

from .calls import TrackerLike
from .handback import ReadBody, identity_response
from .options import CaptureOptions
from .streams import TappedAsyncStream, TappedSyncStream
from .transport import LoopGetter, SpendAsyncTransport, SpendSyncTransport

__all__ = ["async_client", "async_transport", "bind", "package_of", "sync_client", "sync_transport"]


class _Package(NamedTuple):
    """httpx or httpx2, and our classes mixed with its base classes."""

    module: ModuleType
    async_transport: type[Any]
    sync_transport: type[Any]
    async_stream: type[Any]
    sync_stream: type[Any]
    read_body: type[Any]
    identity_response: type[Any] | None
    """Its Response that reads a body with no Content-Encoding directly (`handback.read_directly`)."""


def package_of(transport: object) -> str:
    """ "httpx" or "httpx2": the package whose base transport `transport` derives from. Asked of
    the classes first: openai re-exports httpx2's `BaseTransport` as `openai.Transport`, naming
    itself its `__module__`."""
    for name in ("httpx2", "httpx"):
        module = sys.modules.get(name)  # a transport of a package not imported is none of its
        if module is not None and isinstance(transport, module.BaseTransport | module.AsyncBaseTransport):
            return name
    for cls in type(transport).__mro__:
        root = (cls.__module__ or "").partition(".")[0]
        if root in ("httpx", "httpx2"):
            return root
    raise TypeError(f"{transport!r} is neither an httpx nor an httpx2 transport")


def default_package() -> str:
    """httpx2 when installed (the SDKs moved to it), else httpx."""
    try:
        importlib.import_module("httpx2")
    except ImportError:
        return "httpx"
    return "httpx2"


@functools.cache
def bind(name: str) -> _Package:
    """The capture classes for one package, built once (imported only when first asked for)."""
    module = importlib.import_module(name)
    return _Package(
        module,
        type("SpendAsyncTransport", (SpendAsyncTransport, module.AsyncBaseTransport), {}),
        type("SpendSyncTransport", (SpendSyncTransport, module.BaseTransport), {}),
        type("TappedAsyncStream", (TappedAsyncStream, module.AsyncByteStream), {}),
        type("TappedSyncStream", (TappedSyncStream, module.SyncByteStream), {}),
        type("ReadBody", (ReadBody, module.AsyncByteStream, module.SyncByteStream), {}),
        identity_response(module),
    )


def async_transport(tracker: TrackerLike, inner: Any = None, *, options: CaptureOptions | None = None) -> Any:
    """An AsyncBaseTransport of `inner`'s package (default: a new httpx2.AsyncHTTPTransport).

    Raises ValueError naming the argument when `tracker` has no ``guard()``, `inner` is not an async
    httpx or httpx2 transport, or `options` is not a CaptureOptions.
    """
    options = _checked(tracker, options)
    if inner is None:
        inner = bind(default_package()).module.AsyncHTTPTransport()
    package = bind(_package("inner", inner, sync=False))
    return package.async_transport(tracker, inner, options, package)


def sync_transport(
    tracker: TrackerLike, inner: Any = None, *, loop: LoopGetter, options: CaptureOptions | None = None
) -> Any:
    """A BaseTransport of `inner`'s package (default: a new httpx2.HTTPTransport).

    `loop` returns the tracker's running event loop (None when the tracker is not entered). Arguments
    are checked as `async_transport`'s, `inner` being a sync transport.
    """
    _check_loop(loop)
    options = _checked(tracker, options)
    if inner is None:
        inner = bind(default_package()).module.HTTPTransport()
    package = bind(_package("inner", inner, sync=True))
    return package.sync_transport(tracker, inner, options, package, loop)


def _checked(tracker: object, options: object) -> CaptureOptions:
    """`options` (default: CaptureOptions()) once `tracker` and `options` are checked."""
    if not callable(getattr(tracker, "guard", None)):
        raise ValueError(
            f"tracker must be a llm_spend.Tracker (an object with a guard() method), got {tracker!r}"
        )
    if options is not None and not isinstance(options, CaptureOptions):
        raise ValueError(f"options must be a llm_spend.capture.CaptureOptions or None, got {options!r}")
    return options or CaptureOptions()


def _check_loop(loop: object) -> None:
    """The sync functions' `loop`: what reaches the tracker's event loop."""
    if not callable(loop):
        raise ValueError(f"loop must be a callable returning the tracker's event loop, got {loop!r}")


def _package(name: str, transport: object, *, sync: bool, package: str | None = None) -> str:
    """The package ("httpx" or "httpx2") of `transport`, given as argument `name`, once checked to be
    a sync (`sync`) or async transport (of `package`, when given)."""
    kind = "BaseTransport" if sync else "AsyncBaseTransport"
    example = "HTTPTransport()" if sync else "AsyncHTTPTransport()"
    try:
        found = package_of(transport)
    except TypeError:
        raise ValueError(
            f"{name} must be an httpx or httpx2 {kind}, such as httpx2.{example}, got {transport!r}"
        ) from None
    if not isinstance(transport, getattr(bind(found).module, kind)):
        raise ValueError(
            f"{name} must be {'a sync' if sync else 'an async'} transport ({found}.{kind}, such as"
            f" {found}.{example}), got {transport!r}"
        )
    if package is not None and found != package:
        raise ValueError(
            f"{name} must be an {package} transport, as the client is, got an {found} one: {transport!r}"
        )
    return found


_TRANSPORT_ARGS = ("verify", "cert", "trust_env", "http1", "http2", "limits", "proxy", "retries")


def _client_args(name: str, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Split client kwargs: the inner transport's (when none is given), and the client's own."""
    module = bind(name).module
    transport_args = {key: kwargs.pop(key) for key in _TRANSPORT_ARGS if key in kwargs}
    transport_args.setdefault("limits", module.Limits(max_connections=1000, max_keepalive_connections=100))
    if "trust_env" in transport_args:
        kwargs["trust_env"] = transport_args["trust_env"]
    kwargs.setdefault("timeout", module.Timeout(600.0, connect=5.0))
    kwargs.setdefault("follow_redirects", True)
    return module, transport_args


def async_client(tracker: TrackerLike, *, options: CaptureOptions | None = None, **kwargs: Any) -> Any:
    """An AsyncClient whose every request goes through `async_transport` (and its mounts' too).

    ``transport=`` becomes the inner transport (its package picks the client's); otherwise the
    transport arguments (verify, cert, http1, http2, limits, proxy, ...) build an inner
    AsyncHTTPTransport. Defaults follow the LLM SDKs: 600 s timeout (5 s to connect), redirects
    followed, up to 1000 connections. Proxies from the environment are not read: pass ``proxy=``.
    """
    _checked(tracker, options)
    inner = kwargs.pop("transport", None)
    name = _package("transport", inner, sync=False) if inner is not None else default_package()
    mounts = _mounts(kwargs.pop("mounts", None), name, sync=False)
    module, transport_args = _client_args(name, kwargs)
    if inner is None:
        inner = module.AsyncHTTPTransport(**transport_args)
    wrapped = {
        key: None if value is None else async_transport(tracker, value, options=options)
        for key, value in mounts.items()
    }
    return module.AsyncClient(
        transport=async_transport(tracker, inner, options=options), mounts=wrapped, **kwargs
    )


def sync_client(
    tracker: TrackerLike, *, loop: LoopGetter, options: CaptureOptions | None = None, **kwargs: Any
) -> Any:
    """A Client whose every request goes through `sync_transport`; arguments as `async_client`."""
    _checked(tracker, options)
    _check_loop(loop)
    inner = kwargs.pop("transport", None)
    name = _package("transport", inner, sync=True) if inner is not None else default_package()
    mounts = _mounts(kwargs.pop("mounts", None), name, sync=True)
    module, transport_args = _client_args(name, kwargs)
    if inner is None:
        inner = module.HTTPTransport(**transport_args)
    wrapped = {
        key: None if value is None else sync_transport(tracker, value, loop=loop, options=options)
        for key, value in mounts.items()
    }
    return module.Client(
        transport=sync_transport(tracker, inner, loop=loop, options=options), mounts=wrapped, **kwargs
    )


def _mounts(mounts: object, package: str, *, sync: bool) -> Mapping[str, Any]:
    """`mounts` checked: a mapping of URL pattern to a transport of the client's package and kind, or
    None (no transport for that pattern)."""
    if mounts is None:
        return {}
    if not isinstance(mounts, Mapping):
        raise ValueError(
            f"mounts must be a mapping of URL pattern to transport, such as {{'https://': transport}},"
            f" got {mounts!r}"
        )
    for key, value in mounts.items():
        if not isinstance(key, str):
            raise ValueError(f"mounts keys must be URL patterns such as 'https://', got {key!r}")
        if value is not None:
            _package(f"mounts[{key!r}]", value, sync=sync, package=package)
    return mounts
