"""A fake Gemini API: generateContent, streamGenerateContent and the model list, v1beta.

Shaped as the REST API documents them: `candidates[].content.parts` with `text`
or `functionCall` parts (no call ids, a `thoughtSignature` on the first call, as
thinking models send it), `finishReason`, `usageMetadata`; streaming with
`?alt=sse` is one `data:` event per partial response. Errors are google.rpc
status bodies. The key is read from `x-goog-api-key` (or `?key=`); without one
the fake refuses with 403 as Gemini does.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from proxy.extraction import PROMPT_MARKER
from tests.fakes.recording import Received, Scripted, ScriptedUpstream, tool_call_arguments

DEFAULT_MODELS = ("gemini-2.5-flash", "gemini-2.5-pro")
THOUGHT_SIGNATURE = base64.b64encode(b"fake thought signature").decode()
USAGE = {
    "promptTokenCount": 10,
    "candidatesTokenCount": 5,
    "thoughtsTokenCount": 3,
    "totalTokenCount": 18,
    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 10}],
}
_RPC_STATUSES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


@dataclass
class GeminiReceived(Received):
    """A generateContent call: the model and method come from the URL."""

    model: str = ""
    streamed: bool = False

    @property
    def api_key(self) -> str | None:
        return self.headers.get("x-goog-api-key")

    @property
    def contents(self) -> list[dict[str, Any]]:
        return list(self.body.get("contents", []))

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.body.get("generationConfig", {}))

    @property
    def system_text(self) -> str:
        parts = (self.body.get("systemInstruction") or {}).get("parts") or []
        return "\n".join(part.get("text") or "" for part in parts)


def google_error(status: int, message: str | None = None) -> dict[str, Any]:
    """A google.rpc.Status error body, as Gemini answers errors."""
    rpc_status = _RPC_STATUSES.get(status, "UNKNOWN")
    text = message or f"fake Gemini failure ({rpc_status})"
    return {"error": {"code": status, "message": text, "status": rpc_status}}


class FakeGemini(ScriptedUpstream):
    """The fake's state and its Starlette app."""

    def __init__(
        self, reply: str = "Hello from the fake Gemini.", models: Sequence[str] = DEFAULT_MODELS
    ) -> None:
        super().__init__()
        self.reply = reply
        self.models = list(models)
        self.app = Starlette(
            routes=[
                Route("/v1beta/models", self._models, methods=["GET"]),
                Route("/v1beta/models/{target}", self._generate, methods=["POST"]),
            ]
        )

    def exchange_of(self, call: Received) -> str:
        contents = call.body.get("contents") or [{}]
        prompt = "".join(part.get("text") or "" for part in contents[-1].get("parts") or [])
        return prompt.split("<existing_memories>")[0]

    async def _models(self, request: Request) -> Response:
        self.record_models_call(dict(request.headers))
        if not _key(request):
            return _error(Scripted(status=403))
        chat_methods = ["generateContent", "countTokens", "createCachedContent"]
        models = [
            {
                "name": f"models/{name}",
                "version": "001",
                "displayName": name.replace("-", " ").title(),
                "inputTokenLimit": 1048576,
                "outputTokenLimit": 65536,
                "supportedGenerationMethods": chat_methods,
            }
            for name in self.models
        ]
        embedder = {"name": "models/text-embedding-004", "version": "004",
                    "supportedGenerationMethods": ["embedContent"]}  # fmt: skip
        return JSONResponse({"models": [*models, embedder]})

    async def _generate(self, request: Request) -> Response:
        model, _, method = request.path_params["target"].partition(":")
        if method not in ("generateContent", "streamGenerateContent"):
            return _error(Scripted(status=404))
        received = GeminiReceived(
            dict(request.headers),
            json.loads(await request.body()),
            model=model,
            streamed=method == "streamGenerateContent",
        )
        if not _key(request):
            message = "Method doesn't allow unregistered callers. Please use an API key."
            return _error(Scripted(status=403, body=google_error(403, message)))
        if _is_extraction(received.body):
            output = self.extraction_answer(received)
            if isinstance(output, Scripted):
                return _error(output)
            return JSONResponse(_response(model, [{"text": output}], "STOP"))
        answer = self.next_answer(received)
        await asyncio.sleep(self.delay)
        if answer.status >= 400:
            return _error(answer)
        if answer.body is not None:
            return JSONResponse(answer.body, headers=answer.headers)
        if not received.streamed:
            return JSONResponse(_whole(model, answer, self.reply), headers=answer.headers)
        events = self._events(model, answer)
        if request.query_params.get("alt") != "sse":  # without alt=sse: one JSON array
            return JSONResponse([event async for event in events], headers=answer.headers)
        return StreamingResponse(
            _sse(events), media_type="text/event-stream", headers=answer.headers
        )

    async def _events(self, model: str, answer: Scripted) -> AsyncIterator[dict[str, Any]]:
        if answer.tool_calls:
            yield _response(model, _function_calls(answer.tool_calls), "STOP")
            return
        words = (answer.content or self.reply).split(" ")
        for index, word in enumerate(words):
            last = index == len(words) - 1
            yield _response(
                model, [{"text": word if last else word + " "}], "STOP" if last else None
            )
            if answer.fail_mid_stream:
                yield google_error(500, "An internal error has occurred.")
                return


def _key(request: Request) -> str | None:
    return request.headers.get("x-goog-api-key") or request.query_params.get("key")


def _is_extraction(body: dict[str, Any]) -> bool:
    parts = (body.get("systemInstruction") or {}).get("parts") or [{}]
    first = parts[0].get("text")
    return isinstance(first, str) and first.startswith(PROMPT_MARKER)


def _function_calls(tool_calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [
        {"functionCall": {"name": call["function"]["name"], "args": tool_call_arguments(call)}}
        for call in tool_calls
    ]
    parts[0]["thoughtSignature"] = THOUGHT_SIGNATURE
    return parts


def _whole(model: str, answer: Scripted, reply: str) -> dict[str, Any]:
    if answer.tool_calls:
        return _response(model, _function_calls(answer.tool_calls), "STOP")
    return _response(model, [{"text": answer.content or reply}], "STOP")


def _response(model: str, parts: list[dict[str, Any]], finish: str | None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
    if finish is not None:
        candidate["finishReason"] = finish
    return {
        "candidates": [candidate],
        "usageMetadata": USAGE,
        "modelVersion": model,
        "responseId": uuid.uuid4().hex[:22],
    }


async def _sse(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    async for event in events:
        yield b"data: " + json.dumps(event).encode() + b"\r\n\r\n"


def _error(answer: Scripted) -> Response:
    body = answer.body or google_error(answer.status)
    return JSONResponse(body, status_code=answer.status, headers=answer.headers)
