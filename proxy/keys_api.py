"""The key's user's API keys: list, create another, revoke (effective at once here)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from proxy import keys
from proxy.db import users as user_sql
from proxy.errors import NotFound
from proxy.services import caller
from proxy.validation import json_object, text_field

MAX_NAME_CHARS = 100


def _key_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        name: value.isoformat() if isinstance(value, datetime) else value
        for name, value in row.items()
    }


async def list_keys(request: Request) -> JSONResponse:
    """GET /keys: the user's keys (never their secrets)."""
    svc, principal = await caller(request)
    rows = await user_sql.list_keys(svc.pool, principal.user_id)
    return JSONResponse({"data": [_key_json(row) for row in rows]})


async def create_key(request: Request) -> JSONResponse:
    """POST /keys {"name"}: another key for the same user, shown this once."""
    svc, principal = await caller(request)
    name = text_field(await json_object(request), "name", MAX_NAME_CHARS)
    key, secret_hash = keys.generate()
    await user_sql.add_key(svc.pool, principal.user_id, key.key_id, secret_hash, name)
    return JSONResponse({"keyId": key.key_id, "name": name, "apiKey": key.plaintext}, 201)


async def revoke_key(request: Request) -> JSONResponse:
    """DELETE /keys/{key_id}: revoke it; this instance stops accepting it at once."""
    svc, principal = await caller(request)
    key_id = request.path_params["key_id"]
    if not await user_sql.revoke_key(svc.pool, principal.user_id, key_id):
        raise NotFound("no such key")
    svc.authenticator.evict(key_id)
    return JSONResponse({"keyId": key_id, "revoked": True})
