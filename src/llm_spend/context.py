"""Request-scoped attribution held in contextvars: tags and the request id.

`with_tags(**tags)` is a sync and async context manager and a decorator. Scopes nest (the inner
value wins) and always restore the previous state in ``finally``. The mapping in the ContextVar is
never mutated: each scope sets a new read-only mapping (copy on write), so tasks created with
`asyncio.create_task` and threads started with `asyncio.to_thread` see the tags of their creator and
nothing they do leaks back.

contextvars-extras is used here and nowhere else (docs/decisions.md says why it is acceptable).
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType, TracebackType
from typing import Any, Final, TypeVar, cast

from contextvars_extras import ContextVarExt

__all__ = [
    "MAX_TAGS",
    "REDACTED",
    "current_request_id",
    "current_tags",
    "normalize_tags",
    "with_tags",
]

MAX_TAGS: Final = 50
MAX_VALUE_BYTES: Final = 256
REDACTED: Final = "[REDACTED]"
_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# A key is secret-looking when one of its words (split on _ . -) is one of these: `api_key`,
# `X-API-Key`, `client_secret`, `session_token` and `token_count` are; `max_tokens` and `author` not.
_SECRET = re.compile(
    r"(?:^|[_.\-])(?:api[_.\-]?key|apikey|authorization|auth|bearer|password|passwd|secret|token|cookie"
    r"|credentials?|private[_.\-]?key|access[_.\-]?key)(?:$|[_.\-])"
)
_EMPTY: Mapping[str, str] = MappingProxyType({})

_tags: ContextVarExt[Mapping[str, str]] = ContextVarExt("llm_spend.tags", default=_EMPTY)
request_id_var: ContextVarExt[str | None] = ContextVarExt("llm_spend.request_id", default=None)
_scope_tokens: ContextVarExt[tuple[Any, ...]] = ContextVarExt("llm_spend.scope_tokens", default=())

F = TypeVar("F", bound=Callable[..., Any])


def current_tags() -> Mapping[str, str]:
    """The tags in effect here, as a read-only mapping."""
    tags: Mapping[str, str] = _tags.get()
    return tags


def current_request_id() -> str | None:
    """The id of the HTTP request being served, set by SpendMiddleware, or None."""
    request_id: str | None = request_id_var.get()
    return request_id


@functools.lru_cache(maxsize=4096)
def _key_kind(key: str) -> bool | None:
    """None for an invalid key, else whether it looks like a secret (cached: keys repeat)."""
    if not _KEY.fullmatch(key):
        return None
    return _SECRET.search(key.lower()) is not None


def _value(key: str, value: object, secret: bool) -> str:
    if secret:
        return REDACTED
    text = value if isinstance(value, str) else str(value)
    if "\x00" in text or not text.isascii():  # NUL and lone surrogates: no database stores them
        text = text.replace("\x00", "\ufffd").encode(errors="replace").decode()
    if len(text) * 4 <= MAX_VALUE_BYTES:  # fast path: cannot exceed the byte limit
        return text
    return text.encode()[:MAX_VALUE_BYTES].decode(errors="ignore")


def _plain(text: str) -> bool:
    return len(text) <= MAX_VALUE_BYTES // 4 and text.isascii() and "\x00" not in text


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
        kind = _key_kind(key) if isinstance(key, str) else None
        if kind is False and type(value) is str and _plain(value):  # kept as it is (see `_value`)
            normalized[key] = value
            continue
        if kind is None:
            raise ValueError(f"tag key {key!r} must match [A-Za-z0-9_.-]{{1,64}}")
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
    return MappingProxyType(cast(dict[str, str], merged))


class with_tags:
    """Attach tags to every LLM call made inside: ``with``, ``async with`` or ``@with_tags(...)``."""

    __slots__ = ("_new",)

    def __init__(self, **tags: object) -> None:
        self._new = normalize_tags(tags)

    def __enter__(self) -> Mapping[str, str]:
        # The token is kept in the context, not on self: one scope object may be entered by many
        # tasks and threads at once (e.g. a module-level `CHAT = with_tags(feature="chat")`).
        merged = merge_tags(_tags.get(), self._new)
        _scope_tokens.set((*_scope_tokens.get(), _tags.set(merged)))
        return merged

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        tokens = _scope_tokens.get()
        _scope_tokens.set(tokens[:-1])
        _tags.reset(tokens[-1])

    async def __aenter__(self) -> Mapping[str, str]:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def __call__(self, func: F) -> F:
        """Decorate a sync or async function: each call runs in its own scope."""
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            raise TypeError(
                f"with_tags cannot decorate the generator {func.__qualname__}: its body runs in its "
                "consumer's context; use `with with_tags(...)` inside it instead"
            )
        new = self._new
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                token = _tags.set(merge_tags(_tags.get(), new))
                try:
                    return await cast(Callable[..., Awaitable[Any]], func)(*args, **kwargs)
                finally:
                    _tags.reset(token)

            return cast(F, async_wrapper)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            token = _tags.set(merge_tags(_tags.get(), new))
            try:
                return func(*args, **kwargs)
            finally:
                _tags.reset(token)

        return cast(F, wrapper)


def set_request_scope(
    request_id: str, tags: dict[str, str | None] | Mapping[str, str | None]
) -> tuple[tuple[Any, Any], Mapping[str, str]]:
    """Enter a request's scope (used by SpendMiddleware): tokens for `reset_request_scope`, and the
    tags now in effect. `tags` (as `normalize_tags` returns them) is not used afterwards by the caller."""
    base = _tags.get()
    if not base and type(tags) is dict and None not in tags.values():  # no copy of a fresh mapping
        merged: Mapping[str, str] = MappingProxyType(cast(dict[str, str], tags))
    else:
        merged = merge_tags(base, tags)
    return (request_id_var.set(request_id), _tags.set(merged)), merged


def reset_request_scope(tokens: tuple[Any, Any]) -> None:
    request_token, tags_token = tokens
    _tags.reset(tags_token)
    request_id_var.reset(request_token)
