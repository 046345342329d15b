"""Issue 4 end to end: one Engram, three providers, the official openai SDK as the client.

Each provider is a local fake served over real HTTP (OpenAI, Ollama, Gemini), so
every request crosses the real SDKs on both sides. Tests parametrized by
`target` run the same code for `gpt-4o-mini`, `ollama/llama3.2` and
`gemini/gemini-2.5-flash`: only `model` changes; what each fake received is
read in its own API's dialect by a Reader. The first runs the README's own
script, taken from its Providers section.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg
import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageToolCall

from tests.conftest import Engram, User, eventually, repo_root
from tests.fakes.gemini_server import THOUGHT_SIGNATURE, FakeGemini, GeminiReceived
from tests.fakes.ollama_server import FakeOllama
from tests.fakes.openai_server import FakeOpenAI, Received, Scripted
from tests.fakes.serving import serve_in_thread

pytestmark = pytest.mark.anyio

StartEngram = Callable[..., AbstractContextManager[Engram]]

SERVER_OPENAI_KEY = "sk-server-openai-key"
SERVER_GEMINI_KEY = "gm-test-key"
BYOK = "byok-caller-provider-key"
MEMORY = "I prefer espresso over drip"
QUESTION = "What coffee should I order?"
PNG = b"\x89PNG\r\n\x1a\n a fake image"
PNG_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
PARIS = {"city": "Paris"}
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
# One scripted call serves every fake: each speaks it in its own API's dialect.
TOOL_CALL = {
    "id": "call_fake_openai_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": json.dumps(PARIS)},
}


# --- reading what each fake received, in its own dialect ---------------------------------------


class Reader(Protocol):
    def model(self, sent: Received) -> str: ...
    def key(self, sent: Received) -> str | None: ...
    def system_text(self, sent: Received) -> str: ...
    def last_user_text(self, sent: Received) -> str: ...
    def tool_names(self, sent: Received) -> list[str]: ...
    def tool_round_trip(self, sent: Received) -> tuple[str, dict[str, Any], str, str]: ...
    def json_mode(self, sent: Received) -> bool: ...
    def image(self, sent: Received) -> bytes: ...


class OpenAIReader:
    def model(self, sent: Received) -> str:
        return str(sent.body["model"])

    def key(self, sent: Received) -> str | None:
        value = sent.headers.get("authorization")
        return value.removeprefix("Bearer ") if value else None

    def system_text(self, sent: Received) -> str:
        return sent.system_text

    def last_user_text(self, sent: Received) -> str:
        content = [m for m in sent.messages if m["role"] == "user"][-1]["content"]
        return content if isinstance(content, str) else content[0]["text"]

    def tool_names(self, sent: Received) -> list[str]:
        return [tool["function"]["name"] for tool in sent.body.get("tools") or []]

    def tool_round_trip(self, sent: Received) -> tuple[str, dict[str, Any], str, str]:
        """(name, arguments) of the replayed call; (name it answers, output) of the result."""
        call, result = sent.messages[-2]["tool_calls"][0], sent.messages[-1]
        assert (result["role"], result["tool_call_id"]) == ("tool", call["id"])
        function = call["function"]
        return (
            function["name"],
            json.loads(function["arguments"]),
            function["name"],
            result["content"],
        )

    def json_mode(self, sent: Received) -> bool:
        return bool(sent.body.get("response_format") == {"type": "json_object"})

    def image(self, sent: Received) -> bytes:
        url = sent.messages[-1]["content"][1]["image_url"]["url"]
        return base64.b64decode(url.partition(",")[2])


class OllamaReader:
    def model(self, sent: Received) -> str:
        return str(sent.body["model"])

    def key(self, sent: Received) -> str | None:
        return sent.headers.get("authorization")

    def system_text(self, sent: Received) -> str:
        return sent.system_text

    def last_user_text(self, sent: Received) -> str:
        return str([m for m in sent.messages if m["role"] == "user"][-1]["content"])

    def tool_names(self, sent: Received) -> list[str]:
        return [tool["function"]["name"] for tool in sent.body.get("tools") or []]

    def tool_round_trip(self, sent: Received) -> tuple[str, dict[str, Any], str, str]:
        call, result = sent.messages[-2]["tool_calls"][0]["function"], sent.messages[-1]
        assert result["role"] == "tool"
        return call["name"], call["arguments"], result["tool_name"], result["content"]

    def json_mode(self, sent: Received) -> bool:
        return bool(sent.body.get("format") == "json")

    def image(self, sent: Received) -> bytes:
        return base64.b64decode(sent.messages[-1]["images"][0])


class GeminiReader:
    def model(self, sent: Received) -> str:
        assert isinstance(sent, GeminiReceived)
        return sent.model  # named in the URL: /v1beta/models/{model}:generateContent

    def key(self, sent: Received) -> str | None:
        return sent.headers.get("x-goog-api-key")

    def system_text(self, sent: Received) -> str:
        return sent.system_text  # GeminiReceived reads systemInstruction

    def last_user_text(self, sent: Received) -> str:
        turns = [c for c in sent.body["contents"] if c["role"] == "user"]
        return str(turns[-1]["parts"][0]["text"])

    def tool_names(self, sent: Received) -> list[str]:
        tools = sent.body.get("tools") or []
        return [d["name"] for tool in tools for d in tool.get("functionDeclarations") or []]

    def tool_round_trip(self, sent: Received) -> tuple[str, dict[str, Any], str, str]:
        model_turn, tool_turn = sent.body["contents"][-2:]
        [call_part] = model_turn["parts"]
        [result_part] = tool_turn["parts"]
        assert (model_turn["role"], tool_turn["role"]) == ("model", "user")
        # Gemini refuses a replayed call without the signature it came with.
        assert call_part["thoughtSignature"] == THOUGHT_SIGNATURE
        call, result = call_part["functionCall"], result_part["functionResponse"]
        return call["name"], call["args"], result["name"], result["response"]["output"]

    def json_mode(self, sent: Received) -> bool:
        return bool(sent.body["generationConfig"].get("responseMimeType") == "application/json")

    def image(self, sent: Received) -> bytes:
        inline = sent.body["contents"][-1]["parts"][1]["inlineData"]
        # Gemini reads proto field names in either case; google-genai sends mime_type.
        assert inline.get("mimeType", inline.get("mime_type")) == "image/png"
        return base64.b64decode(inline["data"])


Fake = FakeOpenAI | FakeOllama | FakeGemini


@dataclass(frozen=True)
class Target:
    """One provider behind Engram: the model a client names, and the fake that answers."""

    model: str
    provider: str
    bare_model: str
    fake: Fake
    reader: Reader
    server_key: str | None  # what reaches the fake when the caller brings no key

    def last(self) -> Received:
        return self.fake.last()


MODELS = {
    "openai": "gpt-4o-mini",
    "ollama": "ollama/llama3.2",
    "gemini": "gemini/gemini-2.5-flash",
}


def memories_json(*contents: str) -> str:
    return json.dumps(
        {"memories": [{"content": text, "kind": "fact", "confidence": 0.9} for text in contents]}
    )


def sdk(engram: Engram, user: User, **headers: str) -> openai.OpenAI:
    """A client as an application would hold it: the Engram key, provider keys server-side."""
    return openai.OpenAI(
        base_url=f"{engram.url}/v1", api_key=user.api_key, default_headers=headers, max_retries=0
    )


def trio_settings(
    upstream: FakeOpenAI, ollama: FakeOllama, gemini: FakeGemini, **more: Any
) -> dict[str, Any]:
    return {
        "openai_base_url": f"{upstream.url}/v1",  # type: ignore[attr-defined]
        "openai_api_key": SERVER_OPENAI_KEY,
        "ollama_base_url": ollama.url,
        "gemini_base_url": gemini.url,
        "gemini_api_key": SERVER_GEMINI_KEY,
        **more,
    }


@pytest.fixture(scope="module")
def ollama() -> Iterator[FakeOllama]:
    fake = FakeOllama()
    with serve_in_thread(fake.app) as url:
        fake.url = url
        yield fake


@pytest.fixture(scope="module")
def gemini() -> Iterator[FakeGemini]:
    fake = FakeGemini()
    with serve_in_thread(fake.app) as url:
        fake.url = url
        yield fake


@pytest.fixture(scope="module")
def trio(
    start_engram: StartEngram, upstream: FakeOpenAI, ollama: FakeOllama, gemini: FakeGemini
) -> Iterator[Engram]:
    """One Engram in front of all three fakes."""
    with start_engram(**trio_settings(upstream, ollama, gemini)) as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh_fakes(upstream: FakeOpenAI, ollama: FakeOllama, gemini: FakeGemini) -> None:
    for fake in (upstream, ollama, gemini):
        fake.reset()


@pytest.fixture
def user(trio: Engram) -> User:
    return trio.create_user()


@pytest.fixture(params=list(MODELS), ids=list(MODELS))
def target(
    request: pytest.FixtureRequest, upstream: FakeOpenAI, ollama: FakeOllama, gemini: FakeGemini
) -> Target:
    provider: str = request.param
    fakes: dict[str, tuple[Fake, Reader, str | None]] = {
        "openai": (upstream, OpenAIReader(), SERVER_OPENAI_KEY),
        "ollama": (ollama, OllamaReader(), None),
        "gemini": (gemini, GeminiReader(), SERVER_GEMINI_KEY),
    }
    fake, reader, key = fakes[provider]
    model = MODELS[provider]
    return Target(model, provider, model.rpartition("/")[2], fake, reader, key)


# --- the script an application runs, whichever provider answers --------------------------------


@dataclass
class Streamed:
    """A streamed answer as the SDK's chunks delivered it."""

    chunks: list[ChatCompletionChunk]
    text: str = ""
    tool_fragments: list[Any] = field(default_factory=list)
    finish_reason: str | None = None

    @classmethod
    def read(cls, chunks: Iterable[ChatCompletionChunk]) -> Streamed:
        streamed = cls(list(chunks))
        for chunk in streamed.chunks:
            for choice in chunk.choices:
                streamed.text += choice.delta.content or ""
                streamed.tool_fragments += choice.delta.tool_calls or []
                streamed.finish_reason = choice.finish_reason or streamed.finish_reason
        return streamed


