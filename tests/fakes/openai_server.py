"""A fake OpenAI chat server: records what it receives, answers like the real API.

Used by the tests (as the upstream Engram calls) and by the benchmarks in
scripts/, which set a fixed delay before the first token and a token rate.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from proxy.extraction import PROMPT_MARKER
from tests.fakes.recording import Received, Scripted, ScriptedUpstream

__all__ = ["FakeOpenAI", "Received", "Scripted"]


class FakeOpenAI(ScriptedUpstream):
    """The fake's state and its Starlette app."""

    def __init__(
        self,
        reply: str = "Hello from the fake upstream.",
        first_token_delay: float = 0.0,
        token_interval: float = 0.0,
    ) -> None:
        super().__init__()
        self.reply = reply
        self.first_token_delay = first_token_delay
        self.token_interval = token_interval
        # Streams that ran to [DONE], and streams cut off (the client went away).
        self.streams_finished = 0
        self.streams_interrupted = 0
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        )

    def exchange_of(self, call: Received) -> str:
        """The exchange part of an extraction prompt (existing memories left out)."""
        prompt = str(call.messages[-1].get("content") or "")
        return prompt.split("<existing_memories>")[0]

    async def _models(self, request: Request) -> Response:
        self.record_models_call(dict(request.headers))
        models = [{"id": "gpt-fake", "object": "model", "created": 0, "owned_by": "fake"}]
        return JSONResponse({"object": "list", "data": models})

    async def _chat(self, request: Request) -> Response:
        body = json.loads(await request.body())
        if _is_extraction(body):
            return self._extract(Received(dict(request.headers), body))
        answer = self.next_answer(Received(dict(request.headers), body))
        if answer.raw is not None:
            return Response(
                answer.raw,
                status_code=answer.status,
                media_type="application/json",
                headers=answer.headers,
            )
        if answer.status >= 400:
            error = answer.body or {"error": {"message": "fake failure", "type": "x", "code": None}}
            return JSONResponse(error, status_code=answer.status, headers=answer.headers)
        if answer.body is not None:
            return JSONResponse(answer.body, headers=answer.headers)
        if body.get("stream"):
            return StreamingResponse(
                self._tracked(self._chunks(body, answer)),
                media_type="text/event-stream",
                headers={"x-request-id": "req_fake", **answer.headers},
            )
        await asyncio.sleep(self.first_token_delay)
        return JSONResponse(
            self._completion(body, answer), headers={"x-request-id": "req_fake", **answer.headers}
        )

    def _extract(self, received: Received) -> Response:
        output = self.extraction_answer(received)
        if isinstance(output, Scripted):
            return JSONResponse(output.body or {"error": {"message": "fake"}}, output.status)
        return JSONResponse(self._completion(received.body, Scripted(content=output)))

    def _completion(self, body: dict[str, Any], answer: Scripted) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": answer.content or self.reply}
        finish = "stop"
        if answer.tool_calls:
            message = {"role": "assistant", "content": None, "tool_calls": answer.tool_calls}
            finish = "tool_calls"
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "gpt-fake"),
            "system_fingerprint": "fp_fake",
            "choices": [
                {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }

    async def _tracked(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        finished = False
        try:
            async for chunk in chunks:
                yield chunk
            finished = True
        finally:
            with self._lock:
                if finished:
                    self.streams_finished += 1
                else:
                    self.streams_interrupted += 1

    async def _chunks(self, body: dict[str, Any], answer: Scripted) -> AsyncIterator[bytes]:
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model", "gpt-fake"),
        }

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return b"data: " + json.dumps({**base, "choices": [choice]}).encode() + b"\n\n"

        await asyncio.sleep(self.first_token_delay)
        yield chunk({"role": "assistant", "content": ""})
        if answer.tool_calls:
            for index, call in enumerate(answer.tool_calls):
                name = call["function"]["name"]
                head = {"index": index, "id": call["id"], "type": "function",
                        "function": {"name": name, "arguments": ""}}  # fmt: skip
                yield chunk({"tool_calls": [head]})
                arguments = call["function"]["arguments"]
                for start in range(0, len(arguments), 8):
                    piece = {
                        "index": index,
                        "function": {"arguments": arguments[start : start + 8]},
                    }
                    yield chunk({"tool_calls": [piece]})
            yield chunk({}, "tool_calls")
        else:
            for word in (answer.content or self.reply).split(" "):
                await asyncio.sleep(self.token_interval)
                yield chunk({"content": word + " "})
                if answer.fail_mid_stream:
                    raise RuntimeError("fake upstream broke mid-stream")
            yield chunk({}, "stop")
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
            yield b"data: " + json.dumps({**base, "choices": [], "usage": usage}).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"


def _is_extraction(body: dict[str, Any]) -> bool:
    messages = body.get("messages") or [{}]
    first = messages[0].get("content")
    return isinstance(first, str) and first.startswith(PROMPT_MARKER)


if __name__ == "__main__":
    # `python -m tests.fakes.openai_server [PORT]`: a stand-in upstream for trying Engram
    # out without a provider account; it logs what it receives on stdout.
    import sys

    import uvicorn

    fake = FakeOpenAI()

    async def show(scope: Any, receive: Any, send: Any) -> None:
        await fake.app(scope, receive, send)
        if scope["type"] == "http" and fake.received:
            print(json.dumps(fake.received[-1].body, indent=2), flush=True)
            fake.received.clear()

    uvicorn.run(show, port=int(sys.argv[1]) if len(sys.argv) > 1 else 9999, log_level="warning")
