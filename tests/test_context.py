"""with_tags / current_tags: request-scoped attribution held in contextvars."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator, Iterator

import pytest

from llm_spend import current_tags, with_tags
from llm_spend.context import normalize_tags


def test_sync_context_manager_sets_and_restores_tags() -> None:
    """Inside `with with_tags(...)` the tags are current; after the block they are gone."""
    assert dict(current_tags()) == {}
    with with_tags(user_id="42", feature="chat") as tags:
        assert dict(current_tags()) == {"user_id": "42", "feature": "chat"}
        assert dict(tags) == {"user_id": "42", "feature": "chat"}
    assert dict(current_tags()) == {}


async def test_async_context_manager_sets_and_restores_tags() -> None:
    """`async with with_tags(...)` works like the sync form."""
    async with with_tags(user_id="7"):
        await asyncio.sleep(0)
        assert dict(current_tags()) == {"user_id": "7"}
    assert dict(current_tags()) == {}


def test_decorator_on_sync_function() -> None:
    """A sync function decorated with @with_tags sees the tags during each call, not after."""

    @with_tags(feature="summarize")
    def work(x: int) -> tuple[int, dict[str, str]]:
        return x * 2, dict(current_tags())

    assert work(3) == (6, {"feature": "summarize"})
    assert work.__name__ == "work"
    assert dict(current_tags()) == {}


async def test_decorator_on_async_function() -> None:
    """An async function decorated with @with_tags sees the tags while it runs, not after."""

    @with_tags(feature="chat")
    async def work(x: int) -> tuple[int, dict[str, str]]:
        await asyncio.sleep(0)
        return x + 1, dict(current_tags())

    assert await work(1) == (2, {"feature": "chat"})
    assert asyncio.iscoroutinefunction(work)
    assert dict(current_tags()) == {}


async def test_decorator_on_an_object_with_an_async_call() -> None:
    """An object whose `__call__` is async (and a partial of one) is decorated as async: its body
    sees the tags when it is awaited, and the caller's tags are back after."""
    import functools

    class Handler:
        async def __call__(self, x: int) -> tuple[int, dict[str, str]]:
            await asyncio.sleep(0)
            return x, dict(current_tags())

    async def work(x: int) -> tuple[int, dict[str, str]]:
        await asyncio.sleep(0)
        return x, dict(current_tags())

    handler = with_tags(feature="handler")(Handler())
    partial = with_tags(feature="partial")(functools.partial(work, 5))
    assert asyncio.iscoroutinefunction(handler) and asyncio.iscoroutinefunction(partial)
    assert await handler(4) == (4, {"feature": "handler"})
    assert await partial() == (5, {"feature": "partial"})
    assert dict(current_tags()) == {}

    class Stream:
        def __call__(self) -> Iterator[int]:
            yield 1

    with pytest.raises(TypeError, match="generator"):
        with_tags(feature="stream")(Stream())


def test_decorated_function_can_be_reentered() -> None:
    """A decorated function that calls itself keeps its scope and restores cleanly."""

    @with_tags(depth="x")
    def recurse(n: int) -> int:
        assert current_tags()["depth"] == "x"
        return 0 if n == 0 else 1 + recurse(n - 1)

    assert recurse(3) == 3
    assert dict(current_tags()) == {}


def test_same_instance_entered_twice_nested() -> None:
    """One with_tags object used as nested context manager restores each level correctly."""
    scope = with_tags(a="1")
    with with_tags(b="2"):
        with scope:
            with scope:
                assert dict(current_tags()) == {"a": "1", "b": "2"}
            assert dict(current_tags()) == {"a": "1", "b": "2"}
        assert dict(current_tags()) == {"b": "2"}
    assert dict(current_tags()) == {}


def test_nested_scopes_merge_and_inner_wins() -> None:
    """Nested scopes merge; on a shared key the inner value wins, and exiting restores the outer."""
    with with_tags(user_id="1", feature="chat"):
        with with_tags(feature="search", team="core"):
            assert dict(current_tags()) == {"user_id": "1", "feature": "search", "team": "core"}
        assert dict(current_tags()) == {"user_id": "1", "feature": "chat"}
    assert dict(current_tags()) == {}


def test_previous_state_restored_after_exception() -> None:
    """An exception escaping a scope still restores the tags that were in effect before it."""
    with with_tags(user_id="1"):
        with pytest.raises(RuntimeError, match="boom"), with_tags(user_id="2", extra="x"):
            raise RuntimeError("boom")
        assert dict(current_tags()) == {"user_id": "1"}
    assert dict(current_tags()) == {}


