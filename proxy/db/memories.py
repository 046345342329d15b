"""SQL for memories: nearest-neighbour search and capture with de-duplication."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import numpy as np

from proxy.db.pool import Pool


@dataclass(frozen=True)
class MemoryHit:
    id: UUID
    content: str
    score: float
    metadata: dict[str, Any]
    occurred_at: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class NewMemory:
    content: str
    content_hash: str
    embedding: np.ndarray[Any, Any]
    metadata: dict[str, Any]
    occurred_at: datetime | None = None
    kind: str = "other"
    confidence: float = 1.0
    source_conversation_id: UUID | None = None


@dataclass(frozen=True)
class CaptureResult:
    id: UUID
    status: str  # "stored" | "merged"
    similarity: float | None = None


# The inner query walks the HNSW index for this user's nearest rows; the
# threshold is applied outside it so the index scan can stop at `limit`.
_SEARCH = """
SELECT id, content, score, metadata, occurred_at, created_at FROM (
    SELECT id, content, 1 - (embedding <=> $2) AS score, metadata, occurred_at, created_at
    FROM memories
    WHERE user_id = $1 AND superseded_by IS NULL
    ORDER BY embedding <=> $2
    LIMIT $3
) nearest
WHERE score >= $4
ORDER BY score DESC
"""


async def search(
    pool: Pool, user_id: UUID, embedding: np.ndarray[Any, Any], limit: int, threshold: float
) -> list[MemoryHit]:
    """This user's active memories closest to `embedding`, best first."""
    rows = await pool.fetch(_SEARCH, user_id, embedding, limit, threshold)
    return [MemoryHit(**dict(row)) for row in rows]


async def capture(
    pool: Pool, user_id: UUID, memory: NewMemory, dedup_threshold: float
) -> CaptureResult:
    """Store `memory`, or merge it into an exact or near duplicate of this user's."""
    async with pool.acquire() as connection, connection.transaction():
        # Serialise captures per user so two near-duplicates cannot both be stored.
        await connection.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1::uuid::text, 0))", user_id
        )
        exact = await connection.fetchval(
            "SELECT id FROM memories WHERE user_id = $1 AND content_hash = $2",
            user_id,
            memory.content_hash,
        )
        if exact is not None:
            await _merge(connection, exact, memory)
            return CaptureResult(exact, "merged", 1.0)
        near = await connection.fetchrow(_SEARCH, user_id, memory.embedding, 1, dedup_threshold)
        if near is not None:
            await _merge(connection, near["id"], memory)
            return CaptureResult(near["id"], "merged", round(float(near["score"]), 6))
        memory_id: UUID = await connection.fetchval(
            """
            INSERT INTO memories (user_id, content, content_hash, embedding, kind, confidence,
                                  metadata, occurred_at, source_conversation_id)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
            RETURNING id
            """,
            user_id,
            memory.content,
            memory.content_hash,
            memory.embedding,
            memory.kind,
            memory.confidence,
            memory.metadata,
            memory.occurred_at,
            memory.source_conversation_id,
        )
        return CaptureResult(memory_id, "stored")


async def _merge(connection: Any, memory_id: UUID, memory: NewMemory) -> None:
    await connection.execute(
        """
        UPDATE memories
        SET confidence = GREATEST(confidence, $2),
            metadata = metadata || $3,
            updated_at = now()
        WHERE id = $1
        """,
        memory_id,
        memory.confidence,
        memory.metadata,
    )
