"""Per-user vector search against the real database: exact, whichever plan PostgreSQL picks."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from proxy.db import memories as memory_sql
from proxy.db.pool import Pool, create_pool

pytestmark = pytest.mark.anyio

ROWS = 3000  # most of the test database: a custom plan would walk the HNSW graph for it
LIMIT = 10


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[Pool]:
    pool = await create_pool(database_url, min_size=1, max_size=1)  # one connection: one plan cache
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def big_user(pool: Pool) -> AsyncIterator[tuple[uuid.UUID, Any]]:
    """A user owning ROWS random memories, the table analysed; deleted afterwards."""
    user_id = await pool.fetchval(
        "INSERT INTO users (email) VALUES ($1) RETURNING id", f"{uuid.uuid4().hex}@example.com"
    )
    vectors = np.random.default_rng(5).standard_normal((ROWS, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    records = [
        (user_id, f"memory {n}", hashlib.sha256(f"memory {n}".encode()).hexdigest(), vector)
        for n, vector in enumerate(vectors)
    ]
    async with pool.acquire() as connection:
        await connection.copy_records_to_table(
            "memories", records=records, columns=["user_id", "content", "content_hash", "embedding"]
        )
        await connection.execute("VACUUM (ANALYZE) memories")
    ids = await pool.fetch("SELECT id, content FROM memories WHERE user_id = $1", user_id)
    by_content = {row["content"]: row["id"] for row in ids}
    order = [by_content[f"memory {n}"] for n in range(ROWS)]
    try:
        yield user_id, (vectors, order)
    finally:
        await pool.execute("DELETE FROM users WHERE id = $1", user_id)


async def test_search_returns_the_true_nearest_rows_through_custom_and_generic_plans(
    pool: Pool, big_user: tuple[uuid.UUID, Any]
) -> None:
    user_id, (vectors, order) = big_user
    queries = np.random.default_rng(6).standard_normal((8, 384)).astype(np.float32)
    # Past the fifth execution of the prepared statement PostgreSQL may switch to
    # its generic plan: both kinds must rank every row of the user.
    for query in queries:
        query /= np.linalg.norm(query)
        nearest = np.argsort(-(vectors @ query))[:LIMIT]
        expected = [order[n] for n in nearest]
        hits = await memory_sql.search(pool, user_id, query, LIMIT, 0.0)
        assert [hit.id for hit in hits] == expected
        hybrid = await memory_sql.search(pool, user_id, query, LIMIT, 0.0, "zzyzx")
        assert [hit.id for hit in hybrid] == expected  # no word matches: the vector order


@pytest.mark.parametrize("plan", ["force_custom_plan", "force_generic_plan"])
async def test_no_plan_of_the_search_walks_the_hnsw_graph(
    pool: Pool, big_user: tuple[uuid.UUID, Any], plan: str
) -> None:
    user_id, (vectors, _) = big_user
    async with pool.acquire() as connection, connection.transaction():
        await connection.execute(f"SET LOCAL plan_cache_mode = {plan}")
        await connection.execute(f"PREPARE engram_search AS {memory_sql._SEARCH}")
        literal = "[" + ",".join(f"{x:.7g}" for x in vectors[0]) + "]"
        rows = await connection.fetch(
            f"EXPLAIN EXECUTE engram_search('{user_id}', '{literal}', {LIMIT}, 0)"
        )
        await connection.execute("DEALLOCATE engram_search")
    plan_text = "\n".join(row[0] for row in rows)
    # Here the user owns most of the table, so the planner may read it whole; at
    # scale it reads memories_user_vectors (scripts/bench_scale records the plans).
    assert "memories_embedding_hnsw" not in plan_text
