"""What the fake upstreams share: a record of calls and a script of answers.

Each fake (OpenAI, Ollama, Gemini) keeps Engram's extraction calls apart from chat calls
and answers them from a script of their own, keyed by the exchange they quote.
Answers are scripted with tests.fakes.openai_server.Scripted, tool calls in
OpenAI's shape: each fake speaks them in its own API's dialect, so one script
works for every provider.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Received:
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages", []))

    @property
    def system_text(self) -> str:
        return "\n".join(m.get("content") or "" for m in self.messages if m.get("role") == "system")


@dataclass
class Scripted:
    """A canned answer for the next request: an error, a tool call, or text."""

    status: int = 200
    body: dict[str, Any] | None = None
    # Exact bytes to answer with (any status), for tests that compare bodies byte for byte.
    raw: bytes | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    fail_mid_stream: bool = False
    headers: dict[str, str] = field(default_factory=dict)


class ScriptedUpstream:
    """The state of one fake upstream; subclasses say what an extraction call looks like."""

    def __init__(self) -> None:
        self.url = ""  # set by whoever serves the fake
        self.received: list[Received] = []
        self.extraction_received: list[Received] = []
        # Headers of each model listing, to check which key reached the upstream.
        self.models_received: list[dict[str, str]] = []
        # Seconds to wait before answering a chat call, to outlast Engram's read timeout.
        self.delay = 0.0
        self._script: list[Scripted] = []
        self._extraction_script: list[tuple[str, str | Scripted]] = []
        self._lock = threading.Lock()

    def script(self, *answers: Scripted) -> None:
        """Answers for the next chat calls, in order; the default text answer after them."""
        with self._lock:
            self._script.extend(answers)

    def script_extraction(self, *outputs: str | Scripted, when: str) -> None:
        """Answers for the next extraction calls whose exchange mentions `when`."""
        with self._lock:
            self._extraction_script.extend((when, output) for output in outputs)

    def extractions_of(self, phrase: str) -> list[Received]:
        """The extraction calls whose exchange mentions `phrase`."""
        with self._lock:
            return [call for call in self.extraction_received if phrase in self.exchange_of(call)]

    def reset(self) -> None:
        with self._lock:
            self.received.clear()
            self.extraction_received.clear()
            self.models_received.clear()
            self.delay = 0.0
            self._script.clear()
            self._extraction_script.clear()

    def last(self) -> Received:
        with self._lock:
            return self.received[-1]

    def exchange_of(self, call: Received) -> str:
        """The exchange an extraction call quotes (its existing memories left out)."""
        raise NotImplementedError

    def record_models_call(self, headers: dict[str, str]) -> None:
        with self._lock:
            self.models_received.append(headers)

    def next_answer(self, received: Received) -> Scripted:
        """Record a chat call and take the next scripted answer for it."""
        with self._lock:
            self.received.append(received)
            return self._script.pop(0) if self._script else Scripted()

    def extraction_answer(self, received: Received) -> str | Scripted:
        """Record an extraction call; the scripted output for it, else no memories."""
        with self._lock:
            self.extraction_received.append(received)
            exchange = self.exchange_of(received)
            for index, (when, output) in enumerate(self._extraction_script):
                if when in exchange:
                    del self._extraction_script[index]
                    return output
        return '{"memories": []}'


def tool_call_arguments(call: dict[str, Any]) -> dict[str, Any]:
    """The arguments of an OpenAI-shaped scripted tool call, as a JSON object."""
    arguments: dict[str, Any] = json.loads(call["function"]["arguments"] or "{}")
    return arguments
