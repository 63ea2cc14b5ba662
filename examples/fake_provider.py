"""A tiny local stand-in for OpenAI's chat completions API, so the demo runs offline.

``POST /v1/chat/completions`` answers in OpenAI's JSON shape with a deterministic ``usage`` block:

- ``prompt_tokens``: about one token per 4 UTF-8 bytes of the messages, plus 3 per message;
- ``completion_tokens``: the request's ``max_tokens`` (200 when it sets none);
- ``prompt_tokens_details.cached_tokens``: a system prompt seen before is served from the prompt
  cache, in blocks of 128 tokens, as OpenAI does (OpenAI also needs 1,024 tokens; this fake does not).

The response names a dated model snapshot (``gpt-4o-mini`` -> ``gpt-4o-mini-2024-07-18``), as the real
API does. ``serve()`` runs it with uvicorn on 127.0.0.1, on a free port, in a background thread.
"""

from __future__ import annotations

import itertools
import math
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

SNAPSHOTS = {
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4o": "gpt-4o-2024-08-06",
}


def count_tokens(text: str) -> int:
    """A crude, deterministic token count: one token per 4 UTF-8 bytes."""
    return math.ceil(len(text.encode()) / 4)


def create_app() -> Starlette:
    """The fake provider as an ASGI app (its prompt cache lives in this closure)."""
    seen_system_prompts: set[str] = set()
    ids = itertools.count(1)

    async def chat_completions(request: Request) -> JSONResponse:
        payload: dict[str, Any] = await request.json()
        model = payload.get("model")
        if model not in SNAPSHOTS:
            error = {"message": f"The model `{model}` does not exist", "type": "invalid_request_error"}
            return JSONResponse({"error": error}, status_code=404)
        messages = payload["messages"]
        prompt_tokens = sum(count_tokens(m["content"]) + 3 for m in messages)
        cached_tokens = 0
        if messages[0]["role"] == "system":
            system = messages[0]["content"]
            if system in seen_system_prompts:
                cached_tokens = count_tokens(system) // 128 * 128
            seen_system_prompts.add(system)
        completion_tokens = payload.get("max_tokens") or 200
        question = messages[-1]["content"]
        return JSONResponse(
            {
                "id": f"chatcmpl-fake{next(ids):06d}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": SNAPSHOTS[model],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"(fake answer to {question[:30]!r})"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                    "prompt_tokens_details": {"cached_tokens": cached_tokens},
                    "completion_tokens_details": {"reasoning_tokens": 0},
                },
            }
        )

    return Starlette(routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"])])


@contextmanager
def serve(host: str = "127.0.0.1") -> Iterator[str]:
    """Run the fake provider in a background thread; yields its base URL, stops it on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))  # port 0: the OS picks a free port
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(), log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="fake-llm", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the fake LLM provider did not start")
            time.sleep(0.01)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
