"""Which requests are LLM calls, and which adapter and provider id they get.

A request is captured when its host is a known provider host and its method and path name a billed
endpoint of that provider's API; anything else passes through untouched, with no parsing. Known hosts
are api.openai.com, api.anthropic.com and generativelanguage.googleapis.com, plus the ``providers``
mapping given to the Tracker, which wins over them::

    Tracker(..., providers={
        "openrouter.ai": "openai-compatible",          # provider id from the host: "openrouter"
        "*.openai.azure.com": "openai-compatible",     # any subdomain; provider id "azure"
        "localhost:8000": "openai-compatible:vllm",    # host:port, explicit provider id
        "llm-proxy.internal": "anthropic",             # a proxy that speaks Anthropic's API
        "api.openai.com": "ignore",                    # stop capturing a host
    })

A key is a host name or IPv4 address, ``*.`` and a domain (no port: it matches any), or a host and
``:<port>`` (1 to 65535), compared in lower case; anything else (spaces, a scheme or path, an IPv6
address) is refused. A value is an adapter name ("openai", "openai-compatible", "anthropic",
"gemini"), optionally followed by ``:<provider id>``, the id recorded and priced (1 to 64 letters,
digits, "_", "." or "-": genai-prices' provider ids such as "openrouter", "deepseek", "azure",
"groq"), or "ignore" alone. Without an id, "openai-compatible" takes it from the host (well-known
hosts) or records the host itself (prices then come out unknown, never $0). A malformed entry raises
ValueError naming ``providers`` and the entry, when the options are built.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from . import anthropic, gemini, openai
from .base import Adapter

__all__ = ["ADAPTERS", "Route", "Router", "resolve_route"]

ADAPTERS: Final[Mapping[str, Adapter]] = MappingProxyType(
    {
        "openai": openai.ADAPTER,
        "openai-compatible": openai.ADAPTER,
        "anthropic": anthropic.ADAPTER,
        "gemini": gemini.ADAPTER,
    }
)
_BUILTIN: Final = {
    "api.openai.com": "openai",
    "api.anthropic.com": "anthropic",
    "generativelanguage.googleapis.com": "gemini",
}
_KNOWN_HOSTS: Final = (  # host suffix -> genai-prices provider id, for "openai-compatible"
    ("openrouter.ai", "openrouter"),
    ("api.deepseek.com", "deepseek"),
    ("openai.azure.com", "azure"),
    ("cognitiveservices.azure.com", "azure"),
    ("services.ai.azure.com", "azure"),
    ("api.groq.com", "groq"),
    ("api.x.ai", "x-ai"),
    ("api.mistral.ai", "mistral"),
    ("api.fireworks.ai", "fireworks"),
    ("api.together.xyz", "together"),
    ("api.cerebras.ai", "cerebras"),
    ("api.perplexity.ai", "perplexity"),
    ("api.moonshot.ai", "moonshotai"),
    ("googleapis.com", "google"),
    ("api.openai.com", "openai"),
)


@dataclass(frozen=True, slots=True)
class Route:
    """How to capture the calls to one host: with this adapter, recorded under this provider id."""

    adapter: Adapter
    provider: str | None
    """None: derive it from the request's host (openai-compatible hosts without an explicit id)."""

    def provider_for(self, host: str) -> str:
        return self.provider or provider_from_host(host)


class Router:
    """The compiled `providers` mapping: host (or host:port, or *.suffix) -> Route. Immutable."""

    __slots__ = ("_exact", "_suffixes")

    def __init__(self, providers: Mapping[str, str] | None = None) -> None:
        exact: dict[str, Route | None] = {}
        suffixes: list[tuple[str, Route | None]] = []
        given = [_host_key(host) for host in providers or {}]
        if len(set(given)) < len(given):
            twice = next(key for key in given if given.count(key) > 1)
            raise ValueError(f"providers: {twice!r} is given twice (host names are compared in lower case)")
        for host, value in {**_BUILTIN, **(providers or {})}.items():
            route = _route(host, value)
            key = host.lower()
            if key.startswith("*."):
                suffixes.append((key[1:], route))
            else:
                exact[key] = route
        self._exact: Mapping[str, Route | None] = MappingProxyType(exact)
        self._suffixes = tuple(sorted(suffixes, key=lambda item: -len(item[0])))

    def match(self, host: str, port: int | None = None) -> Route | None:
        """The route for a request to `host` (lower case, as httpx gives it) and `port`, or None."""
        exact = self._exact
        if port is not None and exact:
            with_port = f"{host}:{port}"
            if with_port in exact:
                return exact[with_port]
        if host in exact:
            return exact[host]
        for suffix, found in self._suffixes:
            if host.endswith(suffix):
                return found
        return None


def resolve_route(providers: Mapping[str, str] | None, url: str) -> tuple[Adapter, str] | None:
    """The adapter and provider id that capture calls to `url` under this configuration, or None.

    A pure function over the configuration, for tests and docs; the transport compiles a `Router` once.
    """
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    route = Router(providers).match(host, parts.port)
    return None if route is None else (route.adapter, route.provider_for(host))


def provider_from_host(host: str) -> str:
    """The genai-prices provider id of a well-known OpenAI-compatible host, else the host itself."""
    for suffix, provider in _KNOWN_HOSTS:
        if host == suffix or host.endswith("." + suffix):
            return provider
    return host[:64]


_HOST: Final = re.compile(r"(\*\.)?([\w-]+(?:\.[\w-]+)*)(?::([0-9]+))?")
"""A providers key: a host name (or IPv4 address), "*." and a domain, or a host name and ":port"."""
_PROVIDER_ID: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _host_key(host: object) -> str:
    """A providers key checked, in lower case as `Router.match` compares it."""
    if not isinstance(host, str) or (found := _HOST.fullmatch(host)) is None:
        raise ValueError(
            f"providers: {host!r} is not a host name, *.domain or host:port, such as 'openrouter.ai',"
            " '*.openai.azure.com' or 'localhost:8000'"
        )
    wildcard, _, port = found.groups()
    if port is not None and (wildcard or port.startswith("0") or int(port) > 65_535):
        problem = (
            "a *.domain key takes no port" if wildcard else "the port must be 1 to 65535, with no leading 0"
        )
        raise ValueError(f"providers: {host!r}: {problem}")
    return host.lower()


def _route(host: str, value: object) -> Route | None:
    if not isinstance(value, str):
        raise ValueError(f"providers[{host!r}] must be a string such as 'openai-compatible', got {value!r}")
    name, colon, provider = value.partition(":")
    if name == "ignore" and not colon:
        return None
    adapter = ADAPTERS.get(name)
    if adapter is None:
        choices = ", ".join(sorted((*ADAPTERS, "ignore")))
        problem = (
            "'ignore' takes no provider id" if name == "ignore" else f"the adapter must be one of {choices}"
        )
        raise ValueError(f"providers[{host!r}] = {value!r}: {problem}")
    if colon and _PROVIDER_ID.fullmatch(provider) is None:
        raise ValueError(
            f"providers[{host!r}] = {value!r}: the provider id after ':' must be 1 to 64 letters, digits,"
            " '_', '.' or '-', such as 'openrouter'"
        )
    if not provider and name != "openai-compatible":
        provider = adapter.default_provider
    return Route(adapter, provider or None)
