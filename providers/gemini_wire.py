"""Pure translation of an OpenAI chat request into a Gemini generateContent call.

The answer's way back (Gemini → chat.completion and chunks) is providers/gemini_answer.py.
Anything Gemini cannot honour raises UnsupportedParameter rather than being dropped.
"""

from __future__ import annotations

import base64
import json
import mimetypes
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from google.genai import types

from providers import errors

# Gemini 3 refuses a replayed function call without the thought signature it was sent
# with. Clients that drop `extra_content` lose it; Google documents this value for
# exactly that case (ai.google.dev/gemini-api/docs/thought-signatures, FAQ).
SKIP_SIGNATURE = "skip_thought_signature_validator"


class UnsupportedParameter(errors.UnsupportedParameter):
    """A request field Gemini cannot honour; `param` names it as OpenAI's error `param` would."""

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"{param}: {reason}")
        self.param = param
        self.reason = reason


@dataclass(frozen=True)
class GeminiRequest:
    """The arguments of one generate_content call."""

    model: str
    contents: list[types.Content]
    config: types.GenerateContentConfig


def to_gemini(body: Mapping[str, Any]) -> GeminiRequest:
    """The generateContent call an OpenAI chat request asks for."""
    system, contents = to_contents(body.get("messages") or [])
    fields = config_fields(body)
    if system:
        fields["system_instruction"] = types.Content(parts=[types.Part(text=t) for t in system])
    return GeminiRequest(str(body["model"]), contents, types.GenerateContentConfig(**fields))


@contextmanager
def _invalid_as(param: str) -> Iterator[None]:
    """Malformed input inside the block becomes an UnsupportedParameter naming `param`."""
    try:
        yield
    except UnsupportedParameter:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as error:
        raise UnsupportedParameter(param, "is malformed or has a value Gemini rejects") from error


# ---------------------------------------------------------------- messages


def to_contents(messages: list[Any]) -> tuple[list[str], list[types.Content]]:
    """System texts (for system_instruction) and the conversation as Gemini contents."""
    system: list[str] = []
    contents: list[types.Content] = []
    tool_names: dict[str, str] = {}
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        with _invalid_as(where):
            role = message["role"]
            if role in ("system", "developer"):
                system.append(_plain_text(message.get("content"), f"{where}.content"))
                continue
            translate = _ROLES.get(role)
            if translate is None:
                raise UnsupportedParameter(f"{where}.role", f"{role!r} is not supported by Gemini")
            _append(contents, translate(message, where, tool_names))
    return system, contents


def _append(contents: list[types.Content], content: types.Content | None) -> None:
    """Add a turn, merging it into the previous one of the same role as Gemini expects."""
    if content is None or not content.parts:
        return
    if contents and contents[-1].role == content.role:
        merged = [*(contents[-1].parts or []), *content.parts]
        contents[-1] = types.Content(role=content.role, parts=merged)
    else:
        contents.append(content)


def _user(message: Mapping[str, Any], where: str, _names: dict[str, str]) -> types.Content:
    content = message.get("content")
    if isinstance(content, str):
        return types.Content(role="user", parts=[types.Part(text=content)] if content else [])
    parts = [_user_part(part, f"{where}.content[{i}]") for i, part in enumerate(content or [])]
    return types.Content(role="user", parts=parts)


def _assistant(message: Mapping[str, Any], where: str, names: dict[str, str]) -> types.Content:
    if message.get("function_call") is not None:
        raise UnsupportedParameter(f"{where}.function_call", "use tool_calls with Gemini")
    text = _plain_text(message.get("content"), f"{where}.content")
    calls = [
        _function_call(call, f"{where}.tool_calls[{position}]", names)
        for position, call in enumerate(message.get("tool_calls") or [])
    ]
    if calls and not any(call.thought_signature for call in calls):
        skip = _signature_bytes(SKIP_SIGNATURE)
        calls[0] = calls[0].model_copy(update={"thought_signature": skip})
    return types.Content(role="model", parts=[*([types.Part(text=text)] if text else []), *calls])


def _function_call(call: Mapping[str, Any], where: str, names: dict[str, str]) -> types.Part:
    if call.get("type", "function") != "function":
        raise UnsupportedParameter(f"{where}.type", "only function tool calls exist in Gemini")
    function = call["function"]
    arguments = json.loads(function.get("arguments") or "{}")
    if not isinstance(arguments, dict):
        raise UnsupportedParameter(f"{where}.function.arguments", "must be a JSON object")
    names[call["id"]] = function["name"]
    signature = ((call.get("extra_content") or {}).get("google") or {}).get("thought_signature")
    return types.Part(
        function_call=types.FunctionCall(name=function["name"], args=arguments),
        thought_signature=_signature_bytes(signature) if signature else None,
    )


