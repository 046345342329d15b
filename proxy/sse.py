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
    """Rebuilds choice 0's assistant message from OpenAI `chat.completion.chunk` events.

    The bytes are kept as they are relayed and read in batches, every
    PARSE_BYTES and at the end, not line by line as each chunk passes: less
    work per event, and none of it between two chunks of the relay.
    """

    PARSE_BYTES = 64 * 1024

    def __init__(self) -> None:
        self._unread: list[bytes] = []
        self._fed_bytes = 0  # since the last read
        self._fed_line_end = False  # since the last read: else a read finds no new line
        self._content: list[str] = []
        self._tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None

    def feed(self, data: bytes) -> None:
        self._unread.append(data)
        self._fed_bytes += len(data)
        self._fed_line_end = self._fed_line_end or b"\n" in data
        if self._fed_bytes >= self.PARSE_BYTES and self._fed_line_end:
            self._read_complete_lines()

    def reply(self) -> dict[str, Any]:
        self._read_complete_lines()
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self._content)}
        if self._tool_calls:
            message["tool_calls"] = [self._tool_calls[i] for i in sorted(self._tool_calls)]
        return message

    def _read_complete_lines(self) -> None:
        """Read every complete line fed so far; keep an unfinished last one for later."""
        *lines, rest = b"".join(self._unread).split(b"\n")
        self._unread, self._fed_bytes, self._fed_line_end = [rest], 0, False
        payloads = [line[5:].strip() for line in lines if line.startswith(b"data:")]
        payloads = [p for p in payloads if p and p != b"[DONE]"]
        for chunk in map(_value_or_none, payloads):
            if not isinstance(chunk, dict):
                continue
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


# raw_decode on text: json.loads on bytes first works out their encoding, which
# cost more than the parse itself for an event of a few hundred bytes.
_DECODER = json.JSONDecoder()


def _value_or_none(payload: bytes) -> Any:
    """The payload's JSON value, or None where it is not one JSON value."""
    try:
        text = payload.decode()
        value, end = _DECODER.raw_decode(text)
    except ValueError:  # UnicodeDecodeError included
        return None
    return value if end == len(text) else None
