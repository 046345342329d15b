"""Reading and validating request bodies: clear 400s that name the field."""

from __future__ import annotations

import json
from typing import Any, cast

from starlette.requests import Request

from providers.types import ChatMessage, ChatRequest
from proxy.errors import BadRequest

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


async def json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object, or a 400 saying what is wrong with it."""
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest("request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    return body


def _invalid(param: str, message: str) -> BadRequest:
    return BadRequest(f"{param}: {message}", param=param, code="invalid_value")


def _message(index: int, value: Any) -> ChatMessage:
    where = f"messages[{index}]"
    if not isinstance(value, dict):
        raise _invalid(where, "must be an object")
    role = value.get("role")
    if role not in _ROLES:
        raise _invalid(f"{where}.role", f"must be one of {', '.join(sorted(_ROLES))}")
    content = value.get("content")
    if content is not None and not isinstance(content, str | list):
        raise _invalid(f"{where}.content", "must be a string, a list of parts or null")
    if isinstance(content, list) and not all(isinstance(part, dict) for part in content):
        raise _invalid(f"{where}.content", "parts must be objects")
    return cast(ChatMessage, value)


def chat_request(body: dict[str, Any], max_messages: int) -> ChatRequest:
    """Check the fields Engram reads; every other field passes through untouched."""
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _invalid("model", "is required and must be a non-empty string")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "is required and must be a non-empty list")
    if len(messages) > max_messages:
        raise _invalid("messages", f"holds more than the limit of {max_messages} messages")
    for index, message in enumerate(messages):
        _message(index, message)
    if "stream" in body and not isinstance(body["stream"], bool | None):
        raise _invalid("stream", "must be a boolean")
    return cast(ChatRequest, body)


def text_field(body: dict[str, Any], name: str, max_length: int) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise _invalid(name, "is required and must be a non-empty string")
    if len(value) > max_length:
        raise _invalid(name, f"is longer than the limit of {max_length} characters")
    return value


def number_field(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise _invalid(name, f"must be a number from {low:g} to {high:g}")
    return float(value)
