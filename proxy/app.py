"""create_app(settings) → the Starlette app: routes, middleware, error handlers, lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from proxy import admin, chat, memory_api, model_list, stats_api
from proxy.errors import EXCEPTION_HANDLERS
from proxy.limits import BodyLimitMiddleware
from proxy.logs import RequestLogMiddleware
from proxy.services import open_services
from proxy.settings import Settings


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


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
        Route("/healthz", healthz, methods=["GET"]),
    ]
    middleware = [
        Middleware(RequestLogMiddleware),
        Middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes),
    ]
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
