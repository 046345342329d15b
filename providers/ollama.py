"""Ollama behind the OpenAI wire format, through the `ollama` SDK's AsyncClient.

Every failure leaves as a ProviderError (providers.errors):

    ollama.ResponseError            → ProviderStatusError: a 4xx keeps its status, a 5xx
      is a 502 (an error line inside a 200 stream has no status: it counts as a 500)
    ConnectionError, httpx.ConnectError
                                    → ProviderUnreachable
    httpx.TimeoutException          → ProviderTimeout
    unreadable JSON, unexpected shape, a stream that ends before `done`
                                    → ProviderProtocolError

A request Ollama cannot honour raises UnsupportedParameter before any I/O.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx
import ollama

from providers.base import ChatCall, UpstreamResponse
from providers.errors import (
    ProviderProtocolError,
    ProviderStatusError,
    ProviderUnreachable,
    map_httpx_errors,
)
from providers.ollama_wire import (
    ChunkTranslator,
    OllamaChat,
    UnsupportedParameter,
    from_ollama,
    models_from_ollama,
    to_ollama,
)
from providers.types import ChatCompletionChunk

__all__ = ["OllamaProvider", "OllamaStream", "UnsupportedParameter"]

NAME = "ollama"
DONE = b"data: [DONE]\n\n"
# The SDK keeps an error's text and status but not its headers, so Ollama's own
# Retry-After cannot be relayed; clients get a short one rather than none.
RETRY_AFTER_SECONDS = "1"
_MAX_ERROR_CHARS = 1000

_ERROR_KINDS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "permission_denied"),
    404: ("not_found_error", "model_not_found"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


def status_error(error: ollama.ResponseError, host: str) -> ProviderStatusError:
    """Ollama's error answer as an OpenAI error body that names Ollama.

    Ollama's own failures (5xx) are a bad gateway to Engram's client: 502, with
    Ollama's status kept in the message.
    """
    upstream = error.status_code if error.status_code >= 400 else 500
    status = upstream if upstream < 500 else 502
    kind, code = _ERROR_KINDS.get(status, ("upstream_error", "upstream_error"))
    # A proxy in front of Ollama may answer with a whole HTML page: keep the gist.
    message = f"ollama ({upstream}): {str(error.error)[:_MAX_ERROR_CHARS]}"
    body = {"error": {"message": message, "type": kind, "code": code, "param": None}}
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if status == 429 else {}
    return ProviderStatusError(NAME, host, status, json.dumps(body).encode(), headers)


@contextmanager
def ollama_errors(host: str) -> Iterator[None]:
    """Map the SDK's errors, and the httpx errors it lets through, to ProviderErrors."""
    try:
        with map_httpx_errors(NAME, host):
            yield
    except ollama.ResponseError as error:
        raise status_error(error, host) from error
    except ConnectionError as error:  # the SDK's stand-in for httpx.ConnectError
        raise ProviderUnreachable(NAME, host, f"{NAME} at {host} is unreachable") from error
    except ValueError as error:  # a line that is not JSON, or not a ChatResponse
        raise ProviderProtocolError(
            NAME, host, f"{NAME} at {host} sent an unreadable answer"
        ) from error


async def next_part(parts: AsyncIterator[ollama.ChatResponse], host: str) -> ollama.ChatResponse:
    """The next streamed part; the stream must not end before Ollama says it is done."""
    with ollama_errors(host):
        try:
            return await anext(parts)
        except StopAsyncIteration:
            pass
    raise ProviderProtocolError(NAME, host, f"{NAME} ended the stream before it was done")


def sse(chunk: ChatCompletionChunk) -> bytes:
    return b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"


def _json(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode()


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


class OllamaStream:
    """A streamed Ollama answer, relayed as OpenAI chunk events as each part arrives."""

    def __init__(
        self,
        parts: AsyncIterator[ollama.ChatResponse],
        first: ollama.ChatResponse,
        translator: ChunkTranslator,
        host: str,
    ) -> None:
        self._parts = parts
        self._first = first
        self._translator = translator
        self._host = host
        self.headers: Mapping[str, str] = {}

    async def __aiter__(self) -> AsyncIterator[bytes]:
        part = self._first
        while True:
            for chunk in self._translator.translate(part):
                yield sse(chunk)
            if part.done:
                break
            part = await next_part(self._parts, self._host)
        yield DONE

    async def aclose(self) -> None:
        # The SDK's stream is an async generator holding the HTTP response open.
        if isinstance(self._parts, AsyncGenerator):
            await self._parts.aclose()


class OllamaProvider:
    """An Ollama server, through an injected `ollama.AsyncClient`.

    `host` is the server's base URL, used to name it in errors. The caller's
    provider key is never sent: it belongs to another upstream.
    """

    name = NAME

    def __init__(self, client: ollama.AsyncClient, host: str) -> None:
        self._client = client
        self.host = httpx.URL(host).host or host

    async def complete(self, call: ChatCall) -> UpstreamResponse:
        request = to_ollama(call.body)
        with ollama_errors(self.host):
            response = await self._client.chat(
                request["model"],
                request["messages"],
                tools=request["tools"],
                format=request["format"],
                options=request["options"],
                stream=False,
            )
        body = from_ollama(response, request["model"], new_completion_id(), int(time.time()))
        return UpstreamResponse(200, _json(body))

    async def stream(self, call: ChatCall) -> OllamaStream:
        request = to_ollama(call.body)
        parts = await self._open_stream(request)
        # The SDK sends nothing until its stream is read: read the first part
        # here, so a refusal raises before the caller has sent a byte.
        first = await next_part(parts, self.host)
        body: Mapping[str, Any] = call.body
        stream_options = body.get("stream_options") or {}
        translator = ChunkTranslator(
            request["model"],
            new_completion_id(),
            int(time.time()),
            include_usage=bool(stream_options.get("include_usage")),
        )
        return OllamaStream(parts, first, translator, self.host)

    async def aclose(self) -> None:
        """Close the SDK client's connections (it owns its own HTTP client)."""
        await self._client.close()  # type: ignore[no-untyped-call]  # the SDK leaves it untyped

    async def list_models(self, api_key: str | None) -> UpstreamResponse:
        with ollama_errors(self.host):
            listing = await self._client.list()
        return UpstreamResponse(200, _json(models_from_ollama(listing)))

    async def _open_stream(self, request: OllamaChat) -> AsyncIterator[ollama.ChatResponse]:
        with ollama_errors(self.host):
            return await self._client.chat(
                request["model"],
                request["messages"],
                tools=request["tools"],
                format=request["format"],
                options=request["options"],
                stream=True,
            )
