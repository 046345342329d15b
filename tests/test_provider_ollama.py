"""The Ollama adapter: table tests of its translation, and the HTTP the ollama SDK sends."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import ollama
import pytest
import respx

from providers.base import ChatCall
from providers.errors import (
    ProviderError,
    ProviderProtocolError,
    ProviderStatusError,
    ProviderTimeout,
    ProviderUnreachable,
)
from providers.ollama import OllamaProvider, OllamaStream, UnsupportedParameter
from providers.ollama_wire import ChunkTranslator, from_ollama, to_ollama

pytestmark = pytest.mark.anyio

HOST = "http://localhost:11434"
PNG = b"\x89PNG\r\n\x1a\n fake image"
PNG_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
USAGE = {"prompt_tokens": 26, "completion_tokens": 4, "total_tokens": 30}
PARIS = '{"city": "Paris"}'
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city"}},
            "required": ["city"],
        },
    },
}


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": list(parts)}


def openai_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def ollama_call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"function": {"name": name, "arguments": arguments}}


QUESTION = {"role": "user", "content": "Weather in Paris?"}
ROUND_TRIP = [
    QUESTION,
    {"role": "assistant", "content": None, "tool_calls": [openai_call("c1", "get_weather", PARIS)]},
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
]
OLLAMA_ROUND_TRIP = [
    QUESTION,
    {"role": "assistant", "content": "", "tool_calls": [ollama_call("get_weather", city="Paris")]},
    {"role": "tool", "content": '{"temp": 21}', "tool_name": "get_weather"},
]


def part(content: str = "", done: bool = False, **fields: Any) -> dict[str, Any]:
    """One Ollama /api/chat answer (or NDJSON line), shaped as Ollama documents it."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if "tool_calls" in fields:
        message["tool_calls"] = fields.pop("tool_calls")
    answer = {"model": "llama3.2", "created_at": "2025-01-01T00:00:00Z", "message": message}
    if done:
        answer |= {"done_reason": "stop", "total_duration": 1, "prompt_eval_count": 26}
        answer |= {"eval_count": 4, **fields}
    return answer | {"done": done}


def ndjson(*parts: dict[str, Any]) -> httpx.Response:
    lines = b"".join(json.dumps(line).encode() + b"\n" for line in parts)
    return httpx.Response(200, content=lines, headers={"content-type": "application/x-ndjson"})


# --- to_ollama ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([{"role": "system", "content": "Brief."}], [{"role": "system", "content": "Brief."}]),
        ([{"role": "developer", "content": "Hi"}], [{"role": "system", "content": "Hi"}]),
        ([user(text("a"), text("b"))], [{"role": "user", "content": "a\nb"}]),
        (
            [user(text("What?"), image(PNG_URL))],
            [{"role": "user", "content": "What?", "images": [PNG]}],
        ),
        (ROUND_TRIP, OLLAMA_ROUND_TRIP),
        (
            [{"role": "function", "name": "f", "content": "1"}],
            [{"role": "tool", "content": "1", "tool_name": "f"}],
        ),
    ],
    ids=["system", "developer", "text-parts", "image", "tool-round-trip", "function"],
)
def test_messages_translate(messages: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert to_ollama({"model": "llama3.2", "messages": messages})["messages"] == expected


JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}


@pytest.mark.parametrize(
    ("fields", "key", "expected"),
    [
        ({}, "options", None),
        ({"temperature": 0.2, "seed": 7}, "options", {"temperature": 0.2, "seed": 7}),
        ({"top_p": 0.9, "presence_penalty": 1}, "options", {"top_p": 0.9, "presence_penalty": 1}),
        ({"max_tokens": 10}, "options", {"num_predict": 10}),
        ({"max_tokens": 10, "max_completion_tokens": 20}, "options", {"num_predict": 20}),
        ({"stop": "END"}, "options", {"stop": ["END"]}),
        ({"stop": ["a", "b"], "n": 1}, "options", {"stop": ["a", "b"]}),
        ({"response_format": {"type": "text"}}, "format", None),
        ({"response_format": {"type": "json_object"}}, "format", "json"),
        ({"response_format": JSON_SCHEMA}, "format", {"type": "object"}),
        ({"tools": [WEATHER_TOOL]}, "tools", [WEATHER_TOOL]),
        ({"tools": [WEATHER_TOOL], "tool_choice": "auto"}, "tools", [WEATHER_TOOL]),
        ({"tools": [WEATHER_TOOL], "tool_choice": "none"}, "tools", None),
    ],
)
def test_parameters_translate(fields: dict[str, Any], key: str, expected: Any) -> None:
    request = to_ollama({"model": "llama3.2", "messages": [], **fields})
    assert request[key] == expected