def readme_script(url: str, engram_key: str, model: str) -> str:
    """The script of the README's Providers section, pointed at `url`, only `model` changed."""
    readme = (repo_root() / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Providers\n", 1)[1].split("\n## ", 1)[0]
    script = section.split("```python\n", 1)[1].split("```", 1)[0]
    for placeholder in ('"http://127.0.0.1:8000/v1"', '"egm_…"', 'model = "'):
        assert script.count(placeholder) == 1, placeholder
    script = script.replace('"http://127.0.0.1:8000/v1"', repr(f"{url}/v1"))
    script = script.replace('"egm_…"', repr(engram_key))
    return re.sub(r'^model = ".*?"', f"model = {model!r}", script, count=1, flags=re.MULTILINE)


def test_the_readme_script_streams_and_calls_a_tool_with_memories_for_every_provider(
    trio: Engram, user: User, target: Target, capsys: pytest.CaptureFixture[str]
) -> None:
    trio.capture(user, MEMORY)
    target.fake.script(Scripted(), Scripted(tool_calls=[TOOL_CALL]))
    script = readme_script(trio.url, user.api_key, target.model)
    namespace: dict[str, Any] = {}
    try:
        exec(script, namespace)  # noqa: S102 - the README's own code, run as a reader would
    finally:
        if "client" in namespace:
            namespace["client"].close()

    printed = capsys.readouterr().out
    assert printed.startswith(target.fake.reply)  # the streamed answer, as text
    call = namespace["call"]
    assert (call.type, call.function.name) == ("function", "get_weather")
    assert call.id
    assert json.loads(call.function.arguments) == PARIS
    streamed_request, tool_request = target.fake.received
    assert target.reader.model(streamed_request) == target.bare_model  # the prefix is removed
    assert MEMORY in target.reader.system_text(streamed_request)  # memories injected
    assert target.reader.last_user_text(streamed_request) == QUESTION
    assert target.reader.tool_names(tool_request) == ["get_weather"]


# --- memories, keys and headers ----------------------------------------------------------------


def test_a_captured_memory_reaches_the_provider_and_the_headers_say_so(
    trio: Engram, user: User, target: Target
) -> None:
    trio.capture(user, MEMORY)
    with sdk(trio, user) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=target.model,
            messages=[
                {"role": "system", "content": "You are a barista."},
                {"role": "user", "content": QUESTION},
            ],
        )
    completion = raw.parse()

    assert completion.choices[0].message.content == target.fake.reply
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == target.bare_model
    assert completion.usage is not None
    assert completion.usage.total_tokens > 0
    assert raw.headers["x-engram-memories-injected"] == "1"
    assert raw.headers["x-engram-retrieval-id"]
    sent = target.last()
    system = target.reader.system_text(sent)
    assert system.startswith("You are a barista.")  # the application's own prompt comes first
    assert MEMORY in system
    assert target.reader.key(sent) == target.server_key
    assert user.api_key not in json.dumps(sent.headers)
    assert not any(name.startswith("x-engram") for name in sent.headers)


