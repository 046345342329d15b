"""OpenAI, or any server that speaks its API: requests and answers pass through as they are."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping

import httpx

from providers.base import ChatCall, UpstreamResponse
from providers.errors import ProviderStatusError, map_httpx_errors

# Response headers a client of the OpenAI API may read; everything else
# (hop-by-hop, cookies, encodings httpx already undid) stays behind.
_RELAYED_HEADER_PREFIXES = (b"x-request-id", b"openai-", b"x-ratelimit-", b"retry-after")


def relayed_headers(headers: httpx.Headers) -> dict[str, str]:
    """The upstream response headers worth passing back to the client.

    Read from the raw pairs: `Headers.items()` works out the encoding again for
    every header it decodes, a few hundred microseconds per answer.
    """
    lowered = ((name.lower(), value) for name, value in headers.raw)
    return {
        name.decode("latin-1"): value.decode("latin-1")
        for name, value in lowered
        if name.startswith(_RELAYED_HEADER_PREFIXES)
    }


def request_headers(api_key: str | None, extra: Mapping[str, str]) -> dict[str, str]:
    """The headers the upstream needs: the provider key, the body type, and `extra`."""
    headers = {"content-type": "application/json", **extra}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return headers


class OpenAIStream:
    """A streamed answer read from httpx, bytes relayed as they arrive."""

    def __init__(self, response: httpx.Response, provider: str, host: str) -> None:
        self._response = response
        self._provider = provider
        self._host = host
        self.headers: Mapping[str, str] = relayed_headers(response.headers)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with map_httpx_errors(self._provider, self._host):
            async for chunk in self._response.aiter_bytes():
                yield chunk

    async def aclose(self) -> None:
        await self._response.aclose()


class OpenAIProvider:
    """The OpenAI chat API at `base_url`, through an injected httpx client."""

    name = "openai"

    def __init__(self, client: httpx.AsyncClient, base_url: str) -> None:
        self._client = client
        self._base_url = base_url.rstrip("/")
        self.host = httpx.URL(self._base_url).host
        self._chat_url = httpx.URL(f"{self._base_url}/chat/completions")  # parsed once

    async def complete(self, call: ChatCall) -> UpstreamResponse:
        request = self._chat_request(call)
        with map_httpx_errors(self.name, self.host):
            response = await self._client.send(request)
        return self._checked(response, response.content)

    async def stream(self, call: ChatCall) -> OpenAIStream:
        request = self._chat_request(call)
        with map_httpx_errors(self.name, self.host):
            response = await self._client.send(request, stream=True)
            if response.is_error:
                body = await response.aread()
                await response.aclose()
                self._checked(response, body)
        return OpenAIStream(response, self.name, self.host)

    async def list_models(self, api_key: str | None) -> UpstreamResponse:
        with map_httpx_errors(self.name, self.host):
            response = await self._client.get(
                f"{self._base_url}/models", headers=request_headers(api_key, {})
            )
        return self._checked(response, response.content)

    def _chat_request(self, call: ChatCall) -> httpx.Request:
        return self._client.build_request(
            "POST",
            self._chat_url,
            content=json.dumps(call.body, ensure_ascii=False).encode(),
            headers=request_headers(call.api_key, call.headers),
        )

    def _checked(self, response: httpx.Response, body: bytes) -> UpstreamResponse:
        headers = relayed_headers(response.headers)
        if response.is_error:
            raise ProviderStatusError(self.name, self.host, response.status_code, body, headers)
        return UpstreamResponse(response.status_code, body, headers)
