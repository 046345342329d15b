"""Pure translation between the OpenAI chat wire format and Ollama's /api/chat.

Requests go out as the keyword arguments of `ollama.AsyncClient.chat`; answers
come back as the SDK's `ChatResponse` objects and leave as OpenAI JSON.
A request Ollama cannot honour as asked raises UnsupportedParameter (a 400).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypedDict

from ollama import ChatResponse, ListResponse, Message, Tool

from providers import errors
from providers.types import ChatCompletionChunk, ChoiceDelta


class UnsupportedParameter(errors.UnsupportedParameter):
    """A request field Ollama cannot honour; `param` names it, as OpenAI's errors do."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


class OllamaChat(TypedDict):
    """The keyword arguments of `ollama.AsyncClient.chat`, all but `stream`."""

    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    format: Literal["", "json"] | dict[str, Any] | None
    options: dict[str, Any] | None


# Fields that change what the client gets back, which Ollama cannot produce.
_REFUSED_FIELDS = ("logprobs", "top_logprobs", "logit_bias", "audio", "prediction")
_SAME_NAME_OPTIONS = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")
_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
}

# --- requests ----------------------------------------------------------------------------------


def to_ollama(body: Mapping[str, Any]) -> OllamaChat:
    """An OpenAI chat request as the arguments of `AsyncClient.chat`."""
    _refuse_unsupported(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise UnsupportedParameter("model", "model must name an Ollama model")
    return OllamaChat(
        model=model,
        messages=to_ollama_messages(body.get("messages") or []),
        tools=_tools(body),
        format=_format(body.get("response_format")),
        options=_options(body) or None,
    )


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    if body.get("n") not in (None, 1):
        raise UnsupportedParameter("n", "Ollama returns one choice per request: n must be 1")
    for name in _REFUSED_FIELDS:
        if body.get(name):
            raise UnsupportedParameter(name, f"Ollama does not support {name}")


def _options(body: Mapping[str, Any]) -> dict[str, Any]:
    options = {name: body[name] for name in _SAME_NAME_OPTIONS if body.get(name) is not None}
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    if limit is not None:
        options["num_predict"] = limit
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop:
        if not isinstance(stop, list) or not all(isinstance(word, str) for word in stop):
            raise UnsupportedParameter("stop", "stop must be a string or a list of strings")
        options["stop"] = stop
    return options


def _format(response_format: Any) -> Literal["json"] | dict[str, Any] | None:
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise UnsupportedParameter("response_format", "response_format must be an object")
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        return dict(schema) if isinstance(schema, Mapping) else "json"
    raise UnsupportedParameter("response_format", f"Ollama does not support {kind!r} responses")


def _tools(body: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not tools or choice == "none":
        return None
    if choice not in (None, "auto"):
        raise UnsupportedParameter(
            "tool_choice", 'Ollama cannot force a tool call: use tool_choice "auto" or "none"'
        )
    return [_tool(tool, f"tools[{index}]") for index, tool in enumerate(tools)]


def _tool(tool: Any, where: str) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool, Mapping) else None
    if not isinstance(function, Mapping) or tool.get("type") != "function":
        raise UnsupportedParameter(where, "Ollama supports only function tools")
    translated = {"type": "function", "function": dict(function)}
    try:
        # The SDK validates tools before sending; a refusal here is the caller's, a 400.
        Tool.model_validate(translated)
    except ValueError:
        raise UnsupportedParameter(where, "Ollama cannot read this tool's definition") from None
    return translated


def to_ollama_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as Ollama's; a tool result is named after the call it answers."""
    names = _tool_call_names(messages)
    return [_message(message, f"messages[{i}]", names) for i, message in enumerate(messages)]


def _tool_call_names(messages: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    names: dict[str, str] = {}
    for message in messages:
        if message.get("role") != "assistant":
            continue
        for call in message.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, Mapping) else None
            name = function.get("name") if isinstance(function, Mapping) else None
            if isinstance(name, str) and isinstance(call.get("id"), str):
                names[call["id"]] = name
    return names


def _message(message: Mapping[str, Any], where: str, names: Mapping[str, str]) -> dict[str, Any]:
    role = _ROLES.get(message.get("role", ""))
    if role is None:
        raise UnsupportedParameter(f"{where}.role", f"Ollama has no {message.get('role')!r} role")
    text, images = _content(message.get("content"), f"{where}.content", role == "user")
    translated: dict[str, Any] = {"role": role, "content": text}
    if images:
        translated["images"] = images
    calls = message.get("tool_calls") if role == "assistant" else None
    if calls:
        translated["tool_calls"] = [
            _tool_call(call, f"{where}.tool_calls[{i}]") for i, call in enumerate(calls)
        ]
    if role == "tool":
        call_id = message.get("tool_call_id")
        name = names.get(call_id) if isinstance(call_id, str) else None
        name = name or message.get("name")
        if isinstance(name, str) and name:
            translated["tool_name"] = name
    return translated


def _content(content: Any, where: str, images_allowed: bool) -> tuple[str, list[bytes]]:
    if content is None or isinstance(content, str):
        return content or "", []
    texts: list[str] = []
    images: list[bytes] = []
    for index, part in enumerate(content):
        kind = part.get("type")
        if kind in ("text", "refusal") and isinstance(part.get(kind), str):
            texts.append(part[kind])
        elif kind == "image_url" and images_allowed:
            images.append(_image(part.get("image_url"), f"{where}[{index}].image_url"))
        else:
            raise UnsupportedParameter(f"{where}[{index}]", f"Ollama cannot take {kind!r} here")
    return "\n".join(texts), images


def _image(image_url: Any, where: str) -> bytes:
    """The bytes of a data: URL.

    Bytes, not the base64 text, go to the SDK: it would first try a string as a
    path on this machine and send that file's contents instead.
    """
    url = image_url.get("url") if isinstance(image_url, Mapping) else None
    if not isinstance(url, str) or not url.startswith("data:"):
        raise UnsupportedParameter(
            where, "Ollama needs inline images: send the image as a base64 data: URL"
        )
    header, _, data = url.partition(",")
    if not header.endswith(";base64"):
        raise UnsupportedParameter(where, "the image data: URL must be base64-encoded")
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error:
        raise UnsupportedParameter(where, "the image data is not valid base64") from None


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping):
        function = {}
    name = function.get("name")
    arguments = function.get("arguments") or "{}"
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        parsed = None
    if not isinstance(name, str) or not name or not isinstance(parsed, dict):
        raise UnsupportedParameter(
            f"{where}.function", "a tool call needs a name and arguments that are a JSON object"
        )
    return {"function": {"name": name, "arguments": parsed}}


