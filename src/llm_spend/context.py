"""Request-scoped attribution held in contextvars: tags and the request id.

`with_tags(**tags)` is a sync and async context manager and a decorator. Scopes nest (the inner
value wins) and always restore the previous state in ``finally``. One ContextVar holds a `_Scope`:
the tags in effect, the request being served, and the enclosing scope, restored on exit. A
scope is never changed once set: each `with_tags` sets a new one with a new read-only mapping (copy on
write), so tasks created with `asyncio.create_task` and threads started with `asyncio.to_thread` see
the tags of their creator and nothing they do leaks back. One variable, not one per field, because a
ContextVar set and reset is the largest cost a request pays here (docs/performance.md).

contextvars-extras is used here and nowhere else (docs/decisions.md says why it is acceptable).
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType, TracebackType
from typing import Any, Final, TypeVar, cast

from contextvars_extras import ContextVarExt

__all__ = [
    "MAX_TAGS",
    "REDACTED",
    "current_request_id",
    "current_tags",
    "is_secret_key",
    "normalize_tags",
    "with_tags",
]

MAX_TAGS: Final = 50
MAX_VALUE_BYTES: Final = 256
REDACTED: Final = "[REDACTED]"
_PLAIN_LEN: Final = MAX_VALUE_BYTES // 4  # any str this long fits in MAX_VALUE_BYTES as UTF-8
_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# A key is secret-looking when one of its words (split on _ . - and where camelCase starts a word)
# is one of these: `api_key`, `X-API-Key`, `client_secret`, `accessToken`, `session_token` and
# `token_count` are; `max_tokens`, `maxTokens` and `author` not.
_SECRET = re.compile(
    r"(?:^|[_.\-])(?:api[_.\-]?key|apikey|authorization|auth|bearer|password|passwd|secret|token|cookie"
    r"|credentials?|private[_.\-]?key|access[_.\-]?key)(?:$|[_.\-])"
)
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_EMPTY: Mapping[str, str] = MappingProxyType({})
# Keys seen valid and not secret-looking: checked once, then known (keys repeat; bounded).
_ADDRESS = re.compile(r" at 0x[0-9A-Fa-f]+>")
"""In the default string of an object, function, method, generator or coroutine."""
_PLAIN_KEYS: set[str] = set()
_PLAIN_KEYS_MAX: Final = 4096

F = TypeVar("F", bound=Callable[..., Any])


# What the context holds: (tags, request id, enclosing scope). A plain tuple, the cheapest object to
# build. The request id is `(resolve, *args)`, worked out as `resolve(*args)` only when asked, so a
# request that makes no LLM call never works one out; it gives the same id each time. `with_tags`
# restores the enclosing scope on exit.
RequestId = tuple[Callable[[Any, int], str], Any, int]
_Scope = tuple[Mapping[str, str], RequestId | None, Any]
_TAGS: Final = 0
_REQUEST_ID: Final = 1
_OUTER: Final = 2

_scope: ContextVarExt[_Scope] = ContextVarExt("llm_spend.scope", default=(_EMPTY, None, None))
# The C methods of the underlying ContextVar: ContextVarExt.get is a Python wrapper, and a scope is
# never deleted or reset to its default, the cases that wrapper exists for.
_get: Callable[[], _Scope] = _scope.get_raw
_set: Callable[[_Scope], Any] = _scope.set
_reset: Callable[[Any], None] = _scope.reset


def current_tags() -> Mapping[str, str]:
    """The tags in effect here, as a read-only mapping."""
    return _get()[_TAGS]


def current_request_id() -> str | None:
    """The id of the HTTP request being served, set by SpendMiddleware, or None."""
    request_id = _get()[_REQUEST_ID]
    return None if request_id is None else request_id[0](request_id[1], request_id[2])


def _key_kind(key: str) -> bool | None:
    """None for an invalid key, else whether it looks like a secret."""
    if not _KEY.fullmatch(key):
        return None
    return _SECRET.search(_CAMEL.sub("_", key).lower()) is not None


def is_secret_key(key: str) -> bool:
    """Whether a valid tag key looks like a secret (its values are stored as REDACTED)."""
    return _key_kind(key) is True


class UnusableTagValue(ValueError):
    """A tag value with no string to keep (bytes, an object whose string is its address)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _value(key: str, value: object, secret: bool) -> str:
    if secret:
        return REDACTED
    if isinstance(value, str):
        text = value
    else:
        try:
            text = str(value)
        except Exception as exc:  # a __str__ that fails; an int of more than 4,300 digits
            raise UnusableTagValue(key, f"tag {key!r} has no string: {exc}") from None
        if isinstance(value, bytes | bytearray | memoryview) or _ADDRESS.search(text):
            # "b'...'", or "<function f at 0x...>": a new value, and a new window, per object
            raise UnusableTagValue(
                key,
                f"tag {key!r} must be a string, or a value with a string of its own (a number, a "
                f"UUID), got {type(value).__name__}",
            )
    text = storable(text)
    if len(text) * 4 <= MAX_VALUE_BYTES:  # fast path: cannot exceed the byte limit
        return text
    return text.encode()[:MAX_VALUE_BYTES].decode(errors="ignore")