FORCED = {"type": "function", "function": {"name": "get_weather"}}
BAD_ARGUMENTS = {"role": "assistant", "tool_calls": [openai_call("c1", "f", "{oops")]}
NOT_A_CALL = {"role": "assistant", "tool_calls": ["get_weather"]}
ARRAY_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}
SYSTEM_IMAGE = {"role": "system", "content": [image(PNG_URL)]}
FIRST_PART = "messages[0].content[0]"


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"n": 2}, "n", "n must be 1"),
        ({"tool_choice": "required", "tools": [WEATHER_TOOL]}, "tool_choice", "cannot force"),
        ({"tool_choice": FORCED, "tools": [WEATHER_TOOL]}, "tool_choice", "cannot force"),
        ({"tools": [{"type": "web_search"}]}, "tools[0]", "only function tools"),
        ({"logprobs": True}, "logprobs", "does not support"),
        ({"response_format": {"type": "grammar"}}, "response_format", "does not support"),
        ({"model": ""}, "model", "Ollama model"),
        ({"messages": [user(image("https://x.test/a.png"))]}, f"{FIRST_PART}.image_url", "inline"),
        ({"messages": [user(image("data:image/png,raw"))]}, f"{FIRST_PART}.image_url", "base64"),
        # Text the SDK would otherwise take for a path on this machine, and read.
        (
            {"messages": [user(image("data:image/png;base64,/etc//passwd!"))]},
            f"{FIRST_PART}.image_url",
            "not valid base64",
        ),
        ({"messages": [user({"type": "input_audio"})]}, FIRST_PART, "cannot take"),
        ({"messages": [SYSTEM_IMAGE]}, FIRST_PART, "cannot take"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "no 'robot'"),
        ({"messages": [BAD_ARGUMENTS]}, "messages[0].tool_calls[0].function", "JSON object"),
        ({"messages": [NOT_A_CALL]}, "messages[0].tool_calls[0].function", "JSON object"),
        ({"tools": [ARRAY_TOOL]}, "tools[0]", "cannot read this tool"),
        ({"stop": [1, 2]}, "stop", "list of strings"),
        ({"response_format": "json"}, "response_format", "must be an object"),
    ],
)
def test_what_ollama_cannot_honour_is_refused(
    fields: dict[str, Any], param: str, words: str
) -> None:
    with pytest.raises(UnsupportedParameter, match=words) as refused:
        to_ollama({"model": "llama3.2", "messages": [], **fields})
    assert refused.value.param == param
    assert isinstance(refused.value, ValueError)


# --- from_ollama and the chunk translator -----------------------------------------------------


def done(content: str = "", **fields: Any) -> ollama.ChatResponse:
    return ollama.ChatResponse(**part(content, done=True, **fields))


TWO_CALLS = [ollama_call("get_weather", city="Paris"), ollama_call("now")]


@pytest.mark.parametrize(
    ("response", "message", "finish"),
    [
        (done("Hello!"), {"role": "assistant", "content": "Hello!"}, "stop"),
        (done("Hel", done_reason="length"), {"role": "assistant", "content": "Hel"}, "length"),
        (
            done(tool_calls=TWO_CALLS),
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    openai_call("call_abc_0", "get_weather", PARIS),
                    openai_call("call_abc_1", "now", "{}"),
                ],
            },
            "tool_calls",
        ),
    ],
    ids=["text", "length", "tool-calls"],
)
def test_answers_translate(response: ollama.ChatResponse, message: Any, finish: str) -> None:
    assert from_ollama(response, "llama3.2", "chatcmpl-abc", 1700000000) == {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "llama3.2",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": USAGE,
    }


