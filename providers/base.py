"""The Provider protocol: the one seam between Engram and an upstream model API.

A provider takes and returns the OpenAI wire format. Adapters for APIs that
speak another format translate in pure functions of their own.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from providers.types import ChatRequest


@dataclass(frozen=True)
class ChatCall:
    """One chat request as it should reach the provider."""

    body: ChatRequest
    api_key: str | None = field(default=None, repr=False)
    # Headers the upstream may need besides the key (OpenAI-Organization, …).
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class UpstreamResponse:
    """A whole upstream answer: the body exactly as sent, and headers worth relaying."""

    status_code: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)


def first_choice_message(body: bytes) -> dict[str, Any] | None:
    """choices[0].message of an OpenAI chat completion body, if it has one."""
    try:
        message = json.loads(body)["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return message if isinstance(message, dict) else None


class ChatStream(Protocol):
    """An open streamed answer: server-sent event bytes in the OpenAI chunk format."""

    headers: Mapping[str, str]

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class Provider(Protocol):
    """An upstream model API. Errors are ProviderErrors (providers.errors)."""

    name: str

    async def complete(self, call: ChatCall) -> UpstreamResponse:
        """A non-streamed chat completion."""
        ...

    async def stream(self, call: ChatCall) -> ChatStream:
        """Open a streamed completion; raises before returning if the upstream refuses."""
        ...

    async def list_models(self, api_key: str | None) -> UpstreamResponse:
        """The provider's model list in the OpenAI shape."""
        ...
