"""Engram's errors and the one place that turns any error into an OpenAI-shaped answer.

    ProxyError                  an answer Engram gives on purpose: status + OpenAI error body
    ├── BadRequest              400  malformed JSON, missing or wrongly typed fields
    ├── AuthenticationFailed    401  no key, unknown key, wrong secret, revoked key
    ├── PermissionDenied        403  X-Engram-User-ID names another user
    ├── NotFound                404  no such route, or not this user's object
    ├── Conflict                409  the object exists already (a user's email)
    ├── RequestTimeout          408  body not received within ENGRAM_REQUEST_BODY_TIMEOUT
    ├── PayloadTooLarge         413  body over ENGRAM_MAX_BODY_BYTES
    ├── HeadersTooLarge         431  too many or too large request headers
    └── ServiceUnavailable      503  a part Engram needs is down

ProviderErrors (providers.errors) map here too: an upstream's own error keeps
its status and body; unreachable → 502, timeout → 504, unreadable → 502.
Anything else is a bug: 500 with a generic message, the details only in the log.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Mapping
from typing import Any, Literal, TypedDict

import asyncpg
import structlog
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from providers.errors import (
    ProviderError,
    ProviderProtocolError,
    ProviderStatusError,
    ProviderTimeout,
    UnsupportedParameter,
)
from proxy.db.pool import is_outage

ErrorType = Literal[
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "request_too_large",
    "upstream_error",
    "timeout_error",
    "service_unavailable",
    "server_error",
]

log = structlog.get_logger("engram.errors")


class ErrorDetail(TypedDict):
    message: str
    type: ErrorType
    code: str | None
    param: str | None


class ErrorBody(TypedDict):
    error: ErrorDetail


class ProxyError(Exception):
    status_code = 500
    error_type: ErrorType = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or type(self).code
        self.headers = dict(headers or {})


class BadRequest(ProxyError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class AuthenticationFailed(ProxyError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(ProxyError):
    status_code = 403
    error_type = "permission_error"
    code = "user_mismatch"


class NotFound(ProxyError):
    status_code = 404
    error_type = "not_found_error"
    code = "not_found"


class Conflict(ProxyError):
    status_code = 409
    error_type = "invalid_request_error"
    code = "conflict"


class RequestTimeout(ProxyError):
    status_code = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


class HeadersTooLarge(ProxyError):
    status_code = 431
    error_type = "invalid_request_error"
    code = "headers_too_large"


class PayloadTooLarge(ProxyError):
    status_code = 413
    error_type = "request_too_large"
    code = "request_too_large"


class ServiceUnavailable(ProxyError):
    status_code = 503
    error_type = "service_unavailable"
    code = "service_unavailable"


def error_body(
    message: str, error_type: ErrorType, code: str | None, param: str | None = None
) -> ErrorBody:
    return {"error": {"message": message, "type": error_type, "code": code, "param": param}}


def proxy_error_response(error: ProxyError) -> JSONResponse:
    body = error_body(error.message, error.error_type, error.code, error.param)
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)


def provider_error_response(error: ProviderError) -> Response:
    """Relay an upstream's own error as it was; describe the others ourselves."""
    if isinstance(error, ProviderStatusError):
        return Response(
            error.body,
            status_code=error.status_code,
            headers=dict(error.headers),
            media_type=_relayed_media_type(error.body),
        )
    status, error_type, code = _provider_failure(error)
    return JSONResponse(error_body(error.message, error_type, code), status_code=status)


def _relayed_media_type(body: bytes) -> str:
    """An upstream error body is relayed as it came; it is called JSON only when it is."""
    try:
        json.loads(body)
    except ValueError:
        return "text/plain"
    return "application/json"


def provider_error_body(error: ProviderError) -> dict[str, Any]:
    """The OpenAI error body for a provider failure, as an SSE error frame carries it."""
    if isinstance(error, ProviderStatusError):
        try:
            relayed = json.loads(error.body)
        except ValueError:
            relayed = None
        if isinstance(relayed, dict) and isinstance(relayed.get("error"), dict):
            return relayed
        return dict(error_body(error.message, "upstream_error", "upstream_error"))
    _, error_type, code = _provider_failure(error)
    return dict(error_body(error.message, error_type, code))


def provider_error_status(error: ProviderError) -> int:
    """The status a client sees for a provider failure."""
    if isinstance(error, ProviderStatusError):
        return error.status_code
    return _provider_failure(error)[0]


def _provider_failure(error: ProviderError) -> tuple[int, ErrorType, str]:
    if isinstance(error, ProviderTimeout):
        return 504, "timeout_error", "upstream_timeout"
    if isinstance(error, ProviderProtocolError):
        return 502, "upstream_error", "upstream_bad_response"
    return 502, "upstream_error", "upstream_unreachable"


_HTTP_ERROR_TYPES: dict[int, tuple[ErrorType, str]] = {
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
}


async def handle_proxy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    return proxy_error_response(exc)


async def handle_provider_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProviderError)
    log.warning("provider_error", provider=exc.provider, host=exc.host, error=exc.message)
    return provider_error_response(exc)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error_type, code = _HTTP_ERROR_TYPES.get(exc.status_code, ("invalid_request_error", "error"))
    body = error_body(str(exc.detail), error_type, code)
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def handle_unsupported(request: Request, exc: Exception) -> Response:
    """A field the chosen provider cannot honour: refused, never silently dropped."""
    assert isinstance(exc, UnsupportedParameter)
    error = BadRequest(str(exc), param=exc.param, code="unsupported_parameter")
    return proxy_error_response(error)


def database_unavailable() -> ServiceUnavailable:
    return ServiceUnavailable(
        "the database is unreachable; try again shortly",
        code="database_unavailable",
        headers={"retry-after": "5"},
    )


async def handle_outage(request: Request, exc: Exception) -> Response:
    """A database that cannot be reached: degraded mode, and a 503 with Retry-After."""
    if not is_outage(exc):
        return await handle_unexpected(request, exc)
    health = getattr(getattr(request.state, "services", None), "health", None)
    if health is not None:
        health.mark_down(exc)
    return proxy_error_response(database_unavailable())


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    # Where it failed, but not the exception's text: asyncpg quotes query
    # arguments (memory content, messages) in its errors, and no log line may
    # carry message text.
    where = "".join(traceback.format_tb(exc.__traceback__))
    log.error("unhandled_error", error_class=type(exc).__name__, traceback=where)
    body = error_body("internal error in Engram", "server_error", "internal_error")
    return JSONResponse(body, status_code=500)


EXCEPTION_HANDLERS = {
    ProxyError: handle_proxy_error,
    ProviderError: handle_provider_error,
    HTTPException: handle_http_exception,
    UnsupportedParameter: handle_unsupported,
    OSError: handle_outage,
    asyncpg.PostgresConnectionError: handle_outage,
    asyncpg.InterfaceError: handle_outage,
    asyncpg.exceptions.OperatorInterventionError: handle_outage,
}


class UnexpectedErrorMiddleware:
    """Pure ASGI: any other exception becomes a 500 in the OpenAI shape.

    Starlette's own catch-all answers and then re-raises, which makes the
    server drop the client's keep-alive connection; this one answers and stops.
    An exception after the response started cannot become a response: it is
    raised on, and the server closes the connection.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        except Exception as exc:
            if started:
                raise
            response = await handle_unexpected(Request(scope, receive), exc)
            await response(scope, receive, send)