def test_streamed_parts_become_openai_chunks() -> None:
    translator = ChunkTranslator("llama3.2", "chatcmpl-abc", 1700000000, include_usage=True)
    lines = [part("Let me check."), part(tool_calls=TWO_CALLS[:1]), part(done=True)]
    chunks = [c for line in lines for c in translator.translate(ollama.ChatResponse(**line))]
    assert {(c["id"], c["object"], c["created"], c["model"]) for c in chunks} == {
        ("chatcmpl-abc", "chat.completion.chunk", 1700000000, "llama3.2")
    }
    first_fragment = {**openai_call("call_abc_0", "get_weather", ""), "index": 0}
    assert [c["choices"][0]["delta"] if c["choices"] else c["usage"] for c in chunks] == [
        {"role": "assistant", "content": ""},
        {"content": "Let me check."},
        {"tool_calls": [first_fragment]},
        {"tool_calls": [{"index": 0, "function": {"arguments": PARIS}}]},
        {},
        USAGE,
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * 4 + ["tool_calls"]


# --- over HTTP, as the ollama SDK sends it -----------------------------------------------------


@pytest.fixture
def api() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=HOST, assert_all_called=False) as router:
        yield router


@pytest.fixture
async def provider() -> AsyncIterator[OllamaProvider]:
    client = ollama.AsyncClient(host=HOST)
    yield OllamaProvider(client, HOST)
    await client.close()


def chat(*messages: dict[str, Any], **fields: Any) -> ChatCall:
    body = {"model": "llama3.2", "messages": list(messages), **fields}
    return ChatCall(body, api_key="sk-not-for-ollama")  # type: ignore[arg-type]


def sent(route: respx.Route, index: int = -1) -> Any:
    return json.loads(route.calls[index].request.content)


async def read(stream: OllamaStream, into: list[bytes] | None = None) -> list[Any]:
    """The chunk events of a whole stream, checking it ends with [DONE]."""
    received = [] if into is None else into
    async for frame in stream:
        received.append(frame)
    frames = b"".join(received).decode().split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""]
    return [json.loads(frame.removeprefix("data: ")) for frame in frames[:-2]]


async def test_plain_text(api: respx.MockRouter, provider: OllamaProvider) -> None:
    route = api.post("/api/chat").respond(json=part("Hello there!", done=True))
    hi = {"role": "user", "content": "Hi"}
    body = (await provider.complete(chat(hi, temperature=0.1, max_tokens=50))).json()
    assert body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello there!"}
    assert (body["model"], body["choices"][0]["finish_reason"]) == ("llama3.2", "stop")
    assert body["usage"] == USAGE
    assert "sk-not-for-ollama" not in str(route.calls.last.request.headers)
    assert sent(route) == {
        "model": "llama3.2",
        "messages": [hi],
        "tools": [],
        "stream": False,
        "options": {"temperature": 0.1, "num_predict": 50},
    }


async def test_streaming(api: respx.MockRouter, provider: OllamaProvider) -> None:
    lines = ndjson(part("The"), part(" sky"), part(" is blue."), part(done=True))
    route = api.post("/api/chat").mock(return_value=lines)
    call = chat(QUESTION, stream=True, stream_options={"include_usage": True})
    stream = await provider.stream(call)
    chunks = await read(stream)
    await stream.aclose()
    assert sent(route)["stream"] is True
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(delta.get("content", "") for delta in deltas) == "The sky is blue."
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert (chunks[-1]["choices"], chunks[-1]["usage"]) == ([], USAGE)


