"""GET /v1/models: the provider's model list, passed through."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from proxy.auth import authenticate_request
from proxy.services import services


async def list_models(request: Request) -> Response:
    svc = services(request)
    _, credentials = await authenticate_request(
        svc.authenticator, request.headers, svc.settings.openai_api_key
    )
    answer = await svc.providers["openai"].list_models(credentials.provider_key)
    return Response(
        answer.body, answer.status_code, headers=dict(answer.headers), media_type="application/json"
    )