async def test_previous_state_restored_after_exception_in_decorated_async_function() -> None:
    """An exception from a decorated async function restores the caller's tags."""

    @with_tags(feature="fails")
    async def fail() -> None:
        raise KeyError("x")

    async with with_tags(user_id="9"):
        with pytest.raises(KeyError):
            await fail()
        assert dict(current_tags()) == {"user_id": "9"}


def test_previous_state_restored_after_exception_in_decorated_sync_function() -> None:
    """An exception from a decorated sync function restores the caller's tags."""

    @with_tags(feature="fails")
    def fail() -> None:
        raise ValueError("x")

    with pytest.raises(ValueError, match="x"):
        fail()
    assert dict(current_tags()) == {}


def test_current_tags_is_read_only() -> None:
    """The mapping returned by current_tags() cannot be modified, inside or outside a scope."""
    with pytest.raises(TypeError):
        current_tags()["x"] = "y"  # type: ignore[index]
    with with_tags(user_id="1"):
        tags = current_tags()
        with pytest.raises(TypeError):
            tags["user_id"] = "2"  # type: ignore[index]
        with pytest.raises(TypeError):
            del tags["user_id"]  # type: ignore[attr-defined]
        assert dict(current_tags()) == {"user_id": "1"}


def test_mapping_returned_earlier_does_not_change_when_scopes_change() -> None:
    """A mapping obtained from current_tags() is a snapshot: later scopes do not mutate it."""
    with with_tags(a="1"):
        outer = current_tags()
        with with_tags(a="2", b="3"):
            pass
        assert dict(outer) == {"a": "1"}


async def test_tags_survive_create_task() -> None:
    """A task created inside a scope sees the creator's tags, even after the creator's scope ended."""
    started = asyncio.Event()
    release = asyncio.Event()
    seen: list[dict[str, str]] = []

    async def child() -> None:
        started.set()
        await release.wait()
        seen.append(dict(current_tags()))

    with with_tags(user_id="1"):
        task = asyncio.create_task(child())
    await started.wait()
    release.set()
    await task
    assert seen == [{"user_id": "1"}]


async def test_changes_inside_task_do_not_leak_back() -> None:
    """with_tags inside a child task (even one never exited) does not change the parent's tags."""

    async def child() -> dict[str, str]:
        with_tags(leak="yes").__enter__()  # never exited on purpose
        async with with_tags(user_id="child"):
            return dict(current_tags())

    async with with_tags(user_id="parent"):
        inner = await asyncio.create_task(child())
        assert dict(current_tags()) == {"user_id": "parent"}
    assert inner == {"user_id": "child", "leak": "yes"}
    assert dict(current_tags()) == {}


async def test_concurrent_tasks_keep_their_own_tags() -> None:
    """Many interleaving tasks each keep their own tags across awaits."""

    async def worker(i: int) -> bool:
        async with with_tags(user_id=str(i)):
            for _ in range(5):
                await asyncio.sleep(0)
                if current_tags()["user_id"] != str(i):
                    return False
        return dict(current_tags()) == {}

    assert all(await asyncio.gather(*(worker(i) for i in range(100))))


async def test_tags_survive_to_thread() -> None:
    """A function run with asyncio.to_thread sees the caller's tags in another thread."""
    main_thread = threading.get_ident()

    def in_thread() -> tuple[dict[str, str], bool]:
        with with_tags(inner="t"):
            pass
        return dict(current_tags()), threading.get_ident() != main_thread

    async with with_tags(user_id="5"):
        tags, other_thread = await asyncio.to_thread(in_thread)
        assert dict(current_tags()) == {"user_id": "5"}
    assert tags == {"user_id": "5"}
    assert other_thread


async def test_changes_inside_to_thread_do_not_leak_back() -> None:
    """A scope entered (and left open) in a to_thread function does not reach the caller."""

    def in_thread() -> None:
        with_tags(leak="yes").__enter__()

    async with with_tags(user_id="5"):
        await asyncio.to_thread(in_thread)
        assert dict(current_tags()) == {"user_id": "5"}


@pytest.mark.parametrize(
    "key",
    ["a b", "", "k" * 65, "é", "a/b", "a:b", "semi;colon", "new\nline"],
    ids=["space", "empty", "65-chars", "non-ascii", "slash", "colon", "semicolon", "newline"],
)
def test_bad_key_raises_value_error_naming_it_at_with_tags(key: str) -> None:
    """A key outside [A-Za-z0-9_.-]{1,64} raises ValueError at with_tags() naming the key."""
    with pytest.raises(ValueError) as info:
        with_tags(**{key: "v"})
    assert repr(key) in str(info.value)
    assert dict(current_tags()) == {}


