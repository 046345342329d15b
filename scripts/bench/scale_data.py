"""The scale benchmark's data: users and clustered synthetic vectors, COPY, the index rebuild."""

from __future__ import annotations

import argparse
import hashlib
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import numpy as np
from pgvector.asyncpg import register_vector

from proxy.db.pool import apply_schema

DIMENSIONS = 384
COPY_BATCH = 20_000
# The indexes schema.sql puts on memories other than those behind its
# constraints (primary key, unique): dropped before the load and rebuilt after it
# by applying schema.sql again, since building an index once is much faster than
# maintaining it row by row during COPY.
_DROPPABLE_INDEXES = """
SELECT i.indexrelid::regclass::text AS name
FROM pg_index i
WHERE i.indrelid = 'memories'::regclass
  AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
ORDER BY 1
"""


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
        dropped = [row["name"] for row in await connection.fetch(_DROPPABLE_INDEXES)]
        for name in dropped:
            await connection.execute(f"DROP INDEX {name}")
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
            "indexes_dropped": dropped,
            "copy_seconds": round(copy_seconds, 1),
            "copy_rows_per_second": round(loaded / copy_seconds),
        }
    finally:
        await connection.close()


def _with_settings(database_url: str, settings: dict[str, str]) -> str:
    """The URL with server settings for the session (asyncpg sends unknown query keys)."""
    parts = urllib.parse.urlsplit(database_url)
    query = urllib.parse.parse_qsl(parts.query) + list(settings.items())
    return parts._replace(query=urllib.parse.urlencode(query)).geturl()


async def rebuild_indexes(database_url: str, work_mem: str, workers: int) -> dict[str, Any]:
    """Apply schema.sql again, which creates the indexes `load` dropped; time and sizes."""
    # Forced: the database records this schema as applied, the dropped indexes aside.
    settings = {
        "maintenance_work_mem": work_mem,
        "max_parallel_maintenance_workers": str(int(workers)),
    }
    started = time.perf_counter()
    await apply_schema(_with_settings(database_url, settings), force=True)
    seconds = time.perf_counter() - started
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute("ANALYZE memories")
        indexes = await connection.fetch(
            """
            SELECT indexrelid::regclass::text AS name, pg_relation_size(indexrelid) AS bytes
            FROM pg_index WHERE indrelid = 'memories'::regclass ORDER BY 1
            """
        )
        sizes = await connection.fetchrow(
            """
            SELECT pg_total_relation_size('memories') AS table_total_bytes,
                   pg_relation_size('memories') AS heap_bytes
            """
        )
        assert sizes is not None
        return {
            "rebuild_seconds": round(seconds, 1),
            "maintenance_work_mem": work_mem,
            "max_parallel_maintenance_workers": workers,
            "index_mb": {row["name"]: round(row["bytes"] / 2**20, 1) for row in indexes},
            "heap_mb": round(sizes["heap_bytes"] / 2**20, 1),
            "table_total_mb": round(sizes["table_total_bytes"] / 2**20, 1),
        }
    finally:
        await connection.close()
