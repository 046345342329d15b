"""The pool and the schema against the real database."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import anyio
import asyncpg
import pytest

from proxy.db.pool import ModelMismatchError, apply_schema, claim_embedding_model, create_pool
from tests.conftest import Engram, scratch_database

pytestmark = pytest.mark.anyio


async def test_a_released_connection_costs_no_reset_round_trip(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    statements: list[str] = []
    original = asyncpg.Connection.execute

    async def recording(self: asyncpg.Connection, query: str, *args: object, **kw: object) -> str:
        statements.append(query)
        return await original(self, query, *args, **kw)  # type: ignore[arg-type]

    pool = await create_pool(database_url, min_size=1, max_size=1)
    try:
        monkeypatch.setattr(asyncpg.Connection, "execute", recording)
        for _ in range(3):
            assert await pool.fetchval("SELECT 1") == 1
        async with pool.acquire() as connection, connection.transaction():
            await connection.fetchval("SELECT 2")
        assert not any("RESET" in statement for statement in statements), statements
        # A transaction still ends when its connection goes back, even unfinished.
        connection = await pool.acquire()
        await connection.execute("BEGIN")
        await pool.release(connection)
        async with pool.acquire() as again:
            assert not again.is_in_transaction()
        assert "ROLLBACK" in statements
    finally:
        await pool.close()


async def test_the_schema_applies_again_without_change(database_url: str) -> None:
    await apply_schema(database_url)
    await apply_schema(database_url, force=True)
    await apply_schema(database_url)


@pytest.fixture
async def scratch(database_url: str) -> AsyncIterator[tuple[str, asyncpg.Connection]]:
    """A database of its own with the schema, and a connection to it."""
    async with scratch_database(database_url) as url:
        connection = await asyncpg.connect(url)
        try:
            yield url, connection
        finally:
            await connection.close()


async def as_an_earlier_version_left_it(connection: asyncpg.Connection, sql: str) -> None:
    """Run `sql`, standing for an earlier schema.sql; those recorded no digest of it."""
    await connection.execute(sql)
    await connection.execute("DELETE FROM engram_meta WHERE key = 'schema_sha256'")


async def index_names(connection: asyncpg.Connection) -> set[str]:
    return {row["indexname"] for row in await connection.fetch("SELECT indexname FROM pg_indexes")}


async def a_user_with_one_memory(connection: asyncpg.Connection, content: str) -> uuid.UUID:
    user_id: uuid.UUID = await connection.fetchval(
        "INSERT INTO users (email) VALUES ($1) RETURNING id", f"{uuid.uuid4().hex}@example.com"
    )
    await connection.execute(
        "INSERT INTO memories (user_id, content, content_hash, embedding) "
        "VALUES ($1, $2, 'h', array_fill(0.1::real, ARRAY[384])::vector)",
        user_id,
        content,
    )
    return user_id


async def test_the_schema_drops_the_hnsw_index_of_earlier_versions(
    scratch: tuple[str, asyncpg.Connection],
) -> None:
    url, connection = scratch
    # What schema.sql created before per-user search became exact.
    await as_an_earlier_version_left_it(
        connection,
        "CREATE INDEX memories_embedding_hnsw ON memories USING hnsw (embedding vector_cosine_ops)",
    )
    await apply_schema(url)
    names = await index_names(connection)
    assert "memories_user_half_vectors" in names
    assert not any("hnsw" in name for name in names), names


async def test_the_schema_moves_earlier_versions_to_per_user_word_keys(
    scratch: tuple[str, asyncpg.Connection],
) -> None:
    url, connection = scratch
    # What schema.sql created before hybrid search's words had per-user keys.
    await as_an_earlier_version_left_it(
        connection,
        "DROP INDEX memories_user_words; DROP FUNCTION memory_words;"
        "CREATE INDEX memories_content_tsv ON memories USING gin (content_tsv)",
    )
    user_id = await a_user_with_one_memory(connection, "The user keeps bees.")
    await apply_schema(url)
    indexes = await index_names(connection)
    keys = await connection.fetchval(
        "SELECT memory_words(user_id, content_tsv) FROM memories WHERE user_id = $1", user_id
    )
    assert "memories_user_words" in indexes
    assert "memories_content_tsv" not in indexes
    assert sorted(keys) == [f"{user_id} bee", f"{user_id} keep", f"{user_id} user"]


async def test_the_schema_gives_the_memories_of_earlier_versions_half_precision_vectors(
    scratch: tuple[str, asyncpg.Connection],
) -> None:
    url, connection = scratch
    # What schema.sql created before vector search scanned half-precision copies.
    await as_an_earlier_version_left_it(
        connection,
        "DROP INDEX memories_user_half_vectors; ALTER TABLE memories DROP COLUMN embedding_half;"
        "CREATE INDEX memories_user_vectors ON memories (user_id) INCLUDE (id, embedding) "
        "WHERE superseded_by IS NULL",
    )
    user_id = await a_user_with_one_memory(connection, "The user keeps bees.")
    await apply_schema(url)
    indexes = await index_names(connection)
    half = await connection.fetchval(
        "SELECT embedding_half::real[] FROM memories WHERE user_id = $1", user_id
    )
    assert "memories_user_half_vectors" in indexes
    assert "memories_user_vectors" not in indexes
    assert half == [pytest.approx(0.1, abs=1e-4)] * 384  # 0.0999756 in half precision


async def test_the_word_index_keeps_no_pending_list(
    scratch: tuple[str, asyncpg.Connection],
) -> None:
    _, connection = scratch
    await a_user_with_one_memory(connection, "Maya booked a pottery class")
    options = await connection.fetchval(
        "SELECT reloptions FROM pg_class WHERE oid = 'memories_user_words'::regclass"
    )
    # Pages of new entries waiting to be merged: none, they went into the index.
    pending = await connection.fetchval("SELECT gin_clean_pending_list('memories_user_words')")
    assert options == ["fastupdate=off"]
    assert pending == 0


async def test_the_schema_is_applied_again_when_chosen_to_break_a_deadlock(
    scratch: tuple[str, asyncpg.Connection],
) -> None:
    url, worker = scratch
    await as_an_earlier_version_left_it(worker, "SELECT 1")  # so it has the schema to apply
    transaction = worker.transaction()
    await transaction.start()
    # As the extraction worker's transaction does: a job first, ...
    await worker.execute("LOCK TABLE memory_jobs IN ROW EXCLUSIVE MODE")
    applying = asyncio.create_task(apply_schema(url))
    await asyncio.sleep(0.5)  # it has locked memories and waits for memory_jobs
    # ... then memories. PostgreSQL aborts the side that waited longest.
    await worker.execute("LOCK TABLE memories IN ROW EXCLUSIVE MODE")
    await transaction.commit()
    await asyncio.wait_for(applying, 30)


async def test_an_unchanged_schema_is_not_applied_again(
    scratch: tuple[str, asyncpg.Connection],
) -> None:
    url, other = scratch
    # A long query on memories: an ALTER TABLE would queue behind it, and every
    # read of memories behind that.
    transaction = other.transaction()
    await transaction.start()
    await other.execute("LOCK TABLE memories IN ACCESS SHARE MODE")
    try:
        with anyio.fail_after(5):
            await apply_schema(url)
        locked = await other.fetchval(
            "SELECT count(*) FROM pg_locks WHERE relation = 'memories'::regclass AND NOT granted"
        )
        assert locked == 0
        applying = asyncio.create_task(apply_schema(url, force=True))
        await asyncio.sleep(0.5)
        assert not applying.done()  # a changed schema does wait for it
    finally:
        await transaction.rollback()
    await asyncio.wait_for(applying, 30)


async def test_another_embedding_model_is_refused_naming_both(
    database_url: str, engram: Engram
) -> None:
    pool = await create_pool(database_url, min_size=1, max_size=1)  # engram claimed its model
    try:
        stored = await pool.fetchval("SELECT value FROM engram_meta WHERE key = 'embedding_model'")
        await claim_embedding_model(pool, stored)  # the same model: fine
        with pytest.raises(ModelMismatchError) as refused:
            await claim_embedding_model(pool, "BAAI/bge-small-en-v1.5")
        assert stored in str(refused.value)
        assert "BAAI/bge-small-en-v1.5" in str(refused.value)
    finally:
        await pool.close()