@pytest.mark.parametrize("key", ["a", "A-Z_0.9", "k" * 64, "user.id", "tenant-id"])
def test_good_keys_are_accepted(key: str) -> None:
    """Keys of 1 to 64 characters from [A-Za-z0-9_.-] are accepted as given."""
    with with_tags(**{key: "v"}):
        assert dict(current_tags()) == {key: "v"}


def test_more_than_50_tags_raise() -> None:
    """51 tags in one with_tags raise ValueError; 50 are accepted."""
    with with_tags(**{f"k{i}": "v" for i in range(50)}):
        assert len(current_tags()) == 50
    with pytest.raises(ValueError, match="50"):
        with_tags(**{f"k{i}": "v" for i in range(51)})


def test_more_than_50_tags_across_nested_scopes_raise() -> None:
    """Nesting that would hold more than 50 tags raises ValueError and leaves the outer tags intact."""
    with with_tags(**{f"a{i}": "v" for i in range(30)}):
        inner = with_tags(**{f"b{i}": "v" for i in range(30)})
        with pytest.raises(ValueError, match="50"), inner:
            pass
        assert len(current_tags()) == 30
    assert dict(current_tags()) == {}


def test_value_truncated_to_256_bytes() -> None:
    """An ASCII value longer than 256 bytes is cut to its first 256 characters."""
    with with_tags(note="x" * 1000):
        assert current_tags()["note"] == "x" * 256


def test_value_of_exactly_256_bytes_is_kept() -> None:
    """A value of exactly 256 UTF-8 bytes is stored unchanged."""
    value = "é" * 128  # 2 bytes each
    with with_tags(note=value):
        assert current_tags()["note"] == value


@pytest.mark.parametrize(
    "value",
    ["a" + "é" * 200, "€" * 100, "ab" + "😀" * 100, "x" * 255 + "é", "😀" * 64 + "é"],
    ids=["2-byte-odd", "3-byte", "4-byte", "boundary-2-byte", "65-chars-over"],
)
def test_value_truncation_never_splits_a_multibyte_character(value: str) -> None:
    """Truncation to 256 bytes keeps whole characters: a valid prefix of the value, as long as fits."""
    with with_tags(note=value):
        stored = current_tags()["note"]
    encoded = stored.encode("utf-8")
    assert len(encoded) <= 256
    assert value.startswith(stored)
    next_char = value[len(stored)]
    assert len(encoded) + len(next_char.encode("utf-8")) > 256


def test_short_multibyte_value_kept_whole() -> None:
    """A multi-byte value well under 256 bytes is not changed."""
    with with_tags(city="Zürich 東京 😀"):
        assert current_tags()["city"] == "Zürich 東京 😀"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(42, "42"), (1.5, "1.5"), (True, "True"), (0, "0")],
)
def test_non_string_values_are_stored_as_strings(value: object, expected: str) -> None:
    """Non-str values are converted with str()."""
    with with_tags(v=value):
        assert current_tags()["v"] == expected


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")


def _function() -> None:
    pass


@pytest.mark.parametrize(
    "value",
    [b"abc", bytearray(b"abc"), object(), _function, "".join, (i for i in ()), _Unprintable(), 10**5000],
    ids=["bytes", "bytearray", "object", "function", "method", "generator", "str-raises", "int-5000-digits"],
)
def test_values_whose_string_is_no_value_are_refused_naming_the_key(value: object) -> None:
    """Bytes ("b'abc'"), objects, functions, methods and generators whose string is their address
    ("<function f at 0x...>": a new value, and per-tag budget window, for every object), and values
    without a string raise ValueError naming the key instead of being stored so."""
    with (
        pytest.raises(ValueError, match=r"tag 'user_id' (must be a string, or a value with a string|has no)"),
        with_tags(user_id=value),
    ):
        pass
    with with_tags(api_key=b"secret"):  # a secret's value is never stored: nothing to refuse
        assert current_tags()["api_key"] == "[REDACTED]"


@pytest.mark.parametrize(
    "key",
    [
        "api_key", "Authorization", "password", "client_secret", "access_token", "OPENAI_API_KEY",
        "x-api-key", "accessToken", "clientSecret", "openaiApiKey", "APIKey", "refreshToken",
    ],
)  # fmt: skip
def test_secret_looking_keys_are_redacted(key: str) -> None:
    """A key that looks like a secret keeps the key but its value becomes "[REDACTED]"."""
    with with_tags(**{key: "sk-live-123456"}):
        assert current_tags()[key] == "[REDACTED]"
        assert "sk-live-123456" not in repr(dict(current_tags()))


