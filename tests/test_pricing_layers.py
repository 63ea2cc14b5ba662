"""Price layers: overrides > prices file > genai-prices; fallback prices; validation; reload; explain."""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from llm_spend import Tracker, Usage
from llm_spend.cli import main
from llm_spend.exceptions import PricesFileError
from llm_spend.pricing import Pricer

AT = datetime(2026, 11, 1, tzinfo=UTC)
USAGE = Usage(input_tokens=1_000_000, output_tokens=100_000, cache_read_tokens=200_000)


def write(path: Path, table: object) -> Path:
    path.write_text(json.dumps(table))
    return path


def test_precedence_override_then_file_then_genai_prices(tmp_path: Path) -> None:
    """An override beats the file, the file beats genai-prices, each row says which priced it."""
    prices = write(
        tmp_path / "p.json",
        {"openai/gpt-4o-mini": {"input": 1, "output": 2}, "gpt-4o": {"input": 3, "output": 4}},
    )
    pricer = Pricer(price_overrides={"gpt-4o": {"input": 5, "output": 6}}, prices_file=prices)
    mini = pricer.price("openai", "gpt-4o-mini-2024-07-18", USAGE, at=AT)
    assert (
        mini.amount == Decimal("1.2")
        and mini.source is not None
        and mini.source.startswith(f"file {prices} sha256:")
    )
    assert mini.model_id == "openai/gpt-4o-mini"
    big = pricer.price("openai", "gpt-4o", USAGE, at=AT)
    assert big.amount == Decimal("5.6") and big.source == "override"
    other = pricer.price("openai", "gpt-4.1", USAGE, at=AT)
    assert other.source is not None and other.source.startswith("genai-prices")


def test_a_key_matches_snapshots_with_a_four_digit_suffix_too() -> None:
    """OpenAI's older snapshots end in -MMDD (gpt-3.5-turbo-0125): a key for the model prices them
    (genai-prices did, at its own rate); the name as called is tried before its base."""
    pricer = Pricer(
        price_overrides={"gpt-3.5-turbo": {"input": 1, "output": 1}, "gpt-4-0613": {"input": 7, "output": 7}}
    )
    usage = Usage(input_tokens=1_000_000, output_tokens=0)
    snapshot = pricer.price("openai", "gpt-3.5-turbo-0125", usage, at=AT)
    assert (snapshot.amount, snapshot.source, snapshot.model_id) == (Decimal(1), "override", "gpt-3.5-turbo")
    exact = pricer.price("openai", "gpt-4-0613", usage, at=AT)
    assert (exact.amount, exact.model_id) == (Decimal(7), "gpt-4-0613")


def test_flat_rates_apply_cache_buckets(tmp_path: Path) -> None:
    """Cache reads, 5-minute and 1-hour writes each take their own rate; absent rates default to input."""
    pricer = Pricer(
        price_overrides={
            "anthropic/my-claude": {
                "input": 3,
                "output": 15,
                "cache_read": "0.3",
                "cache_write": "3.75",
                "cache_write_1h": 6,
            }
        }
    )
    usage = Usage(input_tokens=10_000, output_tokens=1_000, cache_read_tokens=4_000, cache_write_tokens=3_000,
                  cache_write_1h_tokens=1_000)  # fmt: skip
    cost = pricer.price("anthropic", "my-claude", usage, at=AT)
    expected = (
        3_000 * 3 + 4_000 * Decimal("0.3") + 2_000 * Decimal("3.75") + 1_000 * 6 + 1_000 * 15
    ) / 1_000_000
    assert cost.amount == expected
    assert pricer.bound("anthropic", "my-claude", input_tokens=10_000, output_tokens=1_000, at=AT).amount == (
        Decimal(10_000 * 6 + 1_000 * 15) / 1_000_000
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('["a"]', "must be a mapping"),
        ('{"m": {"input": 1}}', "missing required field 'output'"),
        ('{"m": {"input": 1, "output": -2}}', "output"),
        ('{"m": {"input": "abc", "output": 2}}', "input"),
        ('{"m": {"input": 1, "output": 2, "reasoning": 3}}', "unknown field 'reasoning'"),
        ('{"m": 3}', "rates must be a mapping"),
        ('{"m": {"input": "1e13", "output": 2}}', "input must be at most 1,000,000 USD per 1M tokens"),
        ('{"m": {"input": 1, "output": "1E+999999"}}', "output must be at most 1,000,000 USD per 1M tokens"),
        ('{"openai/": {"input": 1, "output": 2}}', "'openai/': a key must be 'model' or 'provider/model'"),
        ('{"/gpt-4o": {"input": 1, "output": 2}}', "'/gpt-4o': a key must be 'model' or 'provider/model'"),
        ('{"a/b/": {"input": 1, "output": 2}}', "'a/b/': a key must be 'model' or 'provider/model'"),
        (
            '{"GPT-4o": {"input": 1, "output": 2}, "gpt-4o": {"input": 5, "output": 5}}',
            "'gpt-4o': the same key as 'GPT-4o' (keys are not case-sensitive)",
        ),
    ],
    ids=[
        "json",
        "not-mapping",
        "missing",
        "negative",
        "non-numeric",
        "unknown-field",
        "not-rates",
        "huge",
        "huger",
        "no-model",
        "no-provider",
        "empty-part",
        "same-key-in-another-case",
    ],
)
def test_malformed_prices_file_is_a_clear_error_at_start(tmp_path: Path, content: str, problem: str) -> None:
    """A malformed prices file fails Tracker construction, naming the file, the key and the problem."""
    path = tmp_path / "prices.json"
    path.write_text(content)
    with pytest.raises(PricesFileError) as error:
        Tracker(f"sqlite+aiosqlite:///{tmp_path / 'l.db'}", prices_file=path)
    assert str(path) in str(error.value) and problem in str(error.value)
    if '"m"' in content:
        assert "'m'" in str(error.value)