def test_a_streamed_answer_arrives_as_text_with_a_final_usage_chunk(
    trio: Engram, user: User, target: Target
) -> None:
    trio.capture(user, MEMORY)
    with (
        sdk(trio, user) as client,
        client.chat.completions.with_streaming_response.create(
            model=target.model,
            messages=[{"role": "user", "content": QUESTION}],
            stream=True,
            stream_options={"include_usage": True},
        ) as response,
    ):
        assert response.headers["x-engram-memories-injected"] == "1"
        assert response.headers["content-type"].startswith("text/event-stream")
        streamed = Streamed.read(response.parse())

    assert streamed.text.strip() == target.fake.reply
    assert streamed.chunks[0].choices[0].delta.role == "assistant"
    assert streamed.finish_reason == "stop"
    assert len({chunk.id for chunk in streamed.chunks}) == 1
    usage_chunk = streamed.chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.total_tokens > 0
    assert MEMORY in target.reader.system_text(target.last())


def test_a_gemini_key_brought_by_the_caller_is_used_for_gemini(
    trio: Engram, user: User, gemini: FakeGemini
) -> None:
    with trio.client(user) as client:  # X-Engram-Key, and Authorization: Bearer <provider key>
        client.chat.completions.create(
            model=MODELS["gemini"], messages=[{"role": "user", "content": "Hi"}]
        )
    assert GeminiReader().key(gemini.last()) == "sk-test-provider-key"