async def test_streaming_without_usage(api: respx.MockRouter, provider: OllamaProvider) -> None:
    api.post("/api/chat").mock(return_value=ndjson(part("Hi"), part(done=True)))
    chunks = await read(await provider.stream(chat(QUESTION, stream=True)))
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in chunk for chunk in chunks)


async def test_tool_call_round_trip(api: respx.MockRouter, provider: OllamaProvider) -> None:
    route = api.post("/api/chat").mock(
        side_effect=[
            httpx.Response(200, json=part(tool_calls=TWO_CALLS[:1], done=True)),
            httpx.Response(200, json=part("It is 21°C in Paris.", done=True)),
        ]
    )
    first = (await provider.complete(chat(QUESTION, tools=[WEATHER_TOOL]))).json()
    assistant = first["choices"][0]["message"]
    [call] = assistant["tool_calls"]
    assert first["choices"][0]["finish_reason"] == "tool_calls"
    assert call == openai_call(call["id"], "get_weather", PARIS)
    assert call["id"].startswith("call_")
    assert sent(route, 0)["tools"] == [WEATHER_TOOL]

    result = {"role": "tool", "tool_call_id": call["id"], "content": '{"temp": 21}'}
    final = await provider.complete(chat(QUESTION, assistant, result, tools=[WEATHER_TOOL]))
    assert final.json()["choices"][0]["message"]["content"] == "It is 21°C in Paris."
    # The SDK leaves out empty fields, so the assistant turn goes without content.
    assistant_turn = {k: v for k, v in OLLAMA_ROUND_TRIP[1].items() if v}
    assert sent(route, 1)["messages"] == [QUESTION, assistant_turn, OLLAMA_ROUND_TRIP[2]]


