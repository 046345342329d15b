"""SQL for the evidence of each proxied call: its conversation row and retrieval log."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import numpy as np

from proxy.db.jobs import enqueue_many
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


# Content parts that can carry a file inline (OpenAI's chat format), and the
# key of the part's object that holds it: a data: URL or bare base64.
_INLINE_PARTS = {"image_url": "url", "input_audio": "data", "file": "file_data"}


def without_inline_files(messages: Sequence[Mapping[str, object]]) -> list[dict[str, Any]]:
    """Copies of `messages` in which every image, audio clip or file sent inline is
    replaced by a note of its size; links (https URLs, file ids) are kept.

    A photo or a PDF sent as base64 is megabytes, and a chat sends it again with
    every later turn: stored as sent, each conversation row would hold it once
    more. Memory extraction reads only the text.
    """
    return [_message_without_inline_files(message) for message in messages]


def _message_without_inline_files(message: Mapping[str, object]) -> dict[str, Any]:
    content = message.get("content")
    if not isinstance(content, list):
        return dict(message)
    return {**message, "content": [_part_without_inline_file(part) for part in content]}


def _part_without_inline_file(part: Any) -> Any:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind not in _INLINE_PARTS:
        return part
    holder, key = part.get(kind), _INLINE_PARTS[kind]
    data = holder.get(key) if isinstance(holder, dict) else None
    if not isinstance(data, str) or (kind == "image_url" and not data.startswith("data:")):
        return part  # nothing inline: a link, or a shape the provider refused
    header, comma, payload = data.partition(",") if data.startswith("data:") else ("", "", data)
    return {
        **part,
        kind: {**holder, key: f"{header}{comma}<{len(payload):,} characters not stored>"},
    }


@dataclass(frozen=True)
class Exchange:
    """One proxied call's evidence, as the recorder writes (or journals) it."""

    conversation: ConversationRecord
    retrieval: RetrievalRecord
    credentials_holder: str | None = None  # the process whose memory holds the request's key


async def record_exchanges(pool: Pool, exchanges: Sequence[Exchange]) -> None:
    """Write each exchange's rows, its extraction job if one is due, and count the
    memories' use: one transaction and a handful of round trips for the lot.

    Idempotent: an exchange whose conversation row exists is skipped whole, so a
    retried or replayed write never duplicates a row or counts a use twice.
    """
    if not exchanges:
        return
    conversations = [exchange.conversation for exchange in exchanges]
    async with pool.acquire() as connection, connection.transaction():
        # jsonb goes in as text: asyncpg's jsonb codec does not reach array elements.
        inserted = await connection.fetch(
            """
            INSERT INTO conversations (id, user_id, provider, model, messages, reply,
                                       status_code, extraction_status)
            SELECT id, user_id, provider, model, messages::jsonb, reply::jsonb,
                   status_code, extraction_status
            FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[],
                        $6::text[], $7::int[], $8::text[])
                 AS c(id, user_id, provider, model, messages, reply, status_code,
                      extraction_status)
            ON CONFLICT (id) DO NOTHING
            RETURNING id
            """,
            [c.id for c in conversations],
            [c.user_id for c in conversations],
            [c.provider for c in conversations],
            [c.model for c in conversations],
            [json.dumps(storable(c.messages)) for c in conversations],
            [None if c.reply is None else json.dumps(storable(c.reply)) for c in conversations],
            [c.status_code for c in conversations],
            [c.extraction_status for c in conversations],
        )
        new_ids = {row["id"] for row in inserted}
        fresh = [exchange for exchange in exchanges if exchange.conversation.id in new_ids]
        if not fresh:
            return
        await connection.executemany(
            """
            INSERT INTO retrieval_logs (id, user_id, conversation_id, query_text,
                                        query_embedding, memory_ids, scores, timings)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
            """,
            [
                (r.id, r.user_id, r.conversation_id, storable(r.query_text), r.query_embedding,
                 r.memory_ids, r.scores, r.timings)
                for r in (exchange.retrieval for exchange in fresh)
            ],
        )  # fmt: skip
        due = [e for e in fresh if e.conversation.extraction_status == "pending"]
        if due:
            await enqueue_many(
                connection,
                [(e.conversation.user_id, e.conversation.id, e.credentials_holder) for e in due],
            )
        uses = Counter(
            (exchange.retrieval.user_id, memory_id)
            for exchange in fresh
            for memory_id in exchange.retrieval.memory_ids
        )
        if uses:
            # In id order, so two writers touching the same rows lock them alike.
            counted = sorted(uses.items(), key=lambda item: item[0][1])
            await connection.execute(
                """
                UPDATE memories m
                SET access_count = access_count + used.n, last_accessed_at = now()
                FROM unnest($1::uuid[], $2::uuid[], $3::int[]) AS used(user_id, id, n)
                WHERE m.user_id = used.user_id AND m.id = used.id
                """,
                [user_id for (user_id, _), _ in counted],
                [memory_id for (_, memory_id), _ in counted],
                [n for _, n in counted],
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
