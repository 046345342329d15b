"""Request credentials held in memory only, for the extraction job of that request.

With no server-side extraction model, a job uses the model and provider key
of the request that produced its exchange. The key lives here, in this
process, for a bounded time, and is never written anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from uuid import UUID

from cachetools import TTLCache


@dataclass(frozen=True)
class RequestCredentials:
    provider: str
    model: str
    api_key: str | None = field(default=None, repr=False)


class CredentialVault:
    def __init__(self, ttl: float, max_size: int = 10_000) -> None:
        self.ttl = ttl
        self._held: TTLCache[UUID, RequestCredentials] = TTLCache(maxsize=max_size, ttl=ttl)

    def put(self, conversation_id: UUID, credentials: RequestCredentials) -> None:
        self._held[conversation_id] = credentials

    def get(self, conversation_id: UUID) -> RequestCredentials | None:
        return self._held.get(conversation_id)

    def discard(self, conversation_id: UUID) -> None:
        self._held.pop(conversation_id, None)
