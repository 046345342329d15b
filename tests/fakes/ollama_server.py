"""A fake Ollama server: POST /api/chat and GET /api/tags, shaped as Ollama documents them.

/api/chat answers with one JSON object when the request says `"stream": false`,
else (Ollama's default) with NDJSON: a line per part, `done` on the last one.
Tool calls come whole inside `message.tool_calls`, without ids, as Ollama sends
them; an error mid-stream is an `{"error": …}` line, as Ollama writes it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from proxy.extraction import PROMPT_MARKER
from tests.fakes.recording import Received, Scripted, ScriptedUpstream, tool_call_arguments

DEFAULT_MODELS = ("llama3.2:latest", "qwen2.5-coder:7b")
# Durations are nanoseconds in Ollama's answers.
_TIMINGS = {
    "total_duration": 4_883_583_458,
    "load_duration": 1_334_875,
    "prompt_eval_duration": 342_546_000,
    "eval_duration": 4_535_599_000,
}
PROMPT_EVAL_COUNT = 26
EVAL_COUNT = 12


def _created_at() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class FakeOllama(ScriptedUpstream):
    """The fake's state and its Starlette app."""

    def __init__(
        self, reply: str = "Hello from the fake Ollama.", models: Sequence[str] = DEFAULT_MODELS
    ) -> None:
        super().__init__()
        self.reply = reply
        self.models = list(models)
        self.app = Starlette(
            routes=[
                Route("/api/chat", self._chat, methods=["POST"]),
                Route("/api/tags", self._tags, methods=["GET"]),
            ]
        )

    def exchange_of(self, call: Received) -> str:
        prompt = str(call.messages[-1].get("content") or "")
        return prompt.split("<existing_memories>")[0]

    async def _tags(self, request: Request) -> Response:
        self.record_models_call(dict(request.headers))
        models = [
            {
                "name": name,
                "model": name,
                "modified_at": "2025-05-04T17:37:44.706015396-07:00",
                "size": 2019393189,
                "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
                "details": {
                    "parent_model": "",
                    "format": "gguf",
                    "family": "llama",
                    "families": ["llama"],
                    "parameter_size": "3.2B",
                    "quantization_level": "Q4_K_M",
                },
            }
            for name in self.models
        ]
        return JSONResponse({"models": models})

    async def _chat(self, request: Request) -> Response:
        received = Received(dict(request.headers), json.loads(await request.body()))
        model = str(received.body.get("model"))
        if _is_extraction(received.body):
            output = self.extraction_answer(received)
            if isinstance(output, Scripted):
                return _error(output)
            return JSONResponse(_done(model, _message(output)))
        answer = self.next_answer(received)
        await asyncio.sleep(self.delay)
        if answer.status >= 400:
            return _error(answer)
        if answer.body is not None:
            return JSONResponse(answer.body, headers=answer.headers)
        if received.body.get("stream", True):
            return StreamingResponse(
                self._parts(model, answer),
                media_type="application/x-ndjson",
                headers=answer.headers,
            )
        text = "" if answer.tool_calls else answer.content or self.reply
        message = _message(text, answer.tool_calls)
        return JSONResponse(_done(model, message), headers=answer.headers)

    async def _parts(self, model: str, answer: Scripted) -> AsyncIterator[bytes]:
        if answer.tool_calls:
            yield _line(_part(model, _message("", answer.tool_calls)))
        else:
            words = (answer.content or self.reply).split(" ")
            for index, word in enumerate(words):
                text = word if index == len(words) - 1 else word + " "
                yield _line(_part(model, _message(text)))
                if answer.fail_mid_stream:
                    yield _line({"error": "an error was encountered while running the model"})
                    return
        yield _line(_done(model, _message("")))


def _is_extraction(body: dict[str, Any]) -> bool:
    messages = body.get("messages") or [{}]
    first = messages[0].get("content")
    return isinstance(first, str) and first.startswith(PROMPT_MARKER)


def _message(content: str, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = [
            {"function": {"name": call["function"]["name"], "arguments": tool_call_arguments(call)}}
            for call in tool_calls
        ]
    return message


def _part(model: str, message: dict[str, Any]) -> dict[str, Any]:
    return {"model": model, "created_at": _created_at(), "message": message, "done": False}


def _done(model: str, message: dict[str, Any]) -> dict[str, Any]:
    return {
        **_part(model, message),
        "done_reason": "stop",
        "done": True,
        **_TIMINGS,
        "prompt_eval_count": PROMPT_EVAL_COUNT,
        "eval_count": EVAL_COUNT,
    }


def _line(part: dict[str, Any]) -> bytes:
    return json.dumps(part).encode() + b"\n"


def _error(answer: Scripted) -> Response:
    """Ollama's error answer: `{"error": "<text>"}` with the status."""
    body = answer.body or {"error": f"fake Ollama failure ({answer.status})"}
    return JSONResponse(body, status_code=answer.status, headers=answer.headers)