# --- tool calls --------------------------------------------------------------------------------


def test_a_tool_call_arrives_whole_and_streamed(trio: Engram, user: User, target: Target) -> None:
    target.fake.script(Scripted(tool_calls=[TOOL_CALL]), Scripted(tool_calls=[TOOL_CALL]))
    ask = {
        "model": target.model,
        "messages": [{"role": "user", "content": "What's the weather in Paris?"}],
        "tools": [WEATHER_TOOL],
    }
    with sdk(trio, user) as client:
        whole = client.chat.completions.create(**ask)
        streamed = Streamed.read(client.chat.completions.create(**ask, stream=True))

    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert isinstance(call, ChatCompletionMessageToolCall)
    assert call.id
    assert (call.type, call.function.name) == ("function", "get_weather")
    assert json.loads(call.function.arguments) == PARIS

    # OpenAI's streamed shape: index, id, type and name on the first fragment, then arguments.
    assert streamed.chunks[0].choices[0].delta.role == "assistant"
    first, *rest = streamed.tool_fragments
    assert first.index == 0
    assert first.id
    assert first.type == "function"
    assert first.function.name == "get_weather"
    assert rest
    assert all(f.index == 0 and f.id is None and f.function.name is None for f in rest)
    arguments = (first.function.arguments or "") + "".join(f.function.arguments for f in rest)
    assert json.loads(arguments) == PARIS
    assert streamed.finish_reason == "tool_calls"
    assert target.reader.tool_names(target.last()) == ["get_weather"]


def test_the_tool_call_round_trip_reaches_the_provider_translated(
    trio: Engram, user: User, target: Target
) -> None:
    target.fake.script(Scripted(tool_calls=[TOOL_CALL]), Scripted(content="It is 21 °C in Paris."))
    messages: list[Any] = [{"role": "user", "content": "What's the weather in Paris?"}]
    with sdk(trio, user) as client:
        asked = client.chat.completions.create(
            model=target.model, messages=messages, tools=[WEATHER_TOOL]
        )
        assistant = asked.choices[0].message
        [call] = assistant.tool_calls or []
        messages.append(assistant)  # as the SDK's docs do: the message object, as it came
        messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'})
        final = client.chat.completions.create(
            model=target.model, messages=messages, tools=[WEATHER_TOOL]
        )

    assert final.choices[0].message.content == "It is 21 °C in Paris."
    assert final.choices[0].finish_reason == "stop"
    name, arguments, answered, output = target.reader.tool_round_trip(target.last())
    assert (name, arguments) == ("get_weather", PARIS)
    assert (answered, output) == ("get_weather", '{"temp_c": 21}')