def stored_value(key: str, value: object) -> str:
    """A tag value as the ledger stores it under a key that is not a secret's (a report's `where`)."""
    return _value(key, value, False)


def storable(text: str) -> str:
    """`text` with NUL and lone surrogates replaced: no database stores them."""
    if "\x00" in text or not text.isascii():
        return text.replace("\x00", "\ufffd").encode(errors="replace").decode()
    return text


def normalize_tags(tags: Mapping[str, object]) -> dict[str, str | None]:
    """Validate keys and normalize values: str, at most 256 UTF-8 bytes, secrets redacted.

    A value of None is kept as None, meaning "remove this key" when scopes merge.
    Raises ValueError naming the bad key, or when there are more than MAX_TAGS tags.
    """
    if type(tags) is not dict and not isinstance(tags, Mapping):
        raise ValueError(f"tags must be a mapping of str to str, got {type(tags).__name__}")
    if len(tags) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} tags are allowed, got {len(tags)}")
    normalized: dict[str, str | None] = {}
    for key, value in tags.items():
        if (  # kept as it is (see `_value`): a short plain str under a known plain key
            type(key) is str
            and key in _PLAIN_KEYS
            and type(value) is str
            and len(value) <= _PLAIN_LEN
            and value.isascii()
            and "\x00" not in value
        ):
            normalized[key] = value
            continue
        kind = _key_kind(key) if isinstance(key, str) else None
        if kind is None:
            raise ValueError(f"tag key {key!r} must match [A-Za-z0-9_.-]{{1,64}}")
        if kind is False and len(_PLAIN_KEYS) < _PLAIN_KEYS_MAX:
            _PLAIN_KEYS.add(key)
        normalized[key] = None if value is None else _value(key, value, kind)
    return normalized


def merge_tags(base: Mapping[str, str], new: Mapping[str, str | None]) -> Mapping[str, str]:
    """`base` overlaid by `new` (None removes a key), as a new read-only mapping."""
    if not new:
        return base
    merged = {**base, **new} if base else dict(new)
    if None in merged.values():
        merged = {k: v for k, v in merged.items() if v is not None}
    if len(merged) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} tags are allowed in one scope, got {len(merged)}")
    return MappingProxyType(merged)  # type: ignore[arg-type]  # the None values are gone


class with_tags:
    """Attach tags to every LLM call made inside: ``with``, ``async with`` or ``@with_tags(...)``."""

    __slots__ = ("_new",)

    def __init__(self, **tags: object) -> None:
        self._new = normalize_tags(tags)

    def __enter__(self) -> Mapping[str, str]:
        # What to restore is kept in the context (the enclosing scope), not on self: one scope
        # object may be entered by many tasks and threads at once (e.g. a module-level
        # `CHAT = with_tags(feature="chat")`).
        _enter(self._new)
        return _get()[_TAGS]

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        outer = _get()[_OUTER]
        if outer is None:
            raise RuntimeError("with_tags exited in a context that did not enter it")
        _set(outer)

    async def __aenter__(self) -> Mapping[str, str]:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def __call__(self, func: F) -> F:
        """Decorate a sync or async function: each call runs in its own scope."""
        if not callable(func):
            raise TypeError(f"with_tags decorates functions, got {func!r}")
        called = _called(func)
        if inspect.isgeneratorfunction(called) or inspect.isasyncgenfunction(called):
            raise TypeError(
                f"with_tags cannot decorate the generator {getattr(called, '__qualname__', called)}: its "
                "body runs in its consumer's context; use `with with_tags(...)` inside it instead"
            )
        new = self._new
        if inspect.iscoroutinefunction(called):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                token = _enter(new)
                try:
                    return await func(*args, **kwargs)
                finally:
                    _reset(token)

            return cast(F, async_wrapper)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            token = _enter(new)
            try:
                return func(*args, **kwargs)
            finally:
                _reset(token)

        return cast(F, wrapper)


def _called(func: Callable[..., Any]) -> Any:
    """The function a call of `func` runs: itself, a partial's function, or an object's `__call__`
    (so that an object with an async `__call__` is decorated as async, as Starlette tells endpoints)."""
    while isinstance(func, functools.partial):
        func = func.func
    if inspect.isroutine(func) or not callable(func):
        return func
    return type(func).__call__.__get__(func)


def _enter(new: Mapping[str, str | None]) -> Any:
    """Set a scope of the enclosing one's tags overlaid by `new`; its token."""
    outer = _get()
    return _set((merge_tags(outer[_TAGS], new), outer[_REQUEST_ID], outer))


def set_request_scope(
    request_id: RequestId, tags: dict[str, str | None] | Mapping[str, str | None]
) -> tuple[Any, Mapping[str, str]]:
    """Enter a request's scope (used by SpendMiddleware): the token for `reset_request_scope`, and
    the tags now in effect. `request_id` works out the request's id, as above; `tags` (as
    `normalize_tags` returns them) is not used afterwards by the caller."""
    outer = _get()
    base = outer[_TAGS]
    if not base and type(tags) is dict and None not in tags.values():  # no copy of a fresh mapping
        merged: Mapping[str, str] = MappingProxyType(tags)  # type: ignore[arg-type]
    else:
        merged = merge_tags(base, tags)
    return _set((merged, request_id, outer)), merged


reset_request_scope = _reset