async def test_streamed_tool_calls(api: respx.MockRouter, provider: OllamaProvider) -> None:
    calls = [ollama_call("get_weather", city="Paris"), ollama_call("get_weather", city="Oslo")]
    api.post("/api/chat").mock(return_value=ndjson(part(tool_calls=calls), part(done=True)))
    chunks = await read(await provider.stream(chat(QUESTION, tools=[WEATHER_TOOL], stream=True)))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    fragments = [delta["tool_calls"][0] for delta in deltas if "tool_calls" in delta]
    assert [(f["index"], f.get("id", "")[:5], f["function"]) for f in fragments] == [
        (0, "call_", {"name": "get_weather", "arguments": ""}),
        (0, "", {"arguments": PARIS}),
        (1, "call_", {"name": "get_weather", "arguments": ""}),
        (1, "", {"arguments": '{"city": "Oslo"}'}),
    ]
    assert fragments[0]["id"] != fragments[2]["id"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_json_mode(api: respx.MockRouter, provider: OllamaProvider) -> None:
    route = api.post("/api/chat").respond(json=part('{"colour": "blue"}', done=True))
    call = chat(QUESTION, response_format={"type": "json_object"})
    answer = (await provider.complete(call)).json()
    assert json.loads(answer["choices"][0]["message"]["content"]) == {"colour": "blue"}
    assert sent(route)["format"] == "json"


async def test_image_part_goes_inline(api: respx.MockRouter, provider: OllamaProvider) -> None:
    route = api.post("/api/chat").respond(json=part("A cat.", done=True))
    await provider.complete(chat(user(text("What?"), image(PNG_URL))))
    images = [base64.b64encode(PNG).decode()]
    assert sent(route)["messages"] == [{"role": "user", "content": "What?", "images": images}]


async def test_refused_request_sends_nothing(
    api: respx.MockRouter, provider: OllamaProvider
) -> None:
    route = api.post("/api/chat")
    with pytest.raises(UnsupportedParameter):
        await provider.complete(chat(QUESTION, n=3))
    assert not route.called


@pytest.mark.parametrize(
    ("status", "error", "kind", "code"),
    [
        (404, 'model "nope" not found, try pulling it first', "not_found_error", "model_not_found"),
        (429, "too many requests", "rate_limit_error", "rate_limit_exceeded"),
        (500, "llama runner process has terminated", "upstream_error", "upstream_error"),
    ],
)
@pytest.mark.parametrize("streamed", [False, True], ids=["complete", "stream"])
async def test_upstream_errors_keep_their_class(
    api: respx.MockRouter,
    provider: OllamaProvider,
    streamed: bool,
    status: int,
    error: str,
    kind: str,
    code: str,
) -> None:
    api.post("/api/chat").respond(status, json={"error": error})
    call = chat(QUESTION, stream=streamed)
    with pytest.raises(ProviderStatusError) as raised:
        await (provider.stream(call) if streamed else provider.complete(call))
    refusal = raised.value
    relayed = 502 if status >= 500 else status  # Ollama's own failure: a bad gateway
    assert (refusal.provider, refusal.host, refusal.status_code) == ("ollama", "localhost", relayed)
    assert json.loads(refusal.body) == {
        "error": {
            "message": f"ollama ({status}): {error}",
            "type": kind,
            "code": code,
            "param": None,
        }
    }
    assert refusal.headers == ({"Retry-After": "1"} if status == 429 else {})


async def test_error_mid_stream_raises_from_iteration(
    api: respx.MockRouter, provider: OllamaProvider
) -> None:
    api.post("/api/chat").mock(return_value=ndjson(part("Once"), {"error": "out of memory"}))
    stream = await provider.stream(chat(QUESTION, stream=True))
    received: list[bytes] = []
    with pytest.raises(ProviderStatusError) as raised:
        await read(stream, into=received)
    assert len(received) == 2  # the role, then "Once"
    assert raised.value.status_code == 502
    assert "out of memory" in json.loads(raised.value.body)["error"]["message"]


async def read_all(provider: OllamaProvider) -> list[Any]:
    return await read(await provider.stream(chat(QUESTION, stream=True)))


@pytest.mark.parametrize(
    "answer",
    [ndjson(part("Once")), httpx.Response(200, content=b"{not json\n")],
    ids=["ends-before-done", "not-json"],
)
async def test_broken_streams(
    api: respx.MockRouter, provider: OllamaProvider, answer: httpx.Response
) -> None:
    api.post("/api/chat").mock(return_value=answer)
    with pytest.raises(ProviderProtocolError):
        await read_all(provider)


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (httpx.ConnectError("[Errno 111] Connection refused"), ProviderUnreachable),
        (httpx.ReadTimeout("timed out"), ProviderTimeout),
    ],
)
@pytest.mark.parametrize("streamed", [False, True], ids=["complete", "stream"])
async def test_transport_failures(
    api: respx.MockRouter,
    provider: OllamaProvider,
    failure: Exception,
    expected: type[ProviderError],
    streamed: bool,
) -> None:
    api.post("/api/chat").mock(side_effect=failure)
    call = chat(QUESTION)
    with pytest.raises(expected) as raised:
        await (provider.stream(call) if streamed else provider.complete(call))
    assert (raised.value.provider, raised.value.host) == ("ollama", "localhost")


async def test_list_models(api: respx.MockRouter, provider: OllamaProvider) -> None:
    details = {"format": "gguf", "family": "llama", "parameter_size": "3.2B"}
    tag = {"name": "llama3.2:latest", "model": "llama3.2:latest", "size": 2019393189}
    tag |= {"modified_at": "2025-05-10T08:06:48Z", "digest": "a80c4f17", "details": details}
    api.get("/api/tags").respond(json={"models": [tag]})
    # Modified times become `created`; the lead's /v1/models adds the ollama/ prefix.
    model = {
        "id": "llama3.2:latest",
        "object": "model",
        "created": 1746864408,
        "owned_by": "ollama",
    }
    assert (await provider.list_models(None)).json() == {"object": "list", "data": [model]}


async def test_list_models_when_ollama_is_down(
    api: respx.MockRouter, provider: OllamaProvider
) -> None:
    api.get("/api/tags").mock(side_effect=httpx.ConnectError("[Errno 111] Connection refused"))
    with pytest.raises(ProviderUnreachable):
        await provider.list_models(None)
