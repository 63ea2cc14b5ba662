"""Price layers above genai-prices: overrides given in Python, and a prices file on disk.

Both map a model to flat rates in USD per 1M tokens::

    # prices.yaml (or the same as JSON)
    openai/gpt-4o-mini:            # "provider/model", or a bare "model" for any provider
      input: 0.15
      output: 0.60
      cache_read: 0.075            # optional; default: input
    my-finetune:
      input: 3
      output: 12
      cache_write: 3.75            # optional; default: input (5-minute writes)
      cache_write_1h: 6            # optional; default: cache_write

A key matches the model id as called and its dated snapshots (gpt-4o-mini-2024-07-18, claude-3-5-
sonnet-20241022, gpt-3.5-turbo-0125): the model as called before its base name, and at each, a
provider-qualified key before a bare one. Keys are not case-sensitive. Reasoning tokens are
output. Flat rates know no tiers, service tiers or batch prices.
A malformed table is a `PricesFileError` naming the file, the key and the problem.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from .context import storable
from .exceptions import PricesFileError
from .money import usd
from .usage import Usage

__all__ = ["PriceTable", "PricesFile", "Rates", "base_model", "parse_rates"]

logger = logging.getLogger("llm_spend")

FIELDS = ("input", "output", "cache_read", "cache_write", "cache_write_1h")
_MILLION = Decimal(1_000_000)
_DATED = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4})$")


def base_model(model: str) -> str:
    """The model id without a dated-snapshot suffix: gpt-4o-mini-2024-07-18 -> gpt-4o-mini,
    claude-3-5-sonnet-20241022 -> claude-3-5-sonnet, gpt-3.5-turbo-0125 -> gpt-3.5-turbo."""
    return _DATED.sub("", model)


@dataclass(frozen=True, slots=True)
class Rates:
    """Flat rates in USD per 1M tokens."""

    input: Decimal
    output: Decimal
    cache_read: Decimal | None = None
    cache_write: Decimal | None = None
    cache_write_1h: Decimal | None = None

    def cost(self, usage: Usage) -> Decimal:
        """USD for `usage` (canonical: input includes cache reads and writes)."""
        read = self.cache_read if self.cache_read is not None else self.input
        write = self.cache_write if self.cache_write is not None else self.input
        write_1h = self.cache_write_1h if self.cache_write_1h is not None else write
        fresh = usage.input_tokens - usage.cache_read_tokens - usage.cache_write_tokens
        write_5m = usage.cache_write_tokens - usage.cache_write_1h_tokens
        total = fresh * self.input + usage.cache_read_tokens * read + write_5m * write
        total += usage.cache_write_1h_tokens * write_1h + usage.output_tokens * self.output
        return total / _MILLION

    def bound(self, input_tokens: int, output_tokens: int) -> Decimal:
        """An upper bound: every input token at the highest input-side rate."""
        highest = max(
            r for r in (self.input, self.cache_read, self.cache_write, self.cache_write_1h) if r is not None
        )
        return (input_tokens * highest + output_tokens * self.output) / _MILLION

    def per_million(self) -> dict[str, Decimal]:
        """The rates as shown by `llm-spend prices explain`, defaults filled in."""
        write = self.cache_write if self.cache_write is not None else self.input
        return {
            "input": self.input,
            "cache_read": self.cache_read if self.cache_read is not None else self.input,
            "cache_write": write,
            "cache_write_1h": self.cache_write_1h if self.cache_write_1h is not None else write,
            "output": self.output,
        }


MAX_RATE = Decimal(1_000_000)
"""USD per 1M tokens: far above any model's, and low enough that a call's cost (at most 10^9 tokens
per count) stays inside the ledger's 64-bit nano-USD."""

SOURCE_MAX = 300
"""Characters of `llm_calls.price_source`."""


def stamp(source: str) -> str:
    """A price source the ledger can store: no NUL or lone surrogate, at most SOURCE_MAX characters
    (a long one keeps its start and its end, where a prices file's hash is)."""
    text = storable(source)
    if len(text) <= SOURCE_MAX:
        return text
    return f"{text[:100]}…{text[len(text) - (SOURCE_MAX - 101) :]}"


