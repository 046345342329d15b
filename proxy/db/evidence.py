"""SQL for the evidence of each proxied call: its conversation row and retrieval log."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import numpy as np

from proxy.db.jobs import enqueue
from proxy.db.pool import Pool


@dataclass(frozen=True)
class ConversationRecord:
    id: UUID
    user_id: UUID
    provider: str
    model: str
    messages: list[dict[str, Any]]
    reply: dict[str, Any] | None
    status_code: int
    extraction_status: str  # "pending" | "skipped"


@dataclass(frozen=True)
class RetrievalRecord:
    id: UUID
    user_id: UUID
    conversation_id: UUID
    query_text: str
    query_embedding: np.ndarray[Any, Any] | None
    memory_ids: list[UUID]
    scores: list[float]
    timings: dict[str, float] = field(default_factory=dict)


def storable(value: Any) -> Any:
    """`value` with NUL characters replaced: PostgreSQL text and jsonb cannot hold them,
    and a request that carried one must still leave its evidence."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {storable(key): storable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [storable(item) for item in value]
    return value


@dataclass(frozen=True)
class Exchange:
    """One proxied call's evidence, as the recorder writes (or journals) it."""

    conversation: ConversationRecord
    retrieval: RetrievalRecord
    credentials_holder: str | None = None  # the process whose memory holds the request's key


async def record_exchange(pool: Pool, exchange: Exchange) -> None:
    """Write both rows, the extraction job if one is due, and count the memories' use.

    One transaction, idempotent: a retried or replayed write never duplicates.
    """
    conversation, retrieval = exchange.conversation, exchange.retrieval
    async with pool.acquire() as connection, connection.transaction():
        inserted = await connection.fetchval(
            """
            INSERT INTO conversations (id, user_id, provider, model, messages, reply,
                                       status_code, extraction_status)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
            ON CONFLICT (id) DO NOTHING
            RETURNING true
            """,
            conversation.id,
            conversation.user_id,
            conversation.provider,
            conversation.model,
            storable(conversation.messages),
            storable(conversation.reply),
            conversation.status_code,
            conversation.extraction_status,
        )
        if not inserted:
            return
        await connection.execute(
            """
            INSERT INTO retrieval_logs (id, user_id, conversation_id, query_text,
                                        query_embedding, memory_ids, scores, timings)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
            """,
            retrieval.id,
            retrieval.user_id,
            retrieval.conversation_id,
            storable(retrieval.query_text),
            retrieval.query_embedding,
            retrieval.memory_ids,
            retrieval.scores,
            retrieval.timings,
        )
        if conversation.extraction_status == "pending":
            await enqueue(
                connection, conversation.user_id, conversation.id, exchange.credentials_holder
            )
        if retrieval.memory_ids:
            await connection.execute(
                """
                UPDATE memories SET access_count = access_count + 1, last_accessed_at = now()
                WHERE user_id = $1 AND id = ANY($2::uuid[])
                """,
                retrieval.user_id,
                retrieval.memory_ids,
            )


@dataclass(frozen=True)
class RetrievalLogEntry:
    id: UUID
    conversation_id: UUID | None
    query_text: str
    memories: list[dict[str, Any]]
    timings: dict[str, float]
    provider: str | None
    model: str | None
    created_at: datetime


async def list_retrieval_logs(
    pool: Pool, user_id: UUID, limit: int, before: UUID | None
) -> list[RetrievalLogEntry]:
    """This user's logs, newest first, starting after the log `before` (a page cursor)."""
    rows = await pool.fetch(
        """
        SELECT l.id, l.conversation_id, l.query_text, l.memory_ids, l.scores, l.timings,
               c.provider, c.model, l.created_at,
               ARRAY(SELECT m.content FROM unnest(l.memory_ids) WITH ORDINALITY AS u(id, n)
                     LEFT JOIN memories m ON m.id = u.id AND m.user_id = l.user_id
                     ORDER BY u.n) AS contents
        FROM retrieval_logs l
        LEFT JOIN conversations c ON c.id = l.conversation_id
        WHERE l.user_id = $1
          AND ($2::uuid IS NULL OR (l.created_at, l.id) < (
                SELECT created_at, id FROM retrieval_logs WHERE id = $2 AND user_id = $1))
        ORDER BY l.created_at DESC, l.id DESC
        LIMIT $3
        """,
        user_id,
        before,
        limit,
    )
    return [
        RetrievalLogEntry(
            id=row["id"],
            conversation_id=row["conversation_id"],
            query_text=row["query_text"],
            memories=[
                {"id": str(memory_id), "score": score, "content": content}
                for memory_id, score, content in zip(
                    row["memory_ids"], row["scores"], row["contents"], strict=True
                )
            ],
            timings=row["timings"],
            provider=row["provider"],
            model=row["model"],
            created_at=row["created_at"],
        )
        for row in rows
    ]