# --- answers -----------------------------------------------------------------------------------


def tool_call_id(completion_id: str, index: int) -> str:
    """Ollama gives calls no ids: derive them from the completion's, stable within it."""
    return f"call_{completion_id.removeprefix('chatcmpl-')}_{index}"


def finish_reason(done_reason: str | None, has_tool_calls: bool) -> str:
    if has_tool_calls:
        return "tool_calls"
    return "length" if done_reason == "length" else "stop"


def usage(response: ChatResponse) -> dict[str, int]:
    prompt, completion = response.prompt_eval_count or 0, response.eval_count or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _openai_tool_call(call: Message.ToolCall, call_id: str) -> dict[str, Any]:
    arguments = json.dumps(dict(call.function.arguments), ensure_ascii=False)
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": call.function.name, "arguments": arguments},
    }


def from_ollama(
    response: ChatResponse, model: str, completion_id: str, created: int
) -> dict[str, Any]:
    """A whole Ollama answer as an OpenAI chat.completion."""
    calls = response.message.tool_calls or []
    tool_calls = [
        _openai_tool_call(call, tool_call_id(completion_id, i)) for i, call in enumerate(calls)
    ]
    message: dict[str, Any] = {
        "role": "assistant",
        "content": response.message.content or (None if tool_calls else ""),
    }
    if tool_calls:
        message["tool_calls"] = tool_calls
    choice = {
        "index": 0,
        "message": message,
        "logprobs": None,
        "finish_reason": finish_reason(response.done_reason, bool(tool_calls)),
    }
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage(response),
    }


class ChunkTranslator:
    """Ollama's streamed parts as OpenAI chunks; one instance per streamed answer."""

    def __init__(self, model: str, completion_id: str, created: int, include_usage: bool) -> None:
        self._model = model
        self._id = completion_id
        self._created = created
        self._include_usage = include_usage
        self._started = False
        self._tool_calls = 0

    def translate(self, part: ChatResponse) -> list[ChatCompletionChunk]:
        """The chunks one Ollama part becomes: OpenAI's first carries the role alone."""
        chunks: list[ChatCompletionChunk] = []
        if not self._started:
            self._started = True
            chunks.append(self._chunk({"role": "assistant", "content": ""}))
        if part.message.content:
            chunks.append(self._chunk({"content": part.message.content}))
        for call in part.message.tool_calls or []:
            chunks.extend(self._tool_call_chunks(call))
        if part.done:
            reason = finish_reason(part.done_reason, self._tool_calls > 0)
            chunks.append(self._chunk({}, reason))
            if self._include_usage:
                chunks.append(self._envelope([], usage(part)))
        return chunks

    def _tool_call_chunks(self, call: Message.ToolCall) -> list[ChatCompletionChunk]:
        # Ollama sends each call whole; OpenAI clients expect the id, type and
        # name on a first fragment and the arguments after it.
        index = self._tool_calls
        self._tool_calls += 1
        whole = _openai_tool_call(call, tool_call_id(self._id, index))
        first = {**whole, "index": index, "function": {"name": call.function.name, "arguments": ""}}
        rest = {"index": index, "function": {"arguments": whole["function"]["arguments"]}}
        return [self._chunk({"tool_calls": [first]}), self._chunk({"tool_calls": [rest]})]

    def _chunk(self, delta: ChoiceDelta, reason: str | None = None) -> ChatCompletionChunk:
        return self._envelope([{"index": 0, "delta": delta, "finish_reason": reason}])

    def _envelope(
        self, choices: list[Any], usage_counts: dict[str, int] | None = None
    ) -> ChatCompletionChunk:
        chunk = ChatCompletionChunk(
            id=self._id,
            object="chat.completion.chunk",
            created=self._created,
            model=self._model,
            choices=choices,
        )
        if usage_counts is not None:
            chunk["usage"] = usage_counts
        return chunk


# --- models ------------------------------------------------------------------------------------


def models_from_ollama(listing: ListResponse) -> dict[str, Any]:
    """Ollama's local models as an OpenAI model list, under their bare Ollama names."""
    return {
        "object": "list",
        "data": [
            {
                "id": model.model,
                "object": "model",
                "created": int(model.modified_at.timestamp()) if model.modified_at else 0,
                "owned_by": "ollama",
            }
            for model in listing.models
            if model.model
        ],
    }
