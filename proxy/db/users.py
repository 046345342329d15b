"""SQL for users and their API keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg

from proxy.db.pool import Pool


@dataclass(frozen=True)
class UserSettings:
    max_memories_injected: int = 5
    retrieval_threshold: float = 0.0
    dedup_threshold: float = 0.9


@dataclass(frozen=True)
class KeyRecord:
    """A key's row joined with what a request needs of its user."""

    key_id: str
    user_id: UUID
    secret_hash: str
    revoked: bool
    settings: UserSettings


class EmailTaken(Exception):
    pass


async def create_user_with_key(
    pool: Pool, email: str, key_id: str, secret_hash: str, key_name: str = "default"
) -> UUID:
    """A new user and their first key, together or not at all."""
    async with pool.acquire() as connection, connection.transaction():
        try:
            user_id: UUID = await connection.fetchval(
                "INSERT INTO users (email) VALUES ($1) RETURNING id", email
            )
        except asyncpg.UniqueViolationError:
            raise EmailTaken(email) from None
        await connection.execute(
            "INSERT INTO api_keys (key_id, user_id, name, secret_hash) VALUES ($1, $2, $3, $4)",
            key_id,
            user_id,
            key_name,
            secret_hash,
        )
    return user_id


async def fetch_key(pool: Pool, key_id: str) -> KeyRecord | None:
    """The key and its user's settings, noting the use (runs once per key per cache TTL)."""
    row = await pool.fetchrow(
        """
        UPDATE api_keys k SET last_used_at = now()
        FROM users u
        WHERE k.key_id = $1 AND u.id = k.user_id
        RETURNING k.key_id, k.user_id, k.secret_hash, k.revoked_at IS NOT NULL AS revoked,
                  u.max_memories_injected, u.retrieval_threshold, u.dedup_threshold
        """,
        key_id,
    )
    if row is None:
        return None
    settings = UserSettings(
        row["max_memories_injected"], row["retrieval_threshold"], row["dedup_threshold"]
    )
    return KeyRecord(row["key_id"], row["user_id"], row["secret_hash"], row["revoked"], settings)


async def add_key(pool: Pool, user_id: UUID, key_id: str, secret_hash: str, name: str) -> None:
    await pool.execute(
        "INSERT INTO api_keys (key_id, user_id, name, secret_hash) VALUES ($1, $2, $3, $4)",
        key_id,
        user_id,
        name,
        secret_hash,
    )


async def list_keys(pool: Pool, user_id: UUID) -> list[dict[str, Any]]:
    """The user's keys without their hashes, newest first."""
    rows = await pool.fetch(
        """
        SELECT key_id, name, created_at, last_used_at, revoked_at FROM api_keys
        WHERE user_id = $1 ORDER BY created_at DESC
        """,
        user_id,
    )
    return [dict(row) for row in rows]


async def revoke_key(pool: Pool, user_id: UUID, key_id: str) -> bool:
    """Revoke one of the user's keys; False when the user has no such key."""
    revoked = await pool.fetchval(
        """
        UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now())
        WHERE user_id = $1 AND key_id = $2 RETURNING true
        """,
        user_id,
        key_id,
    )
    return bool(revoked)
