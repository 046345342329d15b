"""Gemini translation tables: OpenAI requests in, Gemini answers out, without HTTP."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from google.genai import types

from providers.gemini import UnsupportedParameter
from providers.gemini_answer import ChunkTranslator, from_gemini
from providers.gemini_wire import SKIP_SIGNATURE, to_gemini

MODEL = "gemini-2.5-flash"
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
WEATHER = {"name": "get_weather", "description": "Weather for a city", "parameters": CITY}


def request(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}


def user(*parts: dict[str, Any]) -> dict[str, Any]:
    return request(messages=[{"role": "user", "content": list(parts)}])


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def tool_call(call_id: str, arguments: str, **extra: Any) -> dict[str, Any]:
    function = {"name": "get_weather", "arguments": arguments}
    return {"id": call_id, "type": "function", "function": function, **extra}


def calling(mode: str, *names: str) -> dict[str, Any]:
    config: dict[str, Any] = {"mode": mode}
    if names:
        config["allowed_function_names"] = list(names)
    return {"tool_config": {"function_calling_config": config}}


def generation_config(body: dict[str, Any]) -> dict[str, Any]:
    dumped = to_gemini(body).config.model_dump(mode="json", exclude_none=True)
    assert dumped.pop("automatic_function_calling")["disable"] is True
    return dumped


def parsed(*parts: dict[str, Any], finish: str = "STOP", **usage: int) -> Any:
    """A generateContent response as the REST API documents it, parsed by the SDK."""
    return types.GenerateContentResponse.model_validate(
        {
            "candidates": [
                {"content": {"role": "model", "parts": list(parts)}, "finishReason": finish}
            ],
            "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 3, **usage},
        }
    )


SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "r", "schema": CITY}}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"temperature": 0.2, "top_p": 0.9}, {"temperature": 0.2, "top_p": 0.9}),
        ({"seed": 7, "presence_penalty": 0.5}, {"seed": 7, "presence_penalty": 0.5}),
        ({"max_tokens": 50}, {"max_output_tokens": 50}),
        ({"max_tokens": 50, "max_completion_tokens": 80}, {"max_output_tokens": 80}),
        ({"stop": "END"}, {"stop_sequences": ["END"]}),
        ({"stop": ["a", "b"], "n": 2}, {"stop_sequences": ["a", "b"], "candidate_count": 2}),
        ({"n": 1, "user": "u-1", "stream": True, "parallel_tool_calls": True}, {}),
        ({"response_format": {"type": "text"}, "logprobs": False}, {}),
        ({"response_format": {"type": "json_object"}}, {"response_mime_type": "application/json"}),
        (
            {"response_format": SCHEMA_FORMAT},
            {"response_mime_type": "application/json", "response_json_schema": CITY},
        ),
        ({"tool_choice": "auto"}, calling("AUTO")),
        ({"tool_choice": "none"}, calling("NONE")),
        ({"tool_choice": "required"}, calling("ANY")),
        (
            {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
            calling("ANY", "get_weather"),
        ),
        (
            {"tools": [{"type": "function", "function": WEATHER}]},
            {
                "tools": [
                    {
                        "function_declarations": [
                            {
                                "name": "get_weather",
                                "description": "Weather for a city",
                                "parameters_json_schema": CITY,
                            }
                        ]
                    }
                ]
            },
        ),
    ],
)
def test_parameters_become_generation_config(
    fields: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert generation_config(request(**fields)) == expected


def test_messages_become_contents_and_a_system_instruction() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Memories: likes tea."}]},
        {"role": "user", "content": [{"type": "text", "text": "Look"},
                                     image(f"data:image/png;base64,{PNG}"),
                                     image("https://example.com/cat.jpg")]},
        {"role": "assistant", "content": None,
         "tool_calls": [tool_call("call_1", '{"city":"Oslo"}')]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "user", "content": "thanks"},
    ]  # fmt: skip
    gemini = to_gemini({"model": MODEL, "messages": messages})
    system = gemini.config.system_instruction
    assert isinstance(system, types.Content)
    assert [part.text for part in system.parts or []] == ["Be brief.", "Memories: likes tea."]
    png = base64.urlsafe_b64encode(base64.b64decode(PNG)).decode()
    assert [content.model_dump(mode="json", exclude_none=True) for content in gemini.contents] == [
        {"role": "user", "parts": [
            {"text": "Look"},
            {"inline_data": {"mime_type": "image/png", "data": png}},
            {"file_data": {"file_uri": "https://example.com/cat.jpg", "mime_type": "image/jpeg"}},
        ]},
        {"role": "model", "parts": [{
            "function_call": {"name": "get_weather", "args": {"city": "Oslo"}},
            "thought_signature": SKIP_SIGNATURE,  # the client kept no signature to replay
        }]},
        {"role": "user", "parts": [  # the tool result and the next user turn are one turn
            {"function_response": {"name": "get_weather", "response": {"output": "sunny"}}},
            {"text": "thanks"},
        ]},
    ]  # fmt: skip


def test_a_returned_thought_signature_is_replayed_and_skip_goes_on_the_first_call_only() -> None:
    signed = tool_call("a", "", extra_content={"google": {"thought_signature": "CiQB0e/+abc="}})
    history = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [signed]}]
    replayed = (to_gemini(request(messages=history)).contents[1].parts or [])[0]
    assert replayed.thought_signature == base64.b64decode("CiQB0e/+abc=")
    unsigned = [tool_call("a", "{}"), tool_call("b", "{}")]
    history = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": unsigned}]
    parts = to_gemini(request(messages=history)).contents[1].parts or []
    assert [part.thought_signature is not None for part in parts] == [True, False]


def test_audio_and_pdf_parts_are_inline_data() -> None:
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    pdf = {"type": "file", "file": {"filename": "a.pdf", "file_data": "JVBERi0="}}
    parts = to_gemini(user(audio, pdf)).contents[0].parts or []
    assert [part.inline_data.mime_type for part in parts if part.inline_data] == [
        "audio/wav",
        "application/pdf",
    ]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (request(logit_bias={"50256": -100}), "logit_bias"),
        (request(reasoning_effort="low"), "reasoning_effort"),
        (request(logprobs=True), "logprobs"),
        (request(parallel_tool_calls=False), "parallel_tool_calls"),
        (request(modalities=["text", "audio"]), "modalities"),
        (request(temperature="hot"), "temperature"),
        (request(n="two"), "n"),
        (request(tools=[{"type": "web_search"}]), "tools[0].type"),
        (request(tool_choice="sometimes"), "tool_choice"),
        (request(response_format={"type": "xml"}), "response_format.type"),
        (request(messages=[{"role": "function", "name": "f", "content": "x"}]), "messages[0].role"),
        (
            request(messages=[{"role": "tool", "tool_call_id": "nope", "content": "x"}]),
            "messages[0].tool_call_id",
        ),
        (
            request(messages=[{"role": "assistant", "tool_calls": [tool_call("a", "[1]")]}]),
            "messages[0].tool_calls[0].function.arguments",
        ),
        (user(image("ftp://x/y.png")), "messages[0].content[0].image_url.url"),
        (user(image("data:image/png,raw")), "messages[0].content[0].image_url.url"),
        (user(image("data:image/png;base64,%%%")), "messages[0].content[0].image_url.url"),
        (user({"type": "file", "file": {"file_id": "file-1"}}), "messages[0].content[0].file"),
        (user({"type": "video", "url": "x"}), "messages[0].content[0].type"),
        (
            request(messages=[{"role": "system", "content": [image("https://x/y.png")]}]),
            "messages[0].content[0].type",
        ),
    ],
)
def test_what_gemini_cannot_honour_is_refused_by_name(body: dict[str, Any], param: str) -> None:
    with pytest.raises(UnsupportedParameter) as refused:
        to_gemini(body)
    assert refused.value.param == param


@pytest.mark.parametrize(
    ("gemini", "openai"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
        ("OTHER", "stop"),
    ],
)
def test_finish_reasons_map_to_openai(gemini: str, openai: str) -> None:
    completion = from_gemini(parsed({"text": "x"}, finish=gemini), MODEL)
    assert completion["choices"][0]["finish_reason"] == openai


def test_a_response_becomes_a_chat_completion() -> None:
    signed = {"functionCall": {"name": "f", "args": {"city": "Zürich"}}, "thoughtSignature": "c2ln"}
    response = parsed(
        {"text": "thinking…", "thought": True},
        {"text": "Checking."},
        signed,
        {"functionCall": {"name": "f", "args": {}}},
        thoughtsTokenCount=5,
        totalTokenCount=15,
        cachedContentTokenCount=2,
    )
    completion = from_gemini(response, MODEL)
    assert completion["id"].startswith("chatcmpl-")
    assert (completion["object"], completion["model"]) == ("chat.completion", MODEL)
    choice = completion["choices"][0]
    assert (choice["finish_reason"], choice["message"]["content"]) == ("tool_calls", "Checking.")
    first, second = choice["message"]["tool_calls"]
    assert first["id"].startswith("call_")
    assert first["id"] != second["id"]
    assert first["function"] == {"name": "f", "arguments": '{"city": "Zürich"}'}
    assert first["extra_content"] == {"google": {"thought_signature": "c2ln"}}
    assert "extra_content" not in second
    assert completion["usage"] == {
        "prompt_tokens": 7,
        "completion_tokens": 8,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 2},
        "completion_tokens_details": {"reasoning_tokens": 5},
    }


def test_a_blocked_prompt_is_a_content_filter_finish() -> None:
    blocked = types.GenerateContentResponse.model_validate(
        {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {}}
    )
    choice = from_gemini(blocked, MODEL)["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == (None, "content_filter")
    translator = ChunkTranslator(MODEL, include_usage=False)
    [start, end] = translator.feed(blocked)
    assert start["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert end["choices"][0]["finish_reason"] == "content_filter"


def test_streamed_tool_calls_take_openai_fragments() -> None:
    translator = ChunkTranslator(MODEL, include_usage=False)
    call = {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}}
    chunks = [*translator.feed(parsed(call, call)), *translator.finish()]
    assert all("usage" not in chunk for chunk in chunks)
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
    assert deltas[0]["role"] == "assistant"
    fragments = [delta["tool_calls"][0] for delta in deltas if "tool_calls" in delta]
    ids = [fragment.pop("id") for fragment in fragments[::2]]
    assert all(call_id.startswith("call_") for call_id in ids)
    assert len(set(ids)) == 2
    head = {"type": "function", "function": {"name": "get_weather", "arguments": ""}}
    tail = {"function": {"arguments": '{"city": "Oslo"}'}}
    assert fragments == [
        {**head, "index": 0},
        {**tail, "index": 0},
        {**head, "index": 1},
        {**tail, "index": 1},
    ]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert translator.finished