def parse_rates(table: object, origin: str) -> dict[str, Rates]:
    """Validate a {model key: {field: USD per 1M}} table; PricesFileError names origin, key, problem."""
    if not isinstance(table, Mapping):
        raise PricesFileError(
            origin, None, f"must be a mapping of model to rates, got {type(table).__name__}"
        )
    parsed: dict[str, Rates] = {}
    spelled: dict[str, str] = {}
    for key, fields in table.items():
        if not isinstance(key, str) or not all(part.strip() for part in key.split("/")):
            raise PricesFileError(origin, key, "a key must be 'model' or 'provider/model'")  # no empty part
        if (other := spelled.setdefault(key.lower(), key)) != key:
            raise PricesFileError(origin, key, f"the same key as {other!r} (keys are not case-sensitive)")
        if not isinstance(fields, Mapping):
            raise PricesFileError(origin, key, f"rates must be a mapping, got {type(fields).__name__}")
        unknown = sorted(set(map(str, fields)) - set(FIELDS))
        if unknown:
            raise PricesFileError(origin, key, f"unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
        for required in ("input", "output"):
            if required not in fields:
                raise PricesFileError(origin, key, f"missing required field {required!r}")
        try:
            values = {name: usd(value, field=name) for name, value in fields.items()}
        except ValueError as exc:
            raise PricesFileError(origin, key, str(exc)) from None
        for name, value in values.items():
            if value > MAX_RATE:
                raise PricesFileError(
                    origin, key, f"{name} must be at most {MAX_RATE:,} USD per 1M tokens, got {value}"
                )
        parsed[key.lower()] = Rates(**values)
    return parsed


class PriceTable:
    """One layer: model keys to rates, and the `source` stamped on rows it prices."""

    def __init__(self, rates: Mapping[str, Rates], source: str) -> None:
        self.rates = dict(rates)
        self.source = stamp(source)

    def lookup(self, provider: str, model: str) -> tuple[str, Rates] | None:
        """This call's entry: provider-qualified first, then bare; the model as called, then its base."""
        provider, model = provider.lower(), model.lower()
        for name in dict.fromkeys((model, base_model(model))):
            for key in (f"{provider}/{name}", name):
                rates = self.rates.get(key)
                if rates is not None:
                    return key, rates
        return None


class PricesFile:
    """A prices file, reloaded when it changes on disk (checked at most once a second).

    Loading at construction raises PricesFileError; a bad edit later keeps the previous table and
    logs the error (naming the file and the problem), so pricing never silently falls back.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._checked = 0.0
        self._stamp = self._stat()
        self.table = self._load()

    def current(self) -> PriceTable:
        now = time.monotonic()
        if now - self._checked >= 1.0:
            self._checked = now
            stamp = self._stat()
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self.table = self._load()
                    logger.warning("llm-spend: reloaded prices file %s", self.path)
                except PricesFileError as exc:
                    logger.error("llm-spend: %s; keeping the previous prices", exc)
        return self.table

    def _stat(self) -> tuple[int, int] | None:
        try:
            info = self.path.stat()
        except OSError:
            return None
        return info.st_mtime_ns, info.st_size

    def _load(self) -> PriceTable:
        origin = str(self.path)
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise PricesFileError(origin, None, f"cannot be read: {exc.strerror or exc}") from None
        data = _decode(raw, self.path, origin)
        digest = hashlib.sha256(raw).hexdigest()[:12]
        return PriceTable(parse_rates(data, origin), f"file {origin} sha256:{digest}")


def _decode(raw: bytes, path: Path, origin: str) -> Any:
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise PricesFileError(origin, None, "is YAML: install PyYAML (pip install pyyaml)") from None
        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError as exc:  # one line: PyYAML's own message spans five
            mark = getattr(exc, "problem_mark", None)
            where = "" if mark is None else f" (line {mark.line + 1}, column {mark.column + 1})"
            what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise PricesFileError(origin, None, f"is not valid YAML: {what}{where}") from None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise PricesFileError(origin, None, f"is not valid JSON: {exc}") from None
