"""Administration over HTTP: creating users, behind ENGRAM_ADMIN_KEY."""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.responses import JSONResponse

from proxy import keys
from proxy.db.pool import Pool
from proxy.db.users import EmailTaken, create_user_with_key
from proxy.errors import AuthenticationFailed, Conflict, NotFound
from proxy.services import services
from proxy.validation import invalid_field, json_object, text_field

MAX_EMAIL_CHARS = 320


async def new_user(pool: Pool, email: str) -> dict[str, str]:
    """Create a user with a first key; the only time the key is ever shown."""
    key, secret_hash = keys.generate()
    try:
        user_id = await create_user_with_key(pool, email.strip(), key.key_id, secret_hash)
    except EmailTaken:
        raise Conflict(f"a user with email {email!r} already exists", param="email") from None
    return {"userId": str(user_id), "apiKey": key.plaintext}


def _require_admin(request: Request, admin_key: str | None) -> None:
    if admin_key is None:
        raise NotFound("the admin API is disabled: set ENGRAM_ADMIN_KEY to enable it")
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    valid = scheme.lower() == "bearer" and hmac.compare_digest(
        presented.strip().encode(), admin_key.encode()
    )
    if not valid:
        raise AuthenticationFailed("invalid admin key")


async def create_user(request: Request) -> JSONResponse:
    """POST /users {"email"} with Authorization: Bearer $ENGRAM_ADMIN_KEY."""
    svc = services(request)
    _require_admin(request, svc.settings.admin_key)
    svc.health.require_up()
    body = await json_object(request)
    email = text_field(body, "email", MAX_EMAIL_CHARS)
    if "@" not in email:
        raise invalid_field("email", "must be an email address")
    return JSONResponse(await new_user(svc.pool, email), status_code=201)
