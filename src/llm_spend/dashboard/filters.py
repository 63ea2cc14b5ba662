"""The dashboard's query-string filters, validated: a bad value is a 400 page, never a query.

?from=2026-11-01&to=2026-11-30        whole days in the tracker's time zone, both included
&model=gpt-4o&provider=openai         exact matches
&tag=user_id=42&tag=feature=chat      tag filters (all must match)
&issue=unknown_price                  one data-quality issue (see queries.ISSUES)
&key=user_id                          the tag key the tags page breaks down
&page=2                               the calls table's page
&kept=tag%3Dnote%253Da%250Ab          what a form cannot carry: a model, provider or tag filter
                                      whose value holds a line break (a form's text field strips
                                      it, a hidden one rewrites it as CR LF), as a query string;
                                      the form's own fields win over it
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode
from zoneinfo import ZoneInfo

from ..budgets import window_bounds
from ..context import MAX_TAGS
from .queries import ISSUES, NOT_TAG_KEYS

__all__ = ["MAX_DAYS", "BadFilter", "Filters", "parse_filters"]

MAX_DAYS = 366
DEFAULT_DAYS = 30
MAX_PAGE = 10_000
MAX_TAG_FILTERS = MAX_TAGS  # a call's every tag can be a filter: the calls table links to each
_TAG_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_RESERVED = ("model", "provider")  # report keys that name columns, not tags
_DIGITS = re.compile(r"[0-9]{1,8}")
_KEPT = ("model", "provider", "tag")
"""The filters a form may carry in `kept`."""
_MAX_KEPT = 32_768


def _breaks(value: str) -> bool:
    """Whether a form's field would change `value`: a text field strips line breaks, and a
    submitted form rewrites each one as CR LF."""
    return "\n" in value or "\r" in value


class BadFilter(ValueError):
    """A query-string value the dashboard refuses (answered with a 400 page naming it)."""


@dataclass(frozen=True, slots=True)
class Filters:
    """What the page shows: a range of local days, and optional narrowing."""

    first: date
    last: date
    tz: ZoneInfo
    model: str | None = None
    provider: str | None = None
    tags: tuple[tuple[str, str], ...] = ()
    issue: str | None = None
    key: str | None = None
    page: int = 1

    @property
    def days(self) -> int:
        return (self.last - self.first).days + 1

    @property
    def start(self) -> datetime:
        """The first day's start, as an aware UTC datetime."""
        return _day_start(self.first, self.tz)

    @property
    def end(self) -> datetime:
        """The end of the last day (exclusive), as an aware UTC datetime."""
        return _day_start(self.last + timedelta(days=1), self.tz)

    def where(self) -> dict[str, str]:
        """The report API's `where` for these filters."""
        found = dict(self.tags)
        if self.model:
            found["model"] = self.model
        if self.provider:
            found["provider"] = self.provider
        return found

    def previous(self) -> Filters:
        """The same filters over the period of equal length just before."""
        return replace(
            self, first=self.first - timedelta(days=self.days), last=self.first - timedelta(days=1)
        )

    def chips(self) -> list[tuple[str, str]]:
        """The narrowing filters in force, each with the query string that drops it."""
        found = [(f"{name} = {getattr(self, name)}", self.query(**{name: None, "page": None}))
                 for name in ("model", "provider", "issue") if getattr(self, name)]  # fmt: skip
        for key, value in self.tags:
            rest = [f"{k}={v}" for k, v in self.tags if k != key]
            found.append((f"{key} = {value}", self.query(tag=rest, page=None)))
        return found

    def with_tag(self, key: str, value: str) -> list[str]:
        """The tag filters with `key` set to `value`, as `tag` query values."""
        tags = {**dict(self.tags), key: value}
        return [f"{k}={v}" for k, v in sorted(tags.items())]

    def hidden(self) -> list[tuple[str, str]]:
        """The narrowing filters as (name, value) pairs, for hidden inputs of a range form (those
        whose values hold a line break in one `kept` pair)."""
        pairs = [(name, getattr(self, name)) for name in ("model", "provider", "issue", "key")]
        found = [(n, v) for n, v in pairs if v] + [("tag", f"{k}={v}") for k, v in self.tags]
        kept = self.kept()
        return [(n, v) for n, v in found if not _breaks(v)] + ([("kept", kept)] if kept else [])

    def kept(self) -> str:
        """The model, provider and tag filters whose values hold a line break, as a query string
        for a form's hidden `kept` input ("" when there are none): a field of their own would
        change them."""
        pairs = [("model", self.model), ("provider", self.provider)]
        pairs += [("tag", f"{k}={v}") for k, v in self.tags]
        return urlencode([(n, v) for n, v in pairs if v and _breaks(v)])

    def editable(self, value: str | None) -> str:
        """`value` for a form's text field: "" when the field could not carry it (then `kept` does)."""
        return "" if value is None or _breaks(value) else value

    def query(self, **changes: Any) -> str:
        """This filter as a query string, with `changes` applied (None drops a field)."""
        fields: dict[str, Any] = {
            "from": self.first.isoformat(),
            "to": self.last.isoformat(),
            "model": self.model,
            "provider": self.provider,
            "tag": [f"{k}={v}" for k, v in self.tags],
            "issue": self.issue,
            "key": self.key,
            "page": self.page if self.page > 1 else None,
        }
        fields.update(changes)
        pairs = []
        for name, value in fields.items():
            for item in value if isinstance(value, list | tuple) else [value]:
                if item is not None and item != "":
                    pairs.append((name, str(item)))
        return urlencode(pairs)


