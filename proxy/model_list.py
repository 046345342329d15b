"""GET /v1/models: the models of every configured provider, in one OpenAI list.

OpenAI's (the default upstream's) come as they are; the others are prefixed with
their provider's name (`ollama/llama3.2`), which is how a request selects them.
A provider that is down is left out and logged.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from providers.base import Provider, UpstreamResponse
from proxy.auth import authenticate_request
from proxy.routing import choose_provider
from proxy.services import Services, services

log = structlog.get_logger("engram.models")
_LIST_TIMEOUT_SECONDS = 5.0


def _listed(svc: Services, byok: str | None, selected: str) -> dict[str, str | None]:
    """The providers to ask, with the key for each; Gemini only when a key is at hand.

    The caller's own key belongs to the provider the request selects: the others are
    asked with the server's keys, so an OpenAI key is never sent to Google, or back.
    """
    keys = {
        name: (byok if name == selected else None) or svc.settings.server_key(name)
        for name in svc.providers
    }
    return {name: key for name, key in keys.items() if name != "gemini" or key}


async def _ask(provider: Provider, key: str | None) -> UpstreamResponse:
    return await asyncio.wait_for(provider.list_models(key), _LIST_TIMEOUT_SECONDS)


def _models(name: str, answer: UpstreamResponse) -> list[dict[str, Any]]:
    data = json.loads(answer.body).get("data") or []
    if name == "openai":
        return list(data)
    return [{**model, "id": f"{name}/{model['id']}"} for model in data]


async def list_models(request: Request) -> Response:
    svc = services(request)
    _, credentials = await authenticate_request(svc.authenticator, request.headers)
    selected, _ = choose_provider(request.headers, "", svc.settings.default_provider, svc.providers)
    asked = _listed(svc, credentials.provider_key, selected)
    answers = await asyncio.gather(
        *(_ask(svc.providers[name], key) for name, key in asked.items()), return_exceptions=True
    )
    models: list[dict[str, Any]] = []
    failures: list[BaseException] = []
    for name, answer in zip(asked, answers, strict=True):
        if isinstance(answer, BaseException):
            log.warning("models_unavailable", provider=name, error_class=type(answer).__name__)
            failures.append(answer)
        else:
            models += _models(name, answer)
    if failures and len(failures) == len(asked):
        raise failures[0]  # nothing to list: say why, as the provider answered
    return JSONResponse({"object": "list", "data": models})
