"""Privacy: prompts, completions, headers and API keys never reach the database, the spool or the logs.

Real SDK calls (openai, anthropic, google-genai) with a secret-looking API key and a distinctive
prompt go through the capturing client against the fake provider; part of them while the database
fails, so the spool is written too. Then every table, every spool file and every log line (at DEBUG)
is scanned for the secrets. (The SDKs' own DEBUG logs do print prompts: that is theirs, not ours.)
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

import anthropic
import openai
import pytest
from google import genai
from google.genai import types

from llm_spend import Tracker, Usage, with_tags
from llm_spend.testing import FakeProviderTransport

API_KEY = "sk-proj-SECRETKEY0123456789abcdefSECRET"
PROMPT = "PROMPT-7f3a9c-the-distinctive-question"
COMPLETION = "COMPLETION-4b2e8d-the-distinctive-answer"
SECRETS = (API_KEY, "SECRETKEY0123456789", PROMPT, "7f3a9c", COMPLETION, "4b2e8d", "Bearer ")


async def sdk_calls(tracker: Tracker, fake: FakeProviderTransport) -> None:
    http = tracker.httpx_client(transport=fake)
    oai = openai.AsyncOpenAI(api_key=API_KEY, http_client=http, max_retries=0)
    messages = [{"role": "user", "content": PROMPT}]
    await oai.chat.completions.create(model="gpt-4o-mini", messages=messages)  # type: ignore[arg-type]
    stream = await oai.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True)  # type: ignore[arg-type]
    async for _ in stream:
        pass
    claude = anthropic.AsyncAnthropic(api_key=API_KEY, http_client=http, max_retries=0)
    await claude.messages.create(model="claude-sonnet-4-6", max_tokens=64, messages=messages)  # type: ignore[arg-type]
    gemini = genai.Client(api_key=API_KEY, http_options=types.HttpOptions(httpx_async_client=http))
    await gemini.aio.models.generate_content(model="gemini-2.5-flash", contents=PROMPT)


def dump_tables(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return "\n".join(repr(row) for table in tables for row in conn.execute(f'SELECT * FROM "{table}"'))
    finally:
        conn.close()


def read_spool(path: Path) -> str:
    """The text of every spool file: the live one and those claimed for a replay. One that the
    replay probe renames while this reads (it claims the live file) is read under its new name."""
    for _ in range(100):
        try:
            return "".join(p.read_text() for p in path.parent.glob(path.name + "*"))
        except FileNotFoundError:
            continue
    raise AssertionError(f"the spool files at {path} kept moving")


async def test_no_secret_reaches_database_spool_or_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After real SDK calls, some of them spooled: no table, spool file or log line holds a secret."""
    caplog.set_level(logging.DEBUG)
    db = tmp_path / "ledger.db"
    fake = FakeProviderTransport(usage=Usage(input_tokens=100, output_tokens=20), text=COMPLETION)
    async with Tracker(f"sqlite+aiosqlite:///{db}", shutdown_timeout=0.5) as tracker:
        with with_tags(feature="chat", api_key=API_KEY, authorization=f"Bearer {API_KEY}"):
            await sdk_calls(tracker, fake)
            conn = sqlite3.connect(db)
            conn.execute(
                "CREATE TRIGGER down BEFORE INSERT ON llm_calls BEGIN SELECT RAISE(ABORT, 'down'); END"
            )
            conn.commit()
            await sdk_calls(tracker, fake)
            spool_text = read_spool(tracker.spool.path)
            conn.execute("DROP TRIGGER down")
            conn.commit()
            conn.close()
        await asyncio.sleep(0)
    assert fake.calls == 8
    assert spool_text, "the outage should have put calls in the spool"
    tables = dump_tables(db)
    assert "gpt-4o-mini" in tables and "[REDACTED]" in tables  # the scan sees the rows
    ours = ("llm_spend", "sqlalchemy", "aiosqlite", "alembic", "asyncio")  # not the SDKs' own loggers
    logs = "\n".join(r.getMessage() + repr(r.args) for r in caplog.records if r.name.startswith(ours))
    assert "spooling" in logs
    for secret in SECRETS:
        assert secret not in tables, secret
        assert secret not in spool_text, secret
        assert secret not in logs, secret