# --- JSON mode and images ----------------------------------------------------------------------


def test_json_mode_reaches_the_provider_and_the_answer_is_json(
    trio: Engram, user: User, target: Target
) -> None:
    target.fake.script(Scripted(content='{"coffee": "espresso"}'))
    with sdk(trio, user) as client:
        completion = client.chat.completions.create(
            model=target.model,
            messages=[{"role": "user", "content": "Answer in JSON: which coffee?"}],
            response_format={"type": "json_object"},
        )
    assert json.loads(completion.choices[0].message.content or "") == {"coffee": "espresso"}
    assert target.reader.json_mode(target.last())


def test_an_image_part_reaches_the_provider(trio: Engram, user: User, target: Target) -> None:
    with sdk(trio, user) as client:
        completion = client.chat.completions.create(
            model=target.model,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is in this picture?"},
                        {"type": "image_url", "image_url": {"url": PNG_URL}},
                    ],
                }
            ],
        )
    assert completion.choices[0].message.content == target.fake.reply
    sent = target.last()
    assert target.reader.image(sent) == PNG
    assert target.reader.last_user_text(sent).startswith("What is in this picture?")


# --- upstream errors ---------------------------------------------------------------------------

# Ollama's SDK drops response headers, so the adapter sends a short Retry-After of its own.
RETRY_AFTER = {"openai": "7", "ollama": "1", "gemini": "7"}


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_a_rate_limit_keeps_429_and_retry_after(
    trio: Engram, user: User, target: Target, stream: bool
) -> None:
    target.fake.script(Scripted(status=429, headers={"Retry-After": "7"}))
    with (
        sdk(trio, user) as client,
        pytest.raises(openai.RateLimitError) as caught,
    ):
        client.chat.completions.create(
            model=target.model, messages=[{"role": "user", "content": "Hi"}], stream=stream
        )
    error = caught.value
    assert error.status_code == 429
    assert error.response.headers["retry-after"] == RETRY_AFTER[target.provider]
    assert isinstance(error.body, dict)
    assert error.body["message"]
    if target.provider != "openai":  # OpenAI's own error body is relayed as it came
        assert error.body["message"].startswith(target.provider)
        assert error.body["type"] == "rate_limit_error"


def test_a_cookie_the_provider_set_for_one_user_never_goes_out_with_another_users_call(
    trio: Engram, user: User, target: Target
) -> None:
    # Every user's calls share one HTTP client per provider: a cookie it kept
    # (a gateway's session, a load balancer's affinity) would travel between them.
    target.fake.script(Scripted(headers={"Set-Cookie": "session=first-users-session; Path=/"}))
    for caller in (user, trio.create_user()):
        with sdk(trio, caller) as client:
            client.chat.completions.create(
                model=target.model, messages=[{"role": "user", "content": "Hi"}]
            )
    first, second = target.fake.received
    assert "cookie" not in first.headers
    assert "cookie" not in second.headers


# OpenAI's errors are relayed with their own status (issue 2); translated providers'
# server errors become 502, a bad gateway, naming the provider (issue 4).
SERVER_ERROR_STATUS = {"openai": 500, "ollama": 502, "gemini": 502}


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_an_upstream_server_error(trio: Engram, user: User, target: Target, stream: bool) -> None:
    target.fake.script(Scripted(status=500))
    with sdk(trio, user) as client, pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(
            model=target.model, messages=[{"role": "user", "content": "Hi"}], stream=stream
        )
    error = caught.value
    assert error.status_code == SERVER_ERROR_STATUS[target.provider]
    assert isinstance(error.body, dict)
    if target.provider != "openai":
        assert error.body["message"].startswith(target.provider)
        assert error.body["type"] == "upstream_error"


