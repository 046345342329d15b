"""The Gemini adapter over HTTP: what google-genai sends, mocked by respx, and what comes back.

The translation tables themselves are in test_provider_gemini_wire.py.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import httpx
import pytest
import respx

from providers.base import ChatCall
from providers.errors import (
    ProviderProtocolError,
    ProviderStatusError,
    ProviderTimeout,
    ProviderUnreachable,
)
from providers.gemini import GeminiProvider, GeminiStream, UnsupportedParameter
from providers.types import ChatRequest

pytestmark = pytest.mark.anyio

BASE = "http://gemini.test"
MODEL = "gemini-2.5-flash"
KEY = "AIzaSy-test-secret-key"
GENERATE = f"{BASE}/v1beta/models/{MODEL}:generateContent"
STREAM = f"{BASE}/v1beta/models/{MODEL}:streamGenerateContent"
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALL = {
    "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
    "thoughtSignature": "c2ln",
}


def request(**fields: Any) -> ChatRequest:
    return cast(
        ChatRequest, {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **fields}
    )


def answer(*parts: dict[str, Any], finish: str | None = "STOP", **usage: int) -> dict[str, Any]:
    """A generateContent response (or one streamed event) as the REST API documents it."""
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": list(parts)}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    return {
        "candidates": [candidate],
        "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 3, **usage},
        "modelVersion": MODEL,
        "responseId": "resp-1",
    }


def events(*bodies: dict[str, Any]) -> httpx.Response:
    """streamGenerateContent?alt=sse: one `data:` event per response."""
    content = b"".join(b"data: " + json.dumps(body).encode() + b"\r\n\r\n" for body in bodies)
    return httpx.Response(200, content=content, headers={"content-type": "text/event-stream"})


def sent(route: respx.Route, call: int = -1) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(route.calls[call].request.content)
    return body


async def read(stream: GeminiStream) -> list[dict[str, Any]]:
    raw = [event async for event in stream]
    await stream.aclose()
    assert raw[-1] == b"data: [DONE]\n\n"
    assert all(event.startswith(b"data: ") and event.endswith(b"\n\n") for event in raw)
    return [json.loads(event.removeprefix(b"data: ")) for event in raw[:-1]]


@pytest.fixture
async def gemini() -> AsyncIterator[GeminiProvider]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=60.0)) as client:
        yield GeminiProvider(client, base_url=BASE)


@pytest.fixture
def mock() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as router:
        yield router


async def test_plain_text(gemini: GeminiProvider, mock: respx.MockRouter) -> None:
    route = mock.post(GENERATE).respond(200, json=answer({"text": "Hello!"}, totalTokenCount=10))
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    response = await gemini.complete(ChatCall(request(messages=messages), api_key=KEY))
    body = response.json()
    assert response.status_code == 200
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Hello!",
        "refusal": None,
    }
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["total_tokens"] == 10
    upstream = route.calls[0].request
    assert upstream.headers["x-goog-api-key"] == KEY
    assert KEY not in str(upstream.url)
    assert sent(route) == {
        "contents": [{"role": "user", "parts": [{"text": "Hi"}]}],
        "systemInstruction": {"parts": [{"text": "Be kind."}]},
        "generationConfig": {},
    }


async def test_streaming(gemini: GeminiProvider, mock: respx.MockRouter) -> None:
    route = mock.post(STREAM, params={"alt": "sse"}).mock(
        return_value=events(
            answer({"text": "Hel"}, finish=None),
            answer({"text": "lo"}, totalTokenCount=12),
        )
    )
    body = request(stream=True, stream_options={"include_usage": True}, temperature=0.5)
    chunks = await read(await gemini.stream(ChatCall(body, api_key=KEY)))
    assert route.calls[0].request.headers["x-goog-api-key"] == KEY
    assert sent(route)["generationConfig"] == {"temperature": 0.5}
    assert [c["choices"][0]["delta"] for c in chunks[:3]] == [
        {"role": "assistant", "content": "Hel"},
        {"content": "lo"},
        {},
    ]
    assert chunks[2]["choices"][0]["finish_reason"] == "stop"
    assert [c["usage"] for c in chunks[:3]] == [None, None, None]
    assert (chunks[3]["choices"], chunks[3]["usage"]["total_tokens"]) == ([], 12)
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1


async def test_a_tool_call_round_trip(gemini: GeminiProvider, mock: respx.MockRouter) -> None:
    route = mock.post(GENERATE).respond(200, json=answer(CALL))
    first = request(tools=[WEATHER], tool_choice="auto")
    completion = (await gemini.complete(ChatCall(first, api_key=KEY))).json()
    message = completion["choices"][0]["message"]
    assert completion["choices"][0]["finish_reason"] == "tool_calls"
    [call] = message["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert sent(route)["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}

    route.respond(200, json=answer({"text": "Sunny in Paris."}))
    result = {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}
    final = request(messages=[*first["messages"], message, result], tools=[WEATHER])
    completion = (await gemini.complete(ChatCall(final, api_key=KEY))).json()
    assert completion["choices"][0]["message"]["content"] == "Sunny in Paris."
    function_response = {"name": "get_weather", "response": {"output": "sunny"}}
    assert sent(route)["contents"][1:] == [
        {"role": "model", "parts": [CALL]},  # the thought signature went back as it came
        {"role": "user", "parts": [{"functionResponse": function_response}]},
    ]


async def test_a_streamed_tool_call(gemini: GeminiProvider, mock: respx.MockRouter) -> None:
    mock.post(STREAM).mock(return_value=events(answer(CALL)))
    body = request(stream=True, tools=[WEATHER])
    chunks = await read(await gemini.stream(ChatCall(body, api_key=KEY)))
    head, tail = (chunk["choices"][0]["delta"]["tool_calls"][0] for chunk in chunks[:2])
    assert (head["index"], head["type"], head["function"]) == (
        0,
        "function",
        {"name": "get_weather", "arguments": ""},
    )
    assert head["id"].startswith("call_")
    assert tail == {"index": 0, "function": {"arguments": '{"city": "Paris"}'}}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_json_mode(gemini: GeminiProvider, mock: respx.MockRouter) -> None:
    route = mock.post(GENERATE).respond(200, json=answer({"text": '{"ok": true}'}))
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
    json_schema = {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}
    for response_format, expected in [
        ({"type": "json_object"}, {"responseMimeType": "application/json"}),
        (json_schema, {"responseMimeType": "application/json", "responseJsonSchema": schema}),
    ]:
        body = request(response_format=response_format)
        completion = (await gemini.complete(ChatCall(body, api_key=KEY))).json()
        assert json.loads(completion["choices"][0]["message"]["content"]) == {"ok": True}
        assert sent(route)["generationConfig"] == expected


async def test_an_image_part(gemini: GeminiProvider, mock: respx.MockRouter) -> None:
    route = mock.post(GENERATE).respond(200, json=answer({"text": "A cat."}))
    content = [
        {"type": "text", "text": "What is it?"},
        {
            "type": "image_url",
            "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "low"},
        },
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]
    body = request(messages=[{"role": "user", "content": content}])
    await gemini.complete(ChatCall(body, api_key=KEY))
    text, inline, remote = sent(route)["contents"][0]["parts"]
    # google-genai spells Blob and FileData fields in snake_case; the API's JSON takes either.
    assert text == {"text": "What is it?"}
    assert inline["inlineData"]["mime_type"] == "image/png"
    assert base64.urlsafe_b64decode(inline["inlineData"]["data"]) == base64.b64decode(PNG)
    assert remote["fileData"] == {
        "file_uri": "https://example.com/cat.jpg",
        "mime_type": "image/jpeg",
    }


def google_error(code: int, status: str, message: str, *details: dict[str, Any]) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status, "details": list(details)}}


RETRY_INFO = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "36.5s"}
QUOTA = google_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded.", RETRY_INFO)
KEY_INVALID = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}


@pytest.mark.parametrize(
    ("status", "body", "headers", "expected"),
    [
        (
            400,
            google_error(400, "INVALID_ARGUMENT", "Bad turn."),
            {},
            (400, "invalid_request_error", "invalid_argument", None),
        ),
        (
            400,
            google_error(400, "INVALID_ARGUMENT", f"API key not valid: {KEY}", KEY_INVALID),
            {},
            (401, "authentication_error", "invalid_api_key", None),
        ),
        (
            403,
            google_error(403, "PERMISSION_DENIED", "Denied."),
            {},
            (403, "permission_error", "permission_denied", None),
        ),
        (
            404,
            google_error(404, "NOT_FOUND", "No such model."),
            {},
            (404, "not_found_error", "not_found", None),
        ),
        (429, QUOTA, {}, (429, "rate_limit_error", "resource_exhausted", "37")),
        (429, QUOTA, {"retry-after": "5"}, (429, "rate_limit_error", "resource_exhausted", "5")),
        (
            500,
            google_error(500, "INTERNAL", "Internal error."),
            {},
            (502, "upstream_error", "internal", None),
        ),
        (
            503,
            google_error(503, "UNAVAILABLE", "The model is overloaded."),
            {"retry-after": "10"},
            (502, "upstream_error", "unavailable", "10"),
        ),
    ],
)
async def test_upstream_errors_keep_their_class(
    gemini: GeminiProvider,
    mock: respx.MockRouter,
    status: int,
    body: dict[str, Any],
    headers: dict[str, str],
    expected: tuple[int, str, str, str | None],
) -> None:
    mock.post(GENERATE).respond(status, json=body, headers=headers)
    with pytest.raises(ProviderStatusError) as raised:
        await gemini.complete(ChatCall(request(), api_key=KEY))
    error = raised.value
    detail = json.loads(error.body)["error"]
    retry_after = error.headers.get("retry-after")
    assert (error.status_code, detail["type"], detail["code"], retry_after) == expected
    assert (error.provider, error.host) == ("gemini", "gemini.test")
    assert detail["message"].startswith("gemini: ")
    assert KEY not in f"{error} {error.message} {error.body!r} {error.__cause__!r}"


async def test_a_refused_stream_raises_before_returning(
    gemini: GeminiProvider, mock: respx.MockRouter
) -> None:
    mock.post(STREAM).respond(429, json=QUOTA)
    with pytest.raises(ProviderStatusError) as raised:
        await gemini.stream(ChatCall(request(stream=True), api_key=KEY))
    assert (raised.value.status_code, raised.value.headers) == (429, {"retry-after": "37"})


async def test_an_error_event_mid_stream_raises_from_iteration(
    gemini: GeminiProvider, mock: respx.MockRouter
) -> None:
    failure = google_error(503, "UNAVAILABLE", "The model is overloaded.")
    mock.post(STREAM).mock(return_value=events(answer({"text": "Hi"}, finish=None), failure))
    stream = await gemini.stream(ChatCall(request(stream=True), api_key=KEY))
    events_seen = aiter(stream)
    assert b'"content":"Hi"' in await anext(events_seen)
    with pytest.raises(ProviderStatusError) as raised:
        await anext(events_seen)
    await stream.aclose()
    assert raised.value.status_code == 502


class _DroppedAfterOneEvent(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"data: " + json.dumps(answer({"text": "Hi"}, finish=None)).encode() + b"\r\n\r\n"
        raise httpx.ReadError("connection reset by peer")


async def test_a_connection_lost_mid_stream_raises_from_iteration(
    gemini: GeminiProvider, mock: respx.MockRouter
) -> None:
    sse_headers = {"content-type": "text/event-stream"}
    dropped = httpx.Response(200, headers=sse_headers, stream=_DroppedAfterOneEvent())
    mock.post(STREAM).mock(return_value=dropped)
    stream = await gemini.stream(ChatCall(request(stream=True), api_key=KEY))
    events_seen = aiter(stream)
    assert b'"content":"Hi"' in await anext(events_seen)
    with pytest.raises(ProviderUnreachable):
        await anext(events_seen)
    await stream.aclose()


async def test_a_stream_that_stops_unfinished_is_a_protocol_error(
    gemini: GeminiProvider, mock: respx.MockRouter
) -> None:
    mock.post(STREAM).mock(return_value=events(answer({"text": "Hi"}, finish=None)))
    stream = await gemini.stream(ChatCall(request(stream=True), api_key=KEY))
    with pytest.raises(ProviderProtocolError):
        _ = [event async for event in stream]
    await stream.aclose()


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (httpx.ConnectError("Connection refused"), ProviderUnreachable),
        (httpx.ReadTimeout("too slow"), ProviderTimeout),
    ],
)
async def test_transport_failures(
    gemini: GeminiProvider,
    mock: respx.MockRouter,
    failure: Exception,
    expected: type[Exception],
) -> None:
    mock.post(GENERATE).mock(side_effect=failure)
    with pytest.raises(expected) as raised:
        await gemini.complete(ChatCall(request(), api_key=KEY))
    assert KEY not in str(raised.value)


async def test_connection_refused_by_a_real_socket() -> None:
    async with httpx.AsyncClient(timeout=5.0) as client:
        provider = GeminiProvider(client, base_url="http://127.0.0.1:9", default_api_key=KEY)
        with pytest.raises(ProviderUnreachable) as raised:
            await provider.complete(ChatCall(request()))
    assert (raised.value.provider, raised.value.host) == ("gemini", "127.0.0.1")
    assert KEY not in str(raised.value)


async def test_the_key_is_the_calls_else_the_default_never_the_environments(
    mock: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("GEMINI_API_KEY", "GOOGLE_API_KEY"):
        monkeypatch.setenv(name, "key-from-the-environment")
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", "http://elsewhere.test")
    monkeypatch.setenv("GOOGLE_GENAI_API_VERSION", "v1alpha")
    monkeypatch.setenv("GOOGLE_GENAI_USE_VERTEXAI", "true")
    route = mock.post(GENERATE).respond(200, json=answer({"text": "ok"}))
    async with httpx.AsyncClient() as client:
        keyless = GeminiProvider(client, base_url=BASE)
        with pytest.raises(ProviderStatusError) as raised:
            await keyless.complete(ChatCall(request()))
        assert raised.value.status_code == 401
        assert not route.called
        served = GeminiProvider(client, base_url=BASE, default_api_key="server-key")
        await served.complete(ChatCall(request()))
        await served.complete(ChatCall(request(), api_key=KEY))
    assert [call.request.headers["x-goog-api-key"] for call in route.calls] == ["server-key", KEY]


async def test_unsupported_parameters_are_refused_before_any_request(
    gemini: GeminiProvider, mock: respx.MockRouter
) -> None:
    route = mock.post(url__startswith=BASE)
    with pytest.raises(UnsupportedParameter) as refused:
        await gemini.complete(ChatCall(request(logit_bias={"1": 5}), api_key=KEY))
    with pytest.raises(UnsupportedParameter):
        await gemini.stream(ChatCall(request(stream=True, n=2, top_logprobs=3), api_key=KEY))
    assert refused.value.param == "logit_bias"
    assert not route.called


async def test_list_models(gemini: GeminiProvider, mock: respx.MockRouter) -> None:
    flash = {"name": "models/gemini-2.5-flash", "displayName": "Gemini 2.5 Flash",
             "supportedGenerationMethods": ["generateContent", "countTokens"]}  # fmt: skip
    embedder = {"name": "models/text-embedding-004", "supportedGenerationMethods": ["embedContent"]}
    pro = {"name": "models/gemini-2.5-pro", "supportedGenerationMethods": ["generateContent"]}
    route = mock.get(f"{BASE}/v1beta/models").mock(
        side_effect=[
            httpx.Response(200, json={"models": [flash, embedder], "nextPageToken": "p2"}),
            httpx.Response(200, json={"models": [pro]}),
        ]
    )
    listed = (await gemini.list_models(KEY)).json()
    assert listed == {
        "object": "list",
        "data": [
            {"id": "gemini-2.5-flash", "object": "model", "created": 0, "owned_by": "google"},
            {"id": "gemini-2.5-pro", "object": "model", "created": 0, "owned_by": "google"},
        ],
    }
    assert [call.request.headers["x-goog-api-key"] for call in route.calls] == [KEY, KEY]
    assert route.calls[1].request.url.params["pageToken"] == "p2"