def _day_start(day: date, tz: ZoneInfo) -> datetime:
    return window_bounds("day", datetime(day.year, day.month, day.day, 12, tzinfo=tz), tz)[0]


def parse_filters(params: Any, tz: ZoneInfo, today: date) -> Filters:
    """Filters from a request's query parameters (a Starlette QueryParams or a mapping)."""
    kept = _text(params, "kept", _MAX_KEPT)
    if kept is not None:
        params = _Merged(params, kept)
    last = _date(params, "to") or today
    first = _date(params, "from") or last - timedelta(days=DEFAULT_DAYS - 1)
    if first > last:
        raise BadFilter(f"from ({first}) must not be after to ({last})")
    if (last - first).days + 1 > MAX_DAYS:
        raise BadFilter(f"the range from {first} to {last} is longer than {MAX_DAYS} days")
    issue = _text(params, "issue", 32)
    if issue is not None and issue not in ISSUES:
        raise BadFilter(f"issue must be one of {', '.join(ISSUES)}, got {issue!r}")
    key = _text(params, "key", 64)
    if key is not None and (not _TAG_KEY.fullmatch(key) or key in NOT_TAG_KEYS):
        raise BadFilter(f"key {key!r} is not a tag key the report can group by (letters, digits, _ . -)")
    return Filters(
        first=first,
        last=last,
        tz=tz,
        model=_text(params, "model", 200),
        provider=_text(params, "provider", 64),
        tags=_tags(params),
        issue=issue,
        key=key,
        page=_page(params),
    )


class _Merged:
    """A form's parameters with its `kept` filters: a field the form gives itself wins (a model,
    a provider, a tag key), and the kept ones fill in the rest."""

    def __init__(self, params: Any, kept: str) -> None:
        try:
            pairs = parse_qsl(kept, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise BadFilter("kept must be a query string of model, provider and tag filters") from None
        if any(name not in _KEPT for name, _ in pairs):
            raise BadFilter(f"kept holds {', '.join(sorted({n for n, _ in pairs} - set(_KEPT)))}: "
                            "only model, provider and tag filters may be kept")  # fmt: skip
        self._params, self._kept = params, pairs

    def getlist(self, name: str) -> list[str]:
        own = [v for v in _values(self._params, name) if v.strip()]
        kept = [v for n, v in self._kept if n == name]
        if name == "tag":
            keys = {v.partition("=")[0] for v in own}
            return own + [v for v in kept if v.partition("=")[0] not in keys]
        return own if own or name not in _KEPT else kept


def _values(params: Any, name: str) -> list[str]:
    if hasattr(params, "getlist"):
        return [str(v) for v in params.getlist(name)]
    value = params.get(name) if isinstance(params, Mapping) else None
    return [] if value is None else [str(value)]


def _text(params: Any, name: str, limit: int) -> str | None:
    values = [v for v in _values(params, name) if v.strip()]
    if not values:
        return None
    if len(values) > 1:
        raise BadFilter(f"{name} is given {len(values)} times; give it once")
    if len(values[0]) > limit:
        raise BadFilter(f"{name} is longer than {limit} characters")
    if "\x00" in values[0]:  # only NUL: a call holds tabs and newlines, and its page links to them
        raise BadFilter(f"{name} contains a NUL character, which no call holds")
    return values[0]


_DAY = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)


def _date(params: Any, name: str) -> date | None:
    text = _text(params, name, 10)
    if text is None:
        return None
    try:
        if not _DAY.fullmatch(text):  # fromisoformat takes 20261130 and 2026-W48-1 too
            raise ValueError(text)
        day = date.fromisoformat(text)
    except ValueError:
        raise BadFilter(f"{name} must be a date such as 2026-11-30, got {text!r}") from None
    if not 1970 <= day.year <= 9000:
        raise BadFilter(f"{name} ({day}) is out of range")
    return day


def _tags(params: Any) -> tuple[tuple[str, str], ...]:
    pairs = [v for v in _values(params, "tag") if v.strip()]
    if len(pairs) > MAX_TAG_FILTERS:
        raise BadFilter(f"at most {MAX_TAG_FILTERS} tag filters, got {len(pairs)}")
    found: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not _TAG_KEY.fullmatch(key):
            raise BadFilter(f"tag filter {pair[:80]!r} must be KEY=VALUE with a tag key")
        if key in _RESERVED:
            raise BadFilter(f"{key!r} is not filtered as a tag here; use the {key} field")
        if len(value) > 300:
            raise BadFilter(f"the value of tag filter {key!r} is longer than 300 characters")
        if "\x00" in value:
            raise BadFilter(f"the value of tag filter {key!r} contains a NUL character, which no call holds")
        if key in found and found[key] != value:
            raise BadFilter(f"tag {key!r} is filtered on two values; no call has both")
        found[key] = value
    return tuple(sorted(found.items()))


def _page(params: Any) -> int:
    text = _text(params, "page", 8)
    if text is None:
        return 1
    if not _DIGITS.fullmatch(text) or not 1 <= int(text) <= MAX_PAGE:
        raise BadFilter(f"page must be a whole number from 1 to {MAX_PAGE}, got {text!r}")
    return int(text)