@pytest.mark.parametrize("provider", ["ollama", "gemini"])
def test_a_provider_that_does_not_answer_in_time_is_504(
    start_engram: StartEngram,
    upstream: FakeOpenAI,
    ollama: FakeOllama,
    gemini: FakeGemini,
    provider: str,
) -> None:
    {"ollama": ollama, "gemini": gemini}[provider].delay = 2.0
    settings = trio_settings(upstream, ollama, gemini, upstream_read_timeout=0.3)
    with start_engram(**settings) as engram:
        user = engram.create_user()
        with sdk(engram, user) as client, pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(
                model=MODELS[provider], messages=[{"role": "user", "content": "Hi"}]
            )
    error = caught.value
    assert error.status_code == 504
    assert isinstance(error.body, dict)
    assert error.body["type"] == "timeout_error"
    assert provider in error.body["message"]


def test_an_error_after_the_first_streamed_byte_is_an_sse_error_event(
    trio: Engram, user: User, target: Target
) -> None:
    target.fake.script(Scripted(content="one two three", fail_mid_stream=True))
    chunks: list[ChatCompletionChunk] = []
    with sdk(trio, user) as client:
        stream = client.chat.completions.create(
            model=target.model, messages=[{"role": "user", "content": "Count"}], stream=True
        )
        with pytest.raises(openai.APIError) as caught:
            chunks.extend(stream)
    assert stream.response.status_code == 200
    assert not isinstance(caught.value, openai.APIStatusError)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).startswith("one")


# --- selecting the provider --------------------------------------------------------------------


def test_x_engram_provider_selects_the_provider(trio: Engram, user: User, target: Target) -> None:
    with sdk(trio, user, **{"X-Engram-Provider": target.provider}) as client:
        completion = client.chat.completions.create(
            model=target.bare_model, messages=[{"role": "user", "content": "Hi"}]
        )
    assert completion.choices[0].message.content == target.fake.reply
    assert target.reader.model(target.last()) == target.bare_model


def test_an_unknown_provider_is_400_listing_the_valid_ones(
    trio: Engram, user: User, upstream: FakeOpenAI, ollama: FakeOllama, gemini: FakeGemini
) -> None:
    with (
        sdk(trio, user, **{"X-Engram-Provider": "mistral"}) as client,
        pytest.raises(openai.BadRequestError) as caught,
    ):
        client.chat.completions.create(
            model="mistral-large", messages=[{"role": "user", "content": "Hi"}]
        )
    assert caught.value.status_code == 400
    assert isinstance(caught.value.body, dict)
    message = caught.value.body["message"]
    assert "mistral" in message
    assert "gemini, ollama, openai" in message
    assert upstream.received == ollama.received == gemini.received == []


@pytest.mark.parametrize(
    ("model", "fields", "param"),
    [
        (MODELS["ollama"], {"n": 2}, "n"),
        (MODELS["ollama"], {"tool_choice": "required", "tools": [WEATHER_TOOL]}, "tool_choice"),
        (MODELS["gemini"], {"logit_bias": {"50256": -100}}, "logit_bias"),
    ],
    ids=["ollama-n", "ollama-tool-choice", "gemini-logit-bias"],
)
def test_a_parameter_the_provider_cannot_honour_is_400_naming_it(
    trio: Engram,
    user: User,
    ollama: FakeOllama,
    gemini: FakeGemini,
    model: str,
    fields: dict[str, Any],
    param: str,
) -> None:
    with sdk(trio, user) as client, pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], **fields
        )
    error = caught.value
    assert error.status_code == 400
    assert isinstance(error.body, dict)
    assert error.body["param"] == param
    assert param in error.body["message"]
    assert error.body["code"] == "unsupported_parameter"
    assert ollama.received == gemini.received == []  # refused before anything was sent


# --- the model list ----------------------------------------------------------------------------


def model_ids(engram: Engram, user: User, **headers: str) -> list[str]:
    with sdk(engram, user, **headers) as client:
        return [model.id for model in client.models.list()]


