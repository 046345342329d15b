"""Reading and validating request bodies: clear 400s that name the field."""

from __future__ import annotations

import json
import math
import re
from typing import Any, NoReturn, cast

from starlette.requests import Request

from providers.types import ChatMessage, ChatRequest
from proxy.errors import BadRequest

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# Only a \uD800-\uDFFF escape can put a surrogate into a parsed string: a cheap gate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class _NotPortableJSON(ValueError):
    """Python's json module accepts it, but JSON (RFC 8259), PostgreSQL and providers do not."""


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotPortableJSON(f"the number {text} is out of range")
    return value


def _no_constant(name: str) -> NoReturn:
    raise _NotPortableJSON(f"{name} is not a JSON value")


def _encodable(body: dict[str, Any]) -> bool:
    try:
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


MAX_JSON_DEPTH = 64


def _deeper_than(value: Any, limit: int) -> bool:
    """True when objects and arrays nest deeper than `limit` (walked without recursion)."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        pending.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


async def json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object, or a 400 saying what is wrong with it."""
    raw = await request.body()
    try:
        body = json.loads(raw, parse_float=_finite, parse_constant=_no_constant)
    except _NotPortableJSON as error:
        raise BadRequest(f"request body is not valid JSON: {error}", code="invalid_json") from None
    except (ValueError, RecursionError):
        raise BadRequest("request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    if _deeper_than(body, MAX_JSON_DEPTH):
        raise BadRequest(
            f"request body is nested deeper than {MAX_JSON_DEPTH} levels", code="invalid_json"
        )
    if _SURROGATE_ESCAPE.search(raw) and not _encodable(body):
        raise BadRequest(
            "request body is not valid JSON: it holds an unpaired UTF-16 surrogate escape",
            code="invalid_json",
        )
    return body


def invalid_field(param: str, message: str) -> BadRequest:
    """A 400 naming the field (or header) that is wrong."""
    return BadRequest(f"{param}: {message}", param=param, code="invalid_value")


def _message(index: int, value: Any) -> ChatMessage:
    where = f"messages[{index}]"
    if not isinstance(value, dict):
        raise invalid_field(where, "must be an object")
    role = value.get("role")
    if role not in _ROLES:
        raise invalid_field(f"{where}.role", f"must be one of {', '.join(sorted(_ROLES))}")
    content = value.get("content")
    if content is not None and not isinstance(content, str | list):
        raise invalid_field(f"{where}.content", "must be a string, a list of parts or null")
    if isinstance(content, list) and not all(isinstance(part, dict) for part in content):
        raise invalid_field(f"{where}.content", "parts must be objects")
    return cast(ChatMessage, value)


def chat_request(body: dict[str, Any], max_messages: int) -> ChatRequest:
    """Check the fields Engram reads; every other field passes through untouched."""
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise invalid_field("model", "is required and must be a non-empty string")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_field("messages", "is required and must be a non-empty list")
    if len(messages) > max_messages:
        raise invalid_field("messages", f"holds more than the limit of {max_messages} messages")
    for index, message in enumerate(messages):
        _message(index, message)
    if "stream" in body and not isinstance(body["stream"], bool | None):
        raise invalid_field("stream", "must be a boolean")
    return cast(ChatRequest, body)


def text_field(body: dict[str, Any], name: str, max_length: int) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise invalid_field(name, "is required and must be a non-empty string")
    if len(value) > max_length:
        raise invalid_field(name, f"is longer than the limit of {max_length} characters")
    if "\x00" in value:
        raise invalid_field(name, "must not contain NUL characters")
    return value


def number_field(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise invalid_field(name, f"must be a number from {low:g} to {high:g}")
    return float(value)