def test_yaml_prices_file(tmp_path: Path) -> None:
    """A YAML prices file works like JSON."""
    path = tmp_path / "prices.yaml"
    path.write_text("my-model:\n  input: 2\n  output: 8\n")
    assert Pricer(prices_file=path).price("acme", "my-model", USAGE, at=AT).amount == Decimal("2.8")


def test_an_invalid_yaml_prices_file_is_one_line_naming_the_file_and_the_place(tmp_path: Path) -> None:
    """PyYAML's message spans five lines; the error names the file, the problem and where."""
    path = tmp_path / "prices.yaml"
    path.write_text("my-model: {input: 2\n  output: 8\n")
    with pytest.raises(PricesFileError) as error:
        Tracker(f"sqlite+aiosqlite:///{tmp_path / 'l.db'}", prices_file=path)
    problem = "is not valid YAML: expected ',' or '}', but got ':' (line 2, column 9)"
    assert str(error.value) == f"{path}: {problem}"


def test_edited_prices_file_is_picked_up_and_a_bad_edit_keeps_the_old(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Editing the file on disk changes prices within a second; a broken edit keeps the last good table."""
    path = write(tmp_path / "p.json", {"my-model": {"input": 1, "output": 1}})
    pricer = Pricer(prices_file=path)
    assert pricer.price("x", "my-model", USAGE, at=AT).amount == Decimal("1.1")
    write(path, {"my-model": {"input": 2, "output": 2}})
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
    time.sleep(1.05)
    assert pricer.price("x", "my-model", USAGE, at=AT).amount == Decimal("2.2")
    path.write_text('{"my-model": {"input": 2}}')
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10_000_000_000))
    time.sleep(1.05)
    with caplog.at_level(logging.ERROR, "llm_spend"):
        assert pricer.price("x", "my-model", USAGE, at=AT).amount == Decimal("2.2")
    assert any(str(path) in r.getMessage() and "output" in r.getMessage() for r in caplog.records)


async def test_a_prices_file_at_a_long_path_still_prices_calls_the_ledger_stores(
    db_url: str, tmp_path: Path
) -> None:
    """A row's price_source names the prices file; past the column's 300 characters it keeps the
    start and the end (the hash). Before, PostgreSQL refused every call the file priced."""
    folder = tmp_path.joinpath(*["d" * 60] * 5)
    folder.mkdir(parents=True)
    path = write(folder / "prices.json", {"my-model": {"input": 1, "output": 1}})
    async with Tracker(db_url, prices_file=path) as tracker:
        record = await tracker.track(provider="acme", model="my-model", input_tokens=10, output_tokens=10)
        total = await tracker.total(start=datetime(2000, 1, 1, tzinfo=UTC))
    assert record.price_source is not None and len(record.price_source) == 300
    assert record.price_source.startswith(f"file {str(path)[:95]}")
    assert record.price_source.endswith(f"/prices.json sha256:{record.price_source[-12:]}")
    assert (total.calls, total.unknown_cost_calls) == (1, 0)


def test_fallback_price_is_marked_and_never_zero() -> None:
    """fallback_price prices unknown models at a stated rate, marked in the source; known ones unaffected."""
    pricer = Pricer(fallback_price={"input": 10, "output": 30})
    cost = pricer.price("acme", "mystery-1", USAGE, at=AT)
    assert cost.amount == Decimal("13") and cost.source is not None and cost.source.startswith("fallback")
    assert pricer.price("openai", "gpt-4o", USAGE, at=AT).source.startswith("genai-prices")  # type: ignore[union-attr]
    assert Pricer().price("acme", "mystery-1", USAGE, at=AT).amount is None


def test_prices_explain_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`llm-spend prices explain` prints layer, match, rates and cost; exit 1 for an unknown model."""
    args = ["prices", "explain", "--provider", "openai", "--model", "gpt-4o-mini-2024-07-18",
            "--input", "1000", "--output", "500", "--cache-read", "200", "--at", "2026-11-01"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "layer:   genai-prices" in out and "matched: gpt-4o-mini" in out
    assert "input           $0.15 per 1M tokens" in out and "cost:    $0.000435" in out
    path = write(tmp_path / "p.json", {"mystery": {"input": 1, "output": 1}})
    assert (
        main(
            [
                "prices",
                "explain",
                "--provider",
                "acme",
                "--model",
                "mystery",
                "--input",
                "10",
                "--prices-file",
                str(path),
            ]
        )
        == 0
    )
    assert "layer:   file" in capsys.readouterr().out
    assert main(["prices", "explain", "--provider", "acme", "--model", "nope", "--input", "10"]) == 1
    assert "cost:    unknown (unknown_model)" in capsys.readouterr().out
