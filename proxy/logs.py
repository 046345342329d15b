"""structlog JSON logs, and the middleware that writes one line per request.

Handlers add what they learn (user, provider, timings) to `request_fields()`;
the middleware logs it once the response is finished, streamed or not. Only
fields put there on purpose are logged: never headers, keys or message text.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from contextvars import ContextVar
from typing import Any, TextIO

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_request_fields: ContextVar[dict[str, Any] | None] = ContextVar("request_fields", default=None)
log = structlog.get_logger("engram.request")


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """JSON lines on `stream` (stdout by default) for structlog and stdlib loggers alike."""
    renderer_chain: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    output = stream or sys.stdout
    structlog.configure(
        processors=[*renderer_chain, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.WriteLoggerFactory(output),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(output)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(),
            ],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *renderer_chain],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)


def request_fields() -> dict[str, Any]:
    """The fields of the current request's log line; add to it freely."""
    fields = _request_fields.get()
    return fields if fields is not None else {}


class RequestLogMiddleware:
    """Pure ASGI: a request id for each request, and its one log line at the end."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        fields: dict[str, Any] = {
            "request_id": request_id,
            "method": scope["method"],
            "path": scope["path"],  # never the query string: it may carry a key
        }
        token = _request_fields.set(fields)
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                fields["status"] = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-engram-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            fields["total_ms"] = round((time.perf_counter() - started) * 1000, 3)
            fields.setdefault("status", 500)
            log.info("request", **{k: v for k, v in fields.items() if k != "request_id"})
            structlog.contextvars.unbind_contextvars("request_id")
            _request_fields.reset(token)