def _tool(message: Mapping[str, Any], where: str, names: dict[str, str]) -> types.Content:
    name = names.get(message.get("tool_call_id") or "")
    if name is None:
        raise UnsupportedParameter(
            f"{where}.tool_call_id", "does not match a tool call of an earlier assistant message"
        )
    output = _plain_text(message.get("content"), f"{where}.content")
    response = types.FunctionResponse(name=name, response={"output": output})
    return types.Content(role="user", parts=[types.Part(function_response=response)])


_ROLES: dict[str, Callable[[Mapping[str, Any], str, dict[str, str]], types.Content]] = {
    "user": _user,
    "assistant": _assistant,
    "tool": _tool,
}


def _plain_text(content: Any, where: str) -> str:
    """A string content, or the text of text (and refusal) parts joined."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for index, part in enumerate(content):
        if part.get("type") not in ("text", "refusal"):
            raise UnsupportedParameter(f"{where}[{index}].type", "only text is allowed here")
        texts.append(part.get("text") or part.get("refusal") or "")
    return "".join(texts)


def _signature_bytes(signature: str) -> bytes:
    """Signature bytes from base64 in either alphabet (the SDK sends them URL-safe)."""
    urlsafe = signature.replace("+", "-").replace("/", "_")
    return base64.urlsafe_b64decode(urlsafe + "=" * (-len(urlsafe) % 4))


# ------------------------------------------------------------- user parts


def _user_part(part: Mapping[str, Any], where: str) -> types.Part:
    translate = _PARTS.get(part.get("type", ""))
    if translate is None:
        raise UnsupportedParameter(f"{where}.type", f"{part.get('type')!r} is not supported")
    return translate(part, where)


def _text_part(part: Mapping[str, Any], _where: str) -> types.Part:
    return types.Part(text=part["text"])


def _image_part(part: Mapping[str, Any], where: str) -> types.Part:
    image = part["image_url"]
    url = image if isinstance(image, str) else image["url"]
    if url.startswith("data:"):
        return _inline(url, f"{where}.image_url.url")
    if url.startswith(("https://", "http://")):
        mime_type, _ = mimetypes.guess_type(urlsplit(url).path)
        return types.Part(file_data=types.FileData(file_uri=url, mime_type=mime_type))
    raise UnsupportedParameter(f"{where}.image_url.url", "must be a data: or http(s) URL")


def _audio_part(part: Mapping[str, Any], where: str) -> types.Part:
    audio = part["input_audio"]
    with _invalid_as(f"{where}.input_audio.data"):
        data = base64.b64decode(audio["data"], validate=True)
    return types.Part(inline_data=types.Blob(mime_type=f"audio/{audio['format']}", data=data))


def _file_part(part: Mapping[str, Any], where: str) -> types.Part:
    file_data = part["file"].get("file_data")
    if not isinstance(file_data, str):
        raise UnsupportedParameter(f"{where}.file", "only inline file_data reaches Gemini")
    if not file_data.startswith("data:"):
        # Bare base64: OpenAI's chat API takes PDF files only, so that is what it is.
        file_data = f"data:application/pdf;base64,{file_data}"
    return _inline(file_data, f"{where}.file.file_data")


def _inline(url: str, where: str) -> types.Part:
    header, _, payload = url.removeprefix("data:").partition(",")
    mime_type, _, encoding = header.partition(";")
    if encoding != "base64" or not mime_type:
        raise UnsupportedParameter(where, "must be a base64 data: URL with a media type")
    with _invalid_as(where):
        data = base64.b64decode(payload, validate=True)
    return types.Part(inline_data=types.Blob(mime_type=mime_type, data=data))


_PARTS: dict[str, Callable[[Mapping[str, Any], str], types.Part]] = {
    "text": _text_part,
    "image_url": _image_part,
    "input_audio": _audio_part,
    "file": _file_part,
}


# --------------------------------------------------------------- parameters

# Fields read elsewhere, or that identify and bill the caller without changing the answer.
_NOT_CONFIG = frozenset(
    {"model", "messages", "stream", "stream_options", "user", "metadata", "store",
     "service_tier", "safety_identifier", "prompt_cache_key"}
)  # fmt: skip


def config_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    """GenerateContentConfig fields for every parameter; unknown ones are refused."""
    # Engram forwards the model's tool calls to the client; the SDK must never run them.
    fields: dict[str, Any] = {
        "automatic_function_calling": types.AutomaticFunctionCallingConfig(disable=True)
    }
    for name, value in body.items():
        if value is None or name in _NOT_CONFIG:
            continue
        translate = _PARAMETERS.get(name)
        if translate is None:
            raise UnsupportedParameter(name, "is not supported by Gemini")
        with _invalid_as(name):
            update = translate(value)
            types.GenerateContentConfig(**update)  # validates this parameter on its own
        fields.update(update)
    if body.get("max_completion_tokens") is not None:  # OpenAI's newer name wins
        fields["max_output_tokens"] = body["max_completion_tokens"]
    return fields


def _renamed(field: str) -> Callable[[Any], dict[str, Any]]:
    return lambda value: {field: value}


def _only(name: str, accepted: object, reason: str) -> Callable[[Any], dict[str, Any]]:
    """A parameter Gemini has no switch for: its default value is fine, others are refused."""

    def check(value: Any) -> dict[str, Any]:
        if value != accepted:
            raise UnsupportedParameter(name, reason)
        return {}

    return check


def _stop(value: str | list[str]) -> dict[str, Any]:
    return {"stop_sequences": [value] if isinstance(value, str) else list(value)}


def _n(value: int) -> dict[str, Any]:
    return {} if value == 1 else {"candidate_count": value}


def _response_format(value: Mapping[str, Any]) -> dict[str, Any]:
    kind = value["type"]
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"response_mime_type": "application/json"}
    if kind == "json_schema":
        schema = value["json_schema"].get("schema")
        json_fields: dict[str, Any] = {"response_mime_type": "application/json"}
        return json_fields if schema is None else {**json_fields, "response_json_schema": schema}
    raise UnsupportedParameter("response_format.type", f"{kind!r} is not supported by Gemini")


def _tools(value: list[Mapping[str, Any]]) -> dict[str, Any]:
    declarations = [_declaration(tool, f"tools[{i}]") for i, tool in enumerate(value)]
    return {"tools": [types.Tool(function_declarations=declarations)]} if declarations else {}


def _declaration(tool: Mapping[str, Any], where: str) -> types.FunctionDeclaration:
    if tool.get("type") != "function":
        raise UnsupportedParameter(f"{where}.type", "only function tools are supported by Gemini")
    function = tool["function"]
    return types.FunctionDeclaration(
        name=function["name"],
        description=function.get("description"),
        parameters_json_schema=function.get("parameters"),
    )


_TOOL_CHOICE_MODES = {
    "auto": types.FunctionCallingConfigMode.AUTO,
    "none": types.FunctionCallingConfigMode.NONE,
    "required": types.FunctionCallingConfigMode.ANY,
}


def _tool_choice(value: str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(value, str) and value in _TOOL_CHOICE_MODES:
        calling = types.FunctionCallingConfig(mode=_TOOL_CHOICE_MODES[value])
    elif isinstance(value, Mapping) and value.get("type") == "function":
        calling = types.FunctionCallingConfig(
            mode=types.FunctionCallingConfigMode.ANY,
            allowed_function_names=[value["function"]["name"]],
        )
    else:
        raise UnsupportedParameter("tool_choice", "must be auto, none, required or a function")
    return {"tool_config": types.ToolConfig(function_calling_config=calling)}


# A literal registry: OpenAI parameter → the GenerateContentConfig fields it becomes.
_PARAMETERS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "temperature": _renamed("temperature"),
    "top_p": _renamed("top_p"),
    "max_tokens": _renamed("max_output_tokens"),
    "max_completion_tokens": _renamed("max_output_tokens"),
    "stop": _stop,
    "seed": _renamed("seed"),
    "n": _n,
    "presence_penalty": _renamed("presence_penalty"),
    "frequency_penalty": _renamed("frequency_penalty"),
    "response_format": _response_format,
    "tools": _tools,
    "tool_choice": _tool_choice,
    "parallel_tool_calls": _only(
        "parallel_tool_calls", True, "Gemini cannot be limited to one tool call per turn"
    ),
    "logprobs": _only("logprobs", False, "log probabilities are not relayed from Gemini"),
    "modalities": _only("modalities", ["text"], "only text output is supported"),
}


def wants_usage(body: Mapping[str, Any]) -> bool:
    """stream_options.include_usage: the client asked for a final usage chunk."""
    options = body.get("stream_options")
    return isinstance(options, Mapping) and bool(options.get("include_usage"))
