"""Pure ASGI middleware bounding what a client may send: headers, body size, body time.

The body limit holds for chunked bodies too, counted as they stream in and
never buffered whole; the body deadline stops a client that trickles bytes
from holding a connection forever.
"""

from __future__ import annotations

import asyncio
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.errors import (
    HeadersTooLarge,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    proxy_error_response,
)

MAX_HEADER_BYTES = 32 * 1024
MAX_HEADER_COUNT = 100


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"request body is larger than the limit of {limit} bytes",
        headers={"connection": "close"},  # or the server would read the rest to keep it alive
    )


def _too_slow(deadline: float) -> RequestTimeout:
    return RequestTimeout(
        f"request body not received within {deadline:g} seconds",
        headers={"connection": "close"},
    )


class RequestLimitsMiddleware:
    """Refuse oversized headers, a body over `max_body_bytes` (at once from Content-Length,
    else as it streams in), and a body that takes longer than `body_deadline` seconds."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, body_deadline: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_deadline = body_deadline

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = self._refusal(scope)
        if refused is not None:
            await proxy_error_response(refused)(scope, receive, send)
            return
        await self.app(scope, self._bounded(receive), send)

    def _refusal(self, scope: Scope) -> ProxyError | None:
        headers = scope["headers"]
        size = sum(len(name) + len(value) for name, value in headers)
        if len(headers) > MAX_HEADER_COUNT or size > MAX_HEADER_BYTES:
            return HeadersTooLarge(
                f"request headers exceed {MAX_HEADER_COUNT} fields or {MAX_HEADER_BYTES} bytes"
            )
        declared = dict(headers).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return _too_large(self.max_body_bytes)
        return None

    def _bounded(self, receive: Receive) -> Receive:
        received = 0
        deadline = time.monotonic() + self.body_deadline
        body_done = False

        async def bounded_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # past the body, receive only waits for a disconnect: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except TimeoutError:
                raise _too_slow(self.body_deadline) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _too_large(self.max_body_bytes)
                body_done = not message.get("more_body", False)
            return message

        return bounded_receive
