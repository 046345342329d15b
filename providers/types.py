"""TypedDicts for the OpenAI chat wire format, the one shape every provider speaks."""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class TextPart(TypedDict):
    type: Literal["text"]
    text: str


class ChatMessage(TypedDict):
    role: Role
    content: NotRequired[str | list[dict[str, Any]] | None]
    name: NotRequired[str]
    tool_calls: NotRequired[list[dict[str, Any]]]
    tool_call_id: NotRequired[str]


class ChatRequest(TypedDict):
    """The fields Engram reads; every other field passes through untouched."""

    model: str
    messages: list[ChatMessage]
    stream: NotRequired[bool]


class ChoiceDelta(TypedDict, total=False):
    role: str
    content: str | None
    tool_calls: list[dict[str, Any]]


class ChunkChoice(TypedDict, total=False):
    index: int
    delta: ChoiceDelta
    finish_reason: str | None


class ChatCompletionChunk(TypedDict, total=False):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: dict[str, int] | None
