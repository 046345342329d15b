"""POST /v1/chat/completions: authenticate, retrieve, inject, relay, then record."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from providers.base import (
    ChatCall,
    ChatStream,
    Provider,
    UpstreamResponse,
    first_choice_message,
)
from providers.errors import ProviderError
from providers.types import ChatRequest
from proxy import sse
from proxy.auth import Principal, authenticate_request
from proxy.db.evidence import (
    ConversationRecord,
    Exchange,
    RetrievalRecord,
    without_inline_files,
)
from proxy.db.pool import is_outage
from proxy.errors import BadRequest, provider_error_body, provider_error_status
from proxy.injection import inject
from proxy.logs import request_fields
from proxy.retrieval import Retrieval, query_text, retrieve
from proxy.routing import choose_provider
from proxy.services import Services, services
from proxy.validation import chat_request, json_object
from proxy.vault import RequestCredentials

# Request headers the upstream may need besides the key; nothing else is forwarded.
_FORWARDED_HEADERS = ("openai-organization", "openai-project", "openai-beta")
_TRUE, _FALSE = frozenset({"true", "1", "yes"}), frozenset({"false", "0", "no", ""})


def flag(headers: Mapping[str, str], name: str) -> bool:
    value = headers.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise BadRequest(f"header {name} must be true or false", param=name, code="invalid_header")


def forwarded_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {name: headers[name] for name in _FORWARDED_HEADERS if name in headers}


class Stopwatch:
    """Milliseconds since the request started, and named splits of it."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.splits: dict[str, float] = {}

    def since(self, start: float) -> float:
        return round((time.perf_counter() - start) * 1000, 3)

    def mark(self, name: str, start: float) -> None:
        self.splits[name] = self.since(start)

    def total(self) -> dict[str, float]:
        return {**self.splits, "total_ms": self.since(self.started)}


@dataclass
class ChatExchange:
    """Everything known about one proxied call, turned into its evidence at the end."""

    services: Services
    principal: Principal
    provider: Provider
    body: ChatRequest
    retrieval: Retrieval
    disable_extraction: bool
    stopwatch: Stopwatch
    provider_key: str | None = field(default=None, repr=False)
    mode: str = "full"  # "passthrough" while the database is away
    conversation_id: uuid.UUID = field(default_factory=uuid.uuid4)
    retrieval_id: uuid.UUID = field(default_factory=uuid.uuid4)

    def engram_headers(self) -> dict[str, str]:
        headers = {
            "x-engram-memories-injected": str(len(self.retrieval.hits)),
            "x-engram-mode": self.mode,
        }
        if self.retrieval.hits:
            headers["x-engram-retrieval-id"] = str(self.retrieval_id)
        return headers

    def record(self, status_code: int, reply: dict[str, Any] | None) -> None:
        """Queue the conversation row and retrieval log; written off the request's path."""
        timings = self.stopwatch.total()
        request_fields().update(timings)
        extract = status_code < 400 and not self.disable_extraction
        extract = extract and self.services.settings.extraction != "off"
        user_id = self.principal.user_id
        conversation = ConversationRecord(
            self.conversation_id, user_id, self.provider.name, self.body["model"],
            without_inline_files(self.body["messages"]), reply, status_code,
            "pending" if extract else "skipped",
        )  # fmt: skip
        retrieval = RetrievalRecord(
            self.retrieval_id, user_id, self.conversation_id, self.retrieval.query_text,
            self.retrieval.embedding, self.retrieval.memory_ids, self.retrieval.scores, timings,
        )  # fmt: skip
        holder = self._hold_credentials() if extract else None
        self.services.recorder.submit(Exchange(conversation, retrieval, holder))

    def _hold_credentials(self) -> str | None:
        """Keep the request's key in memory for its extraction job, if that job needs it."""
        svc = self.services
        if svc.vault is None or svc.settings.extraction != "llm" or svc.settings.extraction_model:
            return None
        credentials = RequestCredentials(self.provider.name, self.body["model"], self.provider_key)
        svc.vault.put(self.conversation_id, credentials)
        return svc.instance_id


