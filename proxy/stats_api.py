"""GET /stats: the key's user's extraction jobs and memories at a glance."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from proxy.db.jobs import job_stats
from proxy.db.memories import count_memories
from proxy.services import caller


async def stats(request: Request) -> JSONResponse:
    svc, principal = await caller(request)
    body = await job_stats(svc.pool, principal.user_id)
    body["memories"] = await count_memories(svc.pool, principal.user_id)
    return JSONResponse(body)
