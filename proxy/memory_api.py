"""The memories API for the key's user: capture, search, and the retrieval logs."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from proxy import memories
from proxy.db.evidence import list_retrieval_logs
from proxy.db.memories import MemoryHit
from proxy.services import caller
from proxy.validation import invalid_field, json_object, number_field, text_field

MAX_CONTENT_CHARS = 8000
MAX_QUERY_CHARS = 4000
MAX_SEARCH_LIMIT = 100
MAX_LOG_PAGE = 100


def _timestamp(body: dict[str, Any], name: str) -> datetime | None:
    value = body.get(name)
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None:
        raise invalid_field(name, "must be an ISO 8601 date-time")
    try:  # in UTC, 0001-01-01T00:00+14:00 falls before the first year a datetime holds
        return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except OverflowError:
        raise invalid_field(name, "is outside the years 1 to 9999 in UTC") from None


def _holds_nul(value: Any) -> bool:
    """True when a string anywhere in `value` holds NUL, which PostgreSQL cannot store."""
    pending = [value]  # a loop, not recursion: the JSON may nest as deep as the parser allowed
    while pending:
        item = pending.pop()
        if isinstance(item, str) and "\x00" in item:
            return True
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def _metadata(body: dict[str, Any]) -> dict[str, Any]:
    value = body.get("metadata")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid_field("metadata", "must be a JSON object")
    if _holds_nul(value):
        raise invalid_field("metadata", "must not contain NUL characters")
    return value


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def hit_json(hit: MemoryHit) -> dict[str, Any]:
    return {
        "id": str(hit.id),
        "content": hit.content,
        "score": round(hit.score, 6),
        "metadata": hit.metadata,
        "occurred_at": _iso(hit.occurred_at),
        "created_at": _iso(hit.created_at),
    }


async def capture(request: Request) -> JSONResponse:
    """POST /memories/capture {"content", "metadata"?, "occurred_at"?}."""
    svc, principal = await caller(request)
    body = await json_object(request)
    result = await memories.capture(
        svc.pool,
        svc.embedder,
        principal.user_id,
        text_field(body, "content", MAX_CONTENT_CHARS),
        dedup_threshold=principal.settings.dedup_threshold,
        metadata=_metadata(body),
        occurred_at=_timestamp(body, "occurred_at"),
    )
    answer: dict[str, Any] = {"id": str(result.id), "status": result.status}
    if result.similarity is not None:
        answer["similarity"] = result.similarity
    return JSONResponse(answer, status_code=201 if result.status == "stored" else 200)


async def search(request: Request) -> JSONResponse:
    """POST /memories/search {"query", "limit"?, "threshold"?}."""
    svc, principal = await caller(request)
    body = await json_object(request)
    limit = number_field(body, "limit", 10, 1, MAX_SEARCH_LIMIT)
    if limit != int(limit):
        raise invalid_field("limit", "must be a whole number")
    hits = await memories.search(
        svc.pool,
        svc.embedder,
        principal.user_id,
        text_field(body, "query", MAX_QUERY_CHARS),
        int(limit),
        number_field(body, "threshold", principal.settings.retrieval_threshold, -1, 1),
        hybrid=svc.settings.search == "hybrid",
    )
    return JSONResponse({"results": [hit_json(hit) for hit in hits]})


def _page_params(request: Request) -> tuple[int, uuid.UUID | None]:
    raw_limit = request.query_params.get("limit", "20")
    # isdigit() alone lets "²" or a 5000-digit string through to int(), which then raises.
    plain = raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 6
    limit = int(raw_limit) if plain else 0
    if not 1 <= limit <= MAX_LOG_PAGE:
        raise invalid_field("limit", f"must be a whole number from 1 to {MAX_LOG_PAGE}")
    raw_before = request.query_params.get("before")
    try:
        before = uuid.UUID(raw_before) if raw_before else None
    except ValueError:
        raise invalid_field("before", "must be a retrieval log id") from None
    return limit, before


async def retrieval_logs(request: Request) -> JSONResponse:
    """GET /retrieval-logs?limit=&before=: this user's logs, newest first."""
    svc, principal = await caller(request)
    limit, before = _page_params(request)
    entries = await list_retrieval_logs(svc.pool, principal.user_id, limit + 1, before)
    page = entries[:limit]
    data = [
        {
            "id": str(entry.id),
            "conversation_id": str(entry.conversation_id) if entry.conversation_id else None,
            "query_text": entry.query_text,
            "memories": entry.memories,
            "timings": entry.timings,
            "provider": entry.provider,
            "model": entry.model,
            "created_at": _iso(entry.created_at),
        }
        for entry in page
    ]
    has_more = len(entries) > limit
    return JSONResponse(
        {
            "data": data,
            "has_more": has_more,
            "next_before": data[-1]["id"] if has_more else None,
        }
    )
