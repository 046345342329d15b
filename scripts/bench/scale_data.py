"""The scale benchmark's data: users and clustered synthetic vectors, COPY, the HNSW build."""

from __future__ import annotations

import argparse
import hashlib
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import numpy as np
from pgvector.asyncpg import register_vector

DIMENSIONS = 384
COPY_BATCH = 20_000
# schema.sql's definition, rebuilt after the load (building once is much faster
# than maintaining the graph row by row during COPY).
INDEX_SQL = (
    "CREATE INDEX memories_embedding_hnsw ON memories USING hnsw (embedding vector_cosine_ops)"
)


@dataclass(frozen=True)
class User:
    id: uuid.UUID
    rows: int
    topics: tuple[int, ...]
    group: str  # "ordinary" | "0.1%" | "1%"


def plan_users(args: argparse.Namespace, rng: np.random.Generator) -> list[User]:
    """How many rows each user owns, and its topics."""
    big = max(1, round(args.memories * 0.001))
    huge = max(1, round(args.memories * 0.01))
    special = [("1%", huge)] * args.huge_users + [("0.1%", big)] * args.big_users
    ordinary_users = args.users - len(special)
    remaining = args.memories - sum(rows for _, rows in special)
    if ordinary_users <= 0 or remaining < ordinary_users:
        raise SystemExit("not enough memories for that many users")
    weights = rng.lognormal(0.0, 1.0, ordinary_users)
    sizes = np.maximum(1, np.floor(weights / weights.sum() * remaining)).astype(int)
    leftover = remaining - int(sizes.sum())  # what rounding (and the minimum of 1) left over
    order = np.argsort(-sizes)
    sizes[order[: max(0, leftover)]] += 1
    for index in order[: max(0, -leftover)]:
        sizes[index] -= 1
    users = [(group, rows) for group, rows in special] + [("ordinary", int(s)) for s in sizes]
    return [
        User(
            uuid.uuid4(),
            rows,
            tuple(int(t) for t in rng.choice(args.topics, args.user_topics, replace=False)),
            group,
        )
        for group, rows in users
    ]


def topic_centres(count: int, rng: np.random.Generator) -> np.ndarray[Any, Any]:
    centres = rng.standard_normal((count, DIMENSIONS)).astype(np.float32)
    return centres / np.linalg.norm(centres, axis=1, keepdims=True)


def near(centres: np.ndarray[Any, Any], spread: float, rng: np.random.Generator) -> Any:
    """Unit vectors around `centres` (one per row); `spread` is the noise's norm."""
    noise = rng.standard_normal(centres.shape).astype(np.float32) * (spread / DIMENSIONS**0.5)
    vectors = centres + noise
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _rows(users: Sequence[User], clustered: bool, rng: np.random.Generator) -> Any:
    """(user, topic) per row, in batches of COPY_BATCH.

    Shuffled by default: a real table grows a few rows per user at a time, so a
    user's rows end up scattered over the heap, and reading them all (the exact
    per-user scan) touches about one page per row. `clustered` loads each user's
    rows together, the best case for that scan.
    """
    owners = np.repeat(np.arange(len(users)), [user.rows for user in users])
    if not clustered:
        rng.shuffle(owners)
    seen = np.zeros(len(users), dtype=np.int64)
    for start in range(0, len(owners), COPY_BATCH):
        batch = []
        for owner in owners[start : start + COPY_BATCH]:
            user = users[owner]
            batch.append((user, user.topics[seen[owner] % len(user.topics)]))
            seen[owner] += 1
        yield batch


async def load(
    database_url: str,
    users: list[User],
    centres: Any,
    spread: float,
    rng: np.random.Generator,
    clustered: bool = False,
) -> dict[str, Any]:
    connection = await asyncpg.connect(database_url)
    try:
        await register_vector(connection)
        await connection.execute("DROP INDEX IF EXISTS memories_embedding_hnsw")
        await connection.copy_records_to_table(
            "users",
            records=[(u.id, f"scale-{u.id}@example.com") for u in users],
            columns=["id", "email"],
        )
        started, loaded = time.perf_counter(), 0
        for batch in _rows(users, clustered, rng):
            vectors = near(centres[[topic for _, topic in batch]], spread, rng)
            records = []
            for offset, ((user, _), vector) in enumerate(zip(batch, vectors, strict=True)):
                content = f"synthetic memory {loaded + offset} of {user.id}"
                digest = hashlib.sha256(content.encode()).hexdigest()
                records.append((user.id, content, digest, vector))
            await connection.copy_records_to_table(
                "memories",
                records=records,
                columns=["user_id", "content", "content_hash", "embedding"],
            )
            loaded += len(records)
            print(f"  loaded {loaded} rows ({time.perf_counter() - started:.0f}s)", flush=True)
        copy_seconds = time.perf_counter() - started
        # What autovacuum does after a burst of inserts: sets the visibility map
        # that index-only scans (memories_user_vectors) depend on.
        await connection.execute("VACUUM (ANALYZE) memories")
        return {
            "rows": loaded,
            "copy_seconds": round(copy_seconds, 1),
            "copy_rows_per_second": round(loaded / copy_seconds),
        }
    finally:
        await connection.close()


async def build_index(database_url: str, work_mem: str, workers: int) -> dict[str, Any]:
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(f"SET maintenance_work_mem = '{work_mem}'")
        await connection.execute(f"SET max_parallel_maintenance_workers = {int(workers)}")
        started = time.perf_counter()
        await connection.execute(INDEX_SQL)
        seconds = time.perf_counter() - started
        await connection.execute("ANALYZE memories")
        sizes = await connection.fetchrow(
            """
            SELECT pg_relation_size('memories_embedding_hnsw') AS index_bytes,
                   pg_relation_size('memories_user_vectors') AS user_vectors_bytes,
                   pg_total_relation_size('memories') AS table_total_bytes,
                   pg_relation_size('memories') AS heap_bytes
            """
        )
        assert sizes is not None
        return {
            "build_seconds": round(seconds, 1),
            "maintenance_work_mem": work_mem,
            "max_parallel_maintenance_workers": workers,
            "index_mb": round(sizes["index_bytes"] / 2**20, 1),
            "user_vectors_index_mb": round(sizes["user_vectors_bytes"] / 2**20, 1),
            "heap_mb": round(sizes["heap_bytes"] / 2**20, 1),
            "table_total_mb": round(sizes["table_total_bytes"] / 2**20, 1),
        }
    finally:
        await connection.close()
