"""Gemini through google-genai's async client, behind the OpenAI wire format.

Foreign errors are mapped where they surface, while a stream is read too:

    google.genai.errors.APIError      → ProviderStatusError: a 4xx keeps its status (a key
                                        Gemini rejects → 401), a 5xx is a 502; an OpenAI-shaped
                                        body naming gemini, Retry-After when Gemini gives one
    httpx.TimeoutException            → ProviderTimeout
    other httpx.TransportError        → ProviderUnreachable
    an answer that does not parse     → ProviderProtocolError
    no key for the request            → ProviderStatusError 401, without calling Gemini

A request Gemini cannot honour raises UnsupportedParameter before anything is sent.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from typing import Any

import httpx
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from google.genai.client import DebugConfig
from pydantic import ValidationError

from providers.base import ChatCall, UpstreamResponse
from providers.errors import ProviderProtocolError, ProviderStatusError, map_httpx_errors
from providers.gemini_answer import ChunkTranslator, from_gemini, model_list
from providers.gemini_wire import GeminiRequest, UnsupportedParameter, to_gemini, wants_usage

__all__ = ["DEFAULT_BASE_URL", "GeminiProvider", "GeminiStream", "UnsupportedParameter"]

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com/"
_API_VERSION = "v1beta"
# google-genai will not build a client without a key, and given none it reads
# GEMINI_API_KEY / GOOGLE_API_KEY from the environment. The real key rides on each
# request instead (_key_options), so one client, built once, serves every caller:
# building a client costs ~30 ms of TLS set-up, too much per request or per new key.
_CLIENT_KEY = "engram-sends-the-key-per-request"
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}

ErrorMapper = Callable[[], AbstractContextManager[None]]


class GeminiProvider:
    """The Gemini API at `base_url`, through google-genai on the injected httpx client.

    The key is the request's (`call.api_key`), else `default_api_key`.
    """

    name = "gemini"

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        base_url: str | None = None,
        default_api_key: str | None = None,
    ) -> None:
        base_url = base_url or DEFAULT_BASE_URL
        self.host = httpx.URL(base_url).host
        self._default_api_key = default_api_key
        self._sdk = genai.Client(
            api_key=_CLIENT_KEY,
            vertexai=False,
            http_options=_client_options(client, base_url),
            # Explicit, so GOOGLE_GENAI_CLIENT_MODE cannot turn on request recording.
            debug_config=DebugConfig(client_mode=None, replays_directory=None, replay_id=None),
        )

    async def complete(self, call: ChatCall) -> UpstreamResponse:
        request = to_gemini(call.body)
        config = self._config(request, call.api_key)
        with self._mapped_errors(call.api_key):
            response = await self._sdk.aio.models.generate_content(
                model=request.model, contents=request.contents, config=config
            )
        return UpstreamResponse(200, _json(from_gemini(response, request.model)))

    async def stream(self, call: ChatCall) -> GeminiStream:
        request = to_gemini(call.body)
        config = self._config(request, call.api_key)
        with self._mapped_errors(call.api_key):
            responses = await self._sdk.aio.models.generate_content_stream(
                model=request.model, contents=request.contents, config=config
            )
            # The SDK sends the request on the first read: read now, so that a refusal
            # raises here, before the client has been sent a status line.
            first = await anext(responses, None)
        translator = ChunkTranslator(request.model, wants_usage(call.body))
        mapper = partial(self._mapped_errors, call.api_key)
        return GeminiStream(responses, first, translator, mapper, self.host)

    async def list_models(self, api_key: str | None) -> UpstreamResponse:
        config = types.ListModelsConfig(http_options=self._key_options(api_key), page_size=1000)
        with self._mapped_errors(api_key):
            pager = await self._sdk.aio.models.list(config=config)
            models = [model async for model in pager]
        return UpstreamResponse(200, _json(model_list(models)))

    def _config(self, request: GeminiRequest, api_key: str | None) -> types.GenerateContentConfig:
        options = self._key_options(api_key)
        return request.config.model_copy(update={"http_options": options})

    def _key_options(self, api_key: str | None) -> types.HttpOptions:
        """This request's key, as a per-request header over the shared client's options."""
        key = api_key or self._default_api_key
        if not key:
            message = "gemini: no API key; send one as Authorization: Bearer, or set GEMINI_API_KEY"
            body = _error_body(message, 401, "missing_api_key")
            raise ProviderStatusError(self.name, self.host, 401, body, {})
        return types.HttpOptions(headers={"x-goog-api-key": key})

    @contextmanager
    def _mapped_errors(self, api_key: str | None) -> Iterator[None]:
        """google-genai's and httpx's errors as ProviderErrors that hold no key."""
        key = api_key or self._default_api_key
        try:
            with map_httpx_errors(self.name, self.host):
                yield
        except genai_errors.APIError as error:
            # `from None`: the SDK error holds the request, and with it the key header.
            raise _status_error(error, self.host, key) from None
        except (genai_errors.UnknownApiResponseError, ValidationError) as error:
            message = f"{self.name} at {self.host} sent an unreadable answer"
            raise ProviderProtocolError(self.name, self.host, message) from error


def _client_options(client: httpx.AsyncClient, base_url: str) -> types.HttpOptions:
    """Every option explicit: left unset, google-genai takes them from the environment."""
    read_timeout = client.timeout.read
    return types.HttpOptions(
        base_url=base_url,
        api_version=_API_VERSION,
        httpx_async_client=client,
        # The SDK hands httpx a timeout per request, None ("never") when unset: keep
        # the client's read timeout, the bound for a long generation.
        timeout=None if read_timeout is None else math.ceil(read_timeout * 1000),
        # No retries in the SDK: a 429 or 5xx goes back to the client, who decides.
        retry_options=None,
    )


class GeminiStream:
    """A streamed Gemini answer, relayed as OpenAI chunk events as each part arrives."""

    def __init__(
        self,
        responses: AsyncIterator[types.GenerateContentResponse],
        first: types.GenerateContentResponse | None,
        translator: ChunkTranslator,
        mapped_errors: ErrorMapper,
        host: str,
    ) -> None:
        self.headers: Mapping[str, str] = {}
        self._responses = responses
        self._first = first
        self._translator = translator
        self._mapped_errors = mapped_errors
        self._host = host

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with self._mapped_errors():
            async for response in self._upstream():
                for chunk in self._translator.feed(response):
                    yield _event(chunk)
        if not self._translator.finished:
            message = f"gemini at {self._host} ended the stream before the answer finished"
            raise ProviderProtocolError("gemini", self._host, message)
        for chunk in self._translator.finish():
            yield _event(chunk)
        yield b"data: [DONE]\n\n"

    async def _upstream(self) -> AsyncIterator[types.GenerateContentResponse]:
        if self._first is not None:
            yield self._first
        async for response in self._responses:
            yield response

    async def aclose(self) -> None:
        if isinstance(self._responses, AsyncGenerator):
            await self._responses.aclose()


def _status_error(error: genai_errors.APIError, host: str, key: str | None) -> ProviderStatusError:
    key_rejected = "API_KEY_INVALID" in _detail_values(error, "reason")
    # Gemini answers a bad key with 400; OpenAI clients expect 401 for it.
    status = 401 if key_rejected else _upstream_status(error.code)
    text = error.message or error.status or "the request failed"
    if key:
        text = text.replace(key, "[redacted]")
    code = "invalid_api_key" if key_rejected else (error.status or "").lower() or None
    body = _error_body(f"gemini: {text}", status, code)
    return ProviderStatusError("gemini", host, status, body, _retry_after(error))


def _upstream_status(code: object) -> int:
    """Gemini's refusals keep their status; its own failures are a bad gateway."""
    return code if isinstance(code, int) and 400 <= code <= 499 else 502


def _error_body(message: str, status: int, code: str | None) -> bytes:
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "upstream_error")
    return _json({"error": {"message": message, "type": kind, "code": code, "param": None}})


def _detail_values(error: genai_errors.APIError, field: str) -> list[Any]:
    """`field` of each entry in google.rpc error details (ErrorInfo, RetryInfo, …)."""
    body = error.details if isinstance(error.details, dict) else {}
    inner = body.get("error", body)
    details = inner.get("details") if isinstance(inner, dict) else None
    entries = details if isinstance(details, list) else []
    return [entry[field] for entry in entries if isinstance(entry, dict) and field in entry]


def _retry_after(error: genai_errors.APIError) -> dict[str, str]:
    """Retry-After from the response header, else from google.rpc.RetryInfo ("37s")."""
    response = error.response
    if isinstance(response, httpx.Response) and "retry-after" in response.headers:
        return {"retry-after": response.headers["retry-after"]}
    for delay in _detail_values(error, "retryDelay"):
        try:
            return {"retry-after": str(math.ceil(float(str(delay).removesuffix("s"))))}
        except ValueError:
            continue
    return {}


def _json(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def _event(chunk: Any) -> bytes:
    return b"data: " + _json(chunk) + b"\n\n"
