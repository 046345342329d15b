"""Capturing and searching one user's memories: text normalised, embedded, de-duplicated."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from datetime import datetime
from typing import Any
from uuid import UUID

from proxy.db import memories as memory_sql
from proxy.db.memories import CaptureResult, MemoryHit, NewMemory
from proxy.db.pool import Pool
from proxy.embeddings import Embedder

_SPACES = re.compile(r"\s+")


def normalise(text: str) -> str:
    """The form two memories share when they say the same thing in the same words."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text)).strip().casefold()


def content_hash(text: str) -> str:
    return hashlib.sha256(normalise(text).encode()).hexdigest()


async def capture(
    pool: Pool,
    embedder: Embedder,
    user_id: UUID,
    content: str,
    *,
    dedup_threshold: float,
    metadata: dict[str, Any] | None = None,
    occurred_at: datetime | None = None,
    kind: str = "other",
    confidence: float = 1.0,
    source_conversation_id: UUID | None = None,
) -> CaptureResult:
    """Store `content` for the user, or merge it into an exact or near duplicate."""
    content = content.strip()
    memory = NewMemory(
        content=content,
        content_hash=content_hash(content),
        embedding=await embedder.embed(content),
        metadata=metadata or {},
        occurred_at=occurred_at,
        kind=kind,
        confidence=confidence,
        source_conversation_id=source_conversation_id,
    )
    return await memory_sql.capture(pool, user_id, memory, dedup_threshold)


async def search(
    pool: Pool,
    embedder: Embedder,
    user_id: UUID,
    query: str,
    limit: int,
    threshold: float,
    hybrid: bool = True,
) -> list[MemoryHit]:
    """The user's active memories most relevant to `query`, best first."""
    embedding = await embedder.embed(query)
    return await memory_sql.search(
        pool, user_id, embedding, limit, threshold, query if hybrid else None
    )