def test_ordinary_keys_are_not_redacted() -> None:
    """Keys that do not look like secrets keep their values."""
    with with_tags(user_id="42", feature="chat", model="gpt-4o"):
        assert dict(current_tags()) == {"user_id": "42", "feature": "chat", "model": "gpt-4o"}


def test_none_removes_a_key_in_an_inner_scope() -> None:
    """A value of None removes the key inside the inner scope; it comes back after."""
    with with_tags(user_id="1", feature="chat"):
        with with_tags(user_id=None):
            assert dict(current_tags()) == {"feature": "chat"}
        assert dict(current_tags()) == {"user_id": "1", "feature": "chat"}


def test_none_for_an_absent_key_is_harmless() -> None:
    """Removing a key that is not set leaves the tags empty, not holding None."""
    with with_tags(missing=None):
        assert dict(current_tags()) == {}


async def test_one_with_tags_object_shared_by_concurrent_tasks() -> None:
    """A with_tags object kept at module level and entered by many tasks at once works in each task."""
    chat_scope = with_tags(feature="chat")

    async def handler(i: int) -> dict[str, str]:
        async with with_tags(user_id=str(i)), chat_scope:
            await asyncio.sleep(0.001 * (i % 3))
            inside = dict(current_tags())
        assert dict(current_tags()) == {}
        return inside

    results = await asyncio.gather(*(handler(i) for i in range(10)), return_exceptions=True)
    assert results == [{"user_id": str(i), "feature": "chat"} for i in range(10)]


def test_one_with_tags_object_shared_by_threads() -> None:
    """A with_tags object entered in several threads at once restores each thread's own tags."""
    shared = with_tags(feature="batch")
    barrier = threading.Barrier(4)
    results: list[object] = []

    def worker(i: int) -> None:
        try:
            with with_tags(worker=str(i)):
                with shared:
                    barrier.wait(timeout=10)
                    inside = dict(current_tags())
                    barrier.wait(timeout=10)
                results.append((inside, dict(current_tags())))
        except Exception as exc:  # reported through results
            results.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(map(repr, results)) == sorted(
        repr(({"worker": str(i), "feature": "batch"}, {"worker": str(i)})) for i in range(4)
    )


def test_token_count_keys_are_not_mistaken_for_secrets() -> None:
    """Only whole secret words redact: `max_tokens` and `tokenizer` keep their values, `x-api-key` not."""
    with with_tags(max_tokens=512, maxTokens=512, tokenizer="o200k", **{"x-api-key": "sk-1"}) as tags:
        assert tags["max_tokens"] == tags["maxTokens"] == "512"
        assert tags["tokenizer"] == "o200k"
        assert tags["x-api-key"] == "[REDACTED]"


def test_a_key_is_checked_as_a_str_even_once_known() -> None:
    """A key equal to a known plain key but not a str is refused, as before it was known; an
    unhashable one gets the same ValueError."""

    class Lookalike:
        def __hash__(self) -> int:
            return hash("user_id")

        def __eq__(self, other: object) -> bool:
            return other == "user_id"

    with with_tags(user_id="1"):  # "user_id" is now a known plain key
        pass
    for key in (Lookalike(), ("user_id",)):
        with pytest.raises(ValueError, match="tag key"):
            normalize_tags({key: "1"})  # type: ignore[dict-item]


def test_leaving_a_scope_in_a_context_that_did_not_enter_it_raises() -> None:
    """Leaving a `with_tags` scope in a context where it was never entered is an error at once, and
    the context stays usable."""
    scope = with_tags(feature="chat")
    context = contextvars.copy_context()
    with pytest.raises(RuntimeError, match="did not enter"):
        context.run(scope.__exit__, None, None, None)
    assert context.run(current_tags) == {}


def test_decorating_a_generator_is_refused() -> None:
    """A generator's body runs in its consumer's context, so decorating one raises TypeError."""

    def numbers() -> Iterator[int]:
        yield 1

    async def chunks() -> AsyncIterator[bytes]:
        yield b"x"

    with pytest.raises(TypeError, match="numbers"):
        with_tags(a="1")(numbers)
    with pytest.raises(TypeError, match="chunks"):
        with_tags(a="1")(chunks)


def test_decorating_something_not_callable_is_refused() -> None:
    """`with_tags(...)(5)` raises at once, not when the result is first called."""
    with pytest.raises(TypeError, match="with_tags decorates functions, got 5"):
        with_tags(a="1")(5)  # type: ignore[type-var]
