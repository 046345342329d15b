"""Query text → vector → this user's most relevant memories."""

from __future__ import annotations

import time
from dataclasses import dataclass
from uuid import UUID

from providers.types import ChatMessage
from proxy.db import memories as memory_sql
from proxy.db.memories import MemoryHit
from proxy.db.pool import Pool
from proxy.db.users import UserSettings
from proxy.embeddings import Embedder, Vector

# The model reads at most a few hundred tokens; keep the part that matters.
_MAX_USER_CHARS = 1500
_MAX_ASSISTANT_CHARS = 500


def message_text(message: ChatMessage) -> str:
    """The text of a message whose content is a string or a list of parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part.get("text") for part in content if isinstance(part, dict)]
        return "\n".join(text for text in texts if isinstance(text, str))
    return ""


def query_text(messages: list[ChatMessage]) -> str:
    """The latest user turn, then the assistant turn just before it, trimmed."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") != "user":
            continue
        user = message_text(messages[index]).strip()[:_MAX_USER_CHARS]
        previous = messages[index - 1] if index > 0 else None
        if previous is not None and previous.get("role") == "assistant":
            assistant = message_text(previous).strip()[-_MAX_ASSISTANT_CHARS:]
            return f"{user}\n{assistant}".strip() if assistant else user
        return user
    return ""


@dataclass(frozen=True)
class Retrieval:
    query_text: str
    embedding: Vector | None
    hits: list[MemoryHit]
    embed_ms: float = 0.0
    retrieve_ms: float = 0.0

    @property
    def memory_ids(self) -> list[UUID]:
        return [hit.id for hit in self.hits]

    @property
    def scores(self) -> list[float]:
        return [hit.score for hit in self.hits]


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


async def retrieve(
    embedder: Embedder,
    pool: Pool,
    user_id: UUID,
    settings: UserSettings,
    messages: list[ChatMessage],
    hybrid: bool = True,
) -> Retrieval:
    """The memories to inject for this conversation, best first."""
    text = query_text(messages)
    if not text or settings.max_memories_injected == 0:
        return Retrieval(text, None, [])
    start = time.perf_counter()
    embedding = await embedder.embed(text)
    embed_ms = _ms_since(start)
    start = time.perf_counter()
    hits = await memory_sql.search(
        pool,
        user_id,
        embedding,
        settings.max_memories_injected,
        settings.retrieval_threshold,
        text if hybrid else None,
    )
    return Retrieval(text, embedding, hits, embed_ms, _ms_since(start))