def test_the_model_list_merges_every_provider_and_leaves_a_down_one_out(
    start_engram: StartEngram, upstream: FakeOpenAI, gemini: FakeGemini
) -> None:
    ollama = FakeOllama(models=["llama3.2:latest"])
    with ExitStack() as ollama_running:
        ollama.url = ollama_running.enter_context(serve_in_thread(ollama.app))
        with start_engram(**trio_settings(upstream, ollama, gemini)) as engram:
            user = engram.create_user()
            listed = model_ids(engram, user)
            assert listed == ["gpt-fake", "ollama/llama3.2:latest",
                              "gemini/gemini-2.5-flash", "gemini/gemini-2.5-pro"]  # fmt: skip
            ollama_running.close()  # Ollama goes down
            assert model_ids(engram, user) == [
                "gpt-fake",
                "gemini/gemini-2.5-flash",
                "gemini/gemini-2.5-pro",
            ]
    assert gemini.models_received[-1]["x-goog-api-key"] == SERVER_GEMINI_KEY


def test_the_model_list_sends_a_callers_key_only_to_the_provider_it_selects(
    trio: Engram, user: User, upstream: FakeOpenAI, gemini: FakeGemini
) -> None:
    byok = {"X-Engram-Key": user.api_key, "Authorization": f"Bearer {BYOK}"}
    answer = trio.get("/v1/models", None, headers=byok)
    assert answer.status_code == 200
    assert "gemini/gemini-2.5-flash" in [model["id"] for model in answer.json()["data"]]
    assert upstream.models_received[-1]["authorization"] == f"Bearer {BYOK}"
    # The caller's key is for the provider it selects (OpenAI by default), never sent to Google.
    assert gemini.models_received[-1]["x-goog-api-key"] == SERVER_GEMINI_KEY

    answer = trio.get("/v1/models", None, headers={**byok, "X-Engram-Provider": "gemini"})
    assert answer.status_code == 200
    assert gemini.models_received[-1]["x-goog-api-key"] == BYOK
    assert upstream.models_received[-1]["authorization"] == f"Bearer {SERVER_OPENAI_KEY}"


# --- evidence and extraction -------------------------------------------------------------------


async def test_the_conversation_row_names_the_provider_and_the_bare_model(
    trio: Engram, user: User, target: Target, db: asyncpg.Connection
) -> None:
    with sdk(trio, user) as client:
        client.chat.completions.create(
            model=target.model, messages=[{"role": "user", "content": "Hi"}]
        )
    row = await eventually(
        lambda: db.fetchrow(
            "SELECT provider, model FROM conversations WHERE user_id = $1::uuid", user.id
        )
    )
    assert (row["provider"], row["model"]) == (target.provider, target.bare_model)


async def test_extraction_can_use_another_provider_than_chat(
    start_engram: StartEngram,
    upstream: FakeOpenAI,
    ollama: FakeOllama,
    gemini: FakeGemini,
    db: asyncpg.Connection,
) -> None:
    fact = "The user has a cat named Miso."
    ollama.script_extraction(memories_json(fact), when="cat named Miso")
    settings = trio_settings(
        upstream, ollama, gemini, extraction_model="llama3.2", extraction_provider="ollama"
    )
    with start_engram(**settings) as engram:
        user = engram.create_user()
        with sdk(engram, user) as client:
            client.chat.completions.create(
                model=MODELS["gemini"],
                messages=[{"role": "user", "content": "I just adopted a cat named Miso"}],
            )
        stored = await eventually(
            lambda: db.fetchval("SELECT content FROM memories WHERE user_id = $1::uuid", user.id)
        )
    assert stored == fact
    [extraction] = ollama.extractions_of("cat named Miso")
    assert extraction.body["model"] == "llama3.2"
    assert extraction.body["format"] == "json"
    assert extraction.headers.get("authorization") is None
    assert gemini.extractions_of("cat named Miso") == []
    assert GeminiReader().last_user_text(gemini.last()) == "I just adopted a cat named Miso"


def test_the_fakes_answer_as_their_apis_do_without_engram(
    ollama: FakeOllama, gemini: FakeGemini
) -> None:
    tags = httpx.get(f"{ollama.url}/api/tags").json()
    assert [model["name"] for model in tags["models"]] == ollama.models
    refused = httpx.post(f"{gemini.url}/v1beta/models/gemini-2.5-flash:generateContent", json={})
    assert refused.status_code == 403
    assert refused.json()["error"]["status"] == "PERMISSION_DENIED"
