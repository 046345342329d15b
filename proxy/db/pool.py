"""The asyncpg pool, the schema applied at start-up, and the embedding-model guard."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from pgvector.asyncpg import register_vector

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schema.sql"
# Serialises schema application when several Engram processes start together.
_SCHEMA_LOCK_ID = 0x656E6772  # "engr"
# Tries at applying it when PostgreSQL picks it to break a deadlock.
SCHEMA_ATTEMPTS = 5
# engram_meta's key for the sha256 of the schema.sql last applied.
_SCHEMA_DIGEST_KEY = "schema_sha256"

CONNECT_TIMEOUT_SECONDS = 2.0

Pool: TypeAlias = asyncpg.Pool
# What SQL functions take: a bare connection or one borrowed from the pool.
Connection: TypeAlias = asyncpg.Connection | PoolConnectionProxy
Record: TypeAlias = asyncpg.Record


class ModelMismatchError(RuntimeError):
    """The database's vectors were made by another embedding model than the configured one."""


def is_outage(error: BaseException) -> bool:
    """True when `error` means the database could not be reached, not that it said no."""
    return isinstance(
        error,
        OSError
        | TimeoutError
        | asyncpg.PostgresConnectionError
        | asyncpg.InterfaceError
        # Shutting down, starting up, crashed, or a statement cancelled on timeout.
        | asyncpg.exceptions.OperatorInterventionError,
    )


async def _init_connection(connection: asyncpg.Connection) -> None:
    await register_vector(connection)
    await connection.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
    )


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Release without asyncpg's default reset, a round trip (RESET ALL, UNLISTEN *,
    CLOSE ALL, advisory unlocks) after every query.

    Engram leaves no session state behind: no SET (SET LOCAL ends with its
    transaction), no LISTEN, no cursors held, only transaction-scoped advisory
    locks. asyncpg still rolls back a transaction left open before calling this.
    """


async def create_pool(
    dsn: str, *, min_size: int = 2, max_size: int = 10, statement_cache_size: int = 100
) -> Pool:
    """A pool whose connections know the vector and jsonb types.

    `statement_cache_size=0` turns asyncpg's prepared-statement cache off, which
    PgBouncer in transaction mode needs (before PgBouncer 1.21).
    """
    await apply_schema(dsn)
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        timeout=CONNECT_TIMEOUT_SECONDS,  # a database that is away must fail fast
        statement_cache_size=statement_cache_size,
        reset=_keep_session,
    )
    assert pool is not None
    return pool


async def apply_schema(dsn: str, *, force: bool = False) -> None:
    """Run schema.sql unless the database already has this very text of it (or `force`).

    Every statement in it is idempotent, but several lock their table even when
    there is nothing to do (`ALTER TABLE ... ADD COLUMN IF NOT EXISTS` takes an
    ACCESS EXCLUSIVE lock, which queues every read of memories behind it and
    behind whatever query it waits for). So the text's sha256 is recorded in
    engram_meta, and a start on an unchanged schema only reads it.

    The `CREATE INDEX IF NOT EXISTS` statements lock their tables one after
    another, so a running process's transaction that takes two of those tables
    in the other order (the extraction worker: a job, then memories) can
    deadlock with it. PostgreSQL then aborts one side; when it is this one, the
    whole schema is tried again, after the other side has gone on.
    """
    schema = SCHEMA_PATH.read_text()
    digest = hashlib.sha256(schema.encode()).hexdigest()
    connection = await asyncpg.connect(dsn)
    try:
        if not force and await _applied_schema(connection) == digest:
            return
        for attempt in range(1, SCHEMA_ATTEMPTS + 1):
            try:
                async with connection.transaction():
                    await connection.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK_ID)
                    if not force and await _applied_schema(connection) == digest:
                        return  # another process applied it while this one waited
                    await connection.execute(schema)
                    await connection.execute(
                        "INSERT INTO engram_meta (key, value) VALUES ($1, $2) "
                        "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                        _SCHEMA_DIGEST_KEY,
                        digest,
                    )
                return
            except asyncpg.DeadlockDetectedError:
                if attempt == SCHEMA_ATTEMPTS:
                    raise
            await asyncio.sleep(0.1 * attempt)
    finally:
        await connection.close()


async def _applied_schema(connection: asyncpg.Connection) -> str | None:
    """The sha256 of the schema.sql last applied to this database, if any."""
    if await connection.fetchval("SELECT to_regclass('engram_meta')") is None:
        return None
    digest: str | None = await connection.fetchval(
        "SELECT value FROM engram_meta WHERE key = $1", _SCHEMA_DIGEST_KEY
    )
    return digest


async def claim_embedding_model(pool: Pool, model_name: str) -> None:
    """Record the embedding model on first start; refuse to start under another one."""
    stored: Any = await pool.fetchval(
        """
        WITH claimed AS (
            INSERT INTO engram_meta (key, value) VALUES ('embedding_model', $1)
            ON CONFLICT (key) DO NOTHING
            RETURNING value
        )
        SELECT value FROM claimed
        UNION ALL
        SELECT value FROM engram_meta WHERE key = 'embedding_model'
        LIMIT 1
        """,
        model_name,
    )
    if stored != model_name:
        raise ModelMismatchError(
            f"this database's memories were embedded with {stored!r}, but Engram is "
            f"configured for {model_name!r} (ENGRAM_EMBEDDING_MODEL). Vectors of two models "
            f"cannot be compared: start with ENGRAM_EMBEDDING_MODEL={stored} or use another "
            f"database."
        )