async def chat_completions(request: Request) -> Response:
    """The OpenAI chat endpoint with memory: see DESIGN.md, "The request path"."""
    svc = services(request)
    stopwatch = Stopwatch()
    principal, credentials = await authenticate_request(svc.authenticator, request.headers)
    stopwatch.mark("auth_ms", stopwatch.started)
    body = chat_request(await json_object(request), svc.settings.max_messages)
    disable_injection = flag(request.headers, "x-engram-disable-injection")
    name, model = choose_provider(
        request.headers, body["model"], svc.settings.default_provider, svc.providers
    )
    provider, body = svc.providers[name], {**body, "model": model}
    provider_key = credentials.provider_key or svc.settings.server_key(name)
    request_fields().update(
        user_id=str(principal.user_id), provider=provider.name, model=body["model"],
        stream=bool(body.get("stream")),
    )  # fmt: skip
    retrieval, mode = await _memories_for(svc, principal, body, disable_injection)
    stopwatch.splits.update(embed_ms=retrieval.embed_ms, retrieve_ms=retrieval.retrieve_ms)
    request_fields().update(memories_injected=len(retrieval.hits), mode=mode)
    exchange = ChatExchange(
        svc, principal, provider, body, retrieval,
        flag(request.headers, "x-engram-disable-extraction"), stopwatch, provider_key, mode,
    )  # fmt: skip
    messages = inject(body["messages"], [hit.content for hit in retrieval.hits])
    call = ChatCall({**body, "messages": messages}, provider_key,
                    forwarded_headers(request.headers))  # fmt: skip
    if body.get("stream"):
        return await _streamed(exchange, call)
    return await _complete(exchange, call)


async def _memories_for(
    svc: Services, principal: Principal, body: ChatRequest, disabled: bool
) -> tuple[Retrieval, str]:
    """The memories to inject, and the mode: passthrough (none) while the database is away."""
    unretrieved = Retrieval(query_text(body["messages"]), None, [])
    if disabled:
        return unretrieved, "full"
    if not svc.health.up:
        return unretrieved, "passthrough"
    try:
        retrieval = await retrieve(
            svc.embedder,
            svc.pool,
            principal.user_id,
            principal.settings,
            body["messages"],
            hybrid=svc.settings.search == "hybrid",
        )
    except Exception as error:
        if not is_outage(error):
            raise
        svc.health.mark_down(error)  # the key was verified already: serve it in passthrough
        return unretrieved, "passthrough"
    return retrieval, "full"


async def _complete(exchange: ChatExchange, call: ChatCall) -> Response:
    upstream_started = time.perf_counter()
    try:
        answer = await exchange.provider.complete(call)
    except ProviderError as error:
        exchange.record(provider_error_status(error), None)
        raise
    finally:
        exchange.stopwatch.mark("upstream_first_byte_ms", upstream_started)
    return Response(
        answer.body,
        status_code=answer.status_code,
        headers={**answer.headers, **exchange.engram_headers()},
        media_type="application/json",
        background=BackgroundTask(_record_completion, exchange, answer),
    )


async def _record_completion(exchange: ChatExchange, answer: UpstreamResponse) -> None:
    """Read the reply and queue the evidence once the answer is sent.

    Async so Starlette runs it on the event loop: a synchronous background task
    hops to a worker thread and back for every request.
    """
    exchange.record(answer.status_code, first_choice_message(answer.body))


async def _streamed(exchange: ChatExchange, call: ChatCall) -> Response:
    upstream_started = time.perf_counter()
    try:
        stream = await exchange.provider.stream(call)
    except ProviderError as error:
        exchange.stopwatch.mark("upstream_first_byte_ms", upstream_started)
        exchange.record(provider_error_status(error), None)
        raise
    return StreamingResponse(
        _relay(exchange, stream, upstream_started),
        headers={**stream.headers, **exchange.engram_headers(), "cache-control": "no-cache"},
        media_type="text/event-stream",
    )


async def _relay(
    exchange: ChatExchange, stream: ChatStream, upstream_started: float
) -> AsyncIterator[bytes]:
    """Pass chunks on as they arrive; an upstream failure becomes an SSE error event."""
    assembler = sse.ReplyAssembler()
    status = 200
    try:
        async for chunk in stream:
            if "upstream_first_byte_ms" not in exchange.stopwatch.splits:
                exchange.stopwatch.mark("upstream_first_byte_ms", upstream_started)
            assembler.feed(chunk)
            yield chunk
            # Let a client's disconnect cancel the relay. Neither side need ever
            # suspend otherwise: aiohttp hands out chunks it already holds, and
            # once the client is gone uvicorn's send returns at once, so a relay
            # would read a buffered-up upstream to its end for nobody.
            await anyio.lowlevel.checkpoint()
    except ProviderError as error:
        status = provider_error_status(error)
        yield sse.error_event(provider_error_body(error))
    finally:
        with anyio.CancelScope(shield=True):
            await stream.aclose()
        exchange.record(status, assembler.reply())
