"""Server-sent events: framing, mid-stream error frames, and reading a relayed stream.

Streams are relayed byte for byte; ReplyAssembler reads the same bytes on the
side to rebuild the assistant's reply for the conversation record.
"""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"


def event(data: Any) -> bytes:
    """One `data:` event carrying `data` as JSON."""
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def error_event(body: dict[str, Any]) -> bytes:
    """An error after the first streamed byte: an event, never a second status line."""
    return event(body)


class ReplyAssembler:
    """Rebuilds choice 0's assistant message from OpenAI `chat.completion.chunk` events."""

    def __init__(self) -> None:
        self._buffer = b""
        self._content: list[str] = []
        self._tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None

    def feed(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self._read_line(line.rstrip(b"\r"))

    def reply(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self._content)}
        if self._tool_calls:
            message["tool_calls"] = [self._tool_calls[i] for i in sorted(self._tool_calls)]
        return message

    def _read_line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        payload = line[5:].strip()
        if not payload or payload == b"[DONE]":
            return
        try:
            chunk = json.loads(payload)
        except ValueError:
            return
        if not isinstance(chunk, dict):
            return
        for choice in chunk.get("choices") or []:
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                self._read_choice(choice)

    def _read_choice(self, choice: dict[str, Any]) -> None:
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        delta = choice.get("delta") or {}
        if isinstance(delta.get("content"), str):
            self._content.append(delta["content"])
        for fragment in delta.get("tool_calls") or []:
            self._read_tool_call(fragment)

    def _read_tool_call(self, fragment: dict[str, Any]) -> None:
        call = self._tool_calls.setdefault(
            fragment.get("index", 0),
            {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
        )
        call["id"] = fragment.get("id") or call["id"]
        function = fragment.get("function") or {}
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""
