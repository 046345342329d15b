"""create_app(settings) → the Starlette app: routes, middleware, error handlers, lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from proxy import admin, chat, keys_api, memory_api, model_list, stats_api
from proxy.errors import EXCEPTION_HANDLERS, UnexpectedErrorMiddleware
from proxy.limits import RequestLimitsMiddleware
from proxy.logs import RequestLogMiddleware
from proxy.services import open_services, services
from proxy.settings import Settings


async def healthz(request: Request) -> JSONResponse:
    """The process is alive."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    """Ready to serve: 200 even when degraded, since passthrough still serves known keys."""
    svc = services(request)
    up = svc.health.up
    body = {"status": "ready" if up else "degraded", "database": "up" if up else "down"}
    return JSONResponse(body)


def create_app(settings: Settings) -> Starlette:
    """The whole Engram HTTP app; nothing starts until its lifespan runs."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, object]]:
        async with open_services(settings) as services:
            yield {"services": services}

    routes = [
        Route("/v1/chat/completions", chat.chat_completions, methods=["POST"]),
        Route("/v1/chat", chat.chat_completions, methods=["POST"]),
        Route("/v1/models", model_list.list_models, methods=["GET"]),
        Route("/memories/capture", memory_api.capture, methods=["POST"]),
        Route("/memories/search", memory_api.search, methods=["POST"]),
        Route("/retrieval-logs", memory_api.retrieval_logs, methods=["GET"]),
        Route("/stats", stats_api.stats, methods=["GET"]),
        Route("/users", admin.create_user, methods=["POST"]),
        Route("/keys", keys_api.list_keys, methods=["GET"]),
        Route("/keys", keys_api.create_key, methods=["POST"]),
        Route("/keys/{key_id}", keys_api.revoke_key, methods=["DELETE"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]
    middleware = [
        Middleware(RequestLogMiddleware),
        Middleware(UnexpectedErrorMiddleware),
        Middleware(
            RequestLimitsMiddleware,
            max_body_bytes=settings.max_body_bytes,
            body_deadline=settings.request_body_timeout,
        ),
    ]
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
