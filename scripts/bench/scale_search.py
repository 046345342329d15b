"""Per-user search as Engram runs it, against an exact answer read from the table."""

from __future__ import annotations

import argparse
import json
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
from pgvector.asyncpg import register_vector

from proxy.db import memories as memory_sql
from proxy.db.pool import create_pool
from scripts.bench import stats
from scripts.bench.scale_data import User, near


@dataclass(frozen=True)
class Query:
    user: User
    vector: Any
    on_topic: bool  # near one of the user's own topics, or about something it has no memory of


def queries(users: list[User], args: argparse.Namespace, centres: Any, rng: Any) -> list[Query]:
    """`--queries-per-user` for a sample of ordinary users, four times that for the big ones.

    A share of them (`--off-topic`) lie near a topic the user owns no memory of:
    its nearest rows are then far away, among other users' rows, which is where
    a filtered graph walk (the HNSW index Engram had) went furthest.
    """
    ordinary = [u for u in users if u.group == "ordinary"]
    pick = random.Random(args.seed)
    chosen = pick.sample(ordinary, min(args.sample_users, len(ordinary)))
    chosen += [u for u in users if u.group != "ordinary"]
    result = []
    for user in chosen:
        count = args.queries_per_user * (1 if user.group == "ordinary" else 4)
        others = [t for t in range(len(centres)) if t not in user.topics]
        for index in range(count):
            on_topic = pick.random() >= args.off_topic or not others
            topic = user.topics[index % len(user.topics)] if on_topic else pick.choice(others)
            [vector] = near(centres[[topic]], args.spread, rng)
            result.append(Query(user, vector, on_topic))
    pick.shuffle(result)
    return result


async def _types(connection: asyncpg.Connection) -> None:
    """The codecs proxy/db/pool.py registers, so memory_sql.search reads rows the same way."""
    await register_vector(connection)
    await connection.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
    )


async def exact_connection(database_url: str) -> asyncpg.Connection:
    """A connection that reads rows from the table only: no index or index-only scan."""
    connection = await asyncpg.connect(
        database_url, server_settings={"enable_indexscan": "off", "enable_indexonlyscan": "off"}
    )
    await _types(connection)
    return connection


SHIPPED = "engram pool"
HYBRID = "engram pool, hybrid"
HYBRID_COMMON = "engram pool, hybrid, words every memory holds"
EXACT = "exact (from the table)"
# Hybrid's query text: words no row holds, so the lexical half is empty and the
# fused order is the vector order, which the exact answer checks.
HYBRID_TEXT = "what do you remember about this?"
# The worst case of the word half: every memory holds both words ("synthetic
# memory N of <user>"), so every row of a user of up to WORD_READS memories is
# read for its words (a bigger user's, none). Word matches reorder what the
# vectors found, so no recall is reported for it.
COMMON_TEXT = "which synthetic memory was it?"
# The reference, independent of Engram's SQL and of memories_user_vectors: on
# exact_connection it can only rank every active row of the user, read from the
# table, by the `<=>` operator.
EXACT_SEARCH = """
SELECT id, content, score, metadata, occurred_at, created_at FROM (
    SELECT id, content, 1 - (embedding <=> $2) AS score, metadata, occurred_at, created_at
    FROM memories
    WHERE user_id = $1 AND superseded_by IS NULL
    ORDER BY embedding <=> $2
    LIMIT $3
) nearest
WHERE score >= $4
ORDER BY score DESC
"""


# Engram's search on pools whose connections start with other settings
# (asyncpg's RESET ALL returns to them).
EXPERIMENTS = {
    # Engram's exact search read from the table (a bitmap scan of the user's rows,
    # what the plan cache ended up with before) instead of the covering index.
    "exact from the table (no index-only scan)": {"enable_indexonlyscan": "off"},
}


async def experiment_pool(database_url: str, settings: dict[str, str]) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        database_url, min_size=2, max_size=10, init=_types, server_settings=settings
    )
    assert pool is not None
    return pool


def scans(plan: list[str]) -> list[str]:
    """The scan nodes of a plan: which index answered, or the table."""
    return [line.strip().removeprefix("->  ") for line in plan if "Scan" in line and "(" in line]


async def plans_for(database_url: str, query: Query, limit: int, threshold: float) -> Any:
    """The scans each set-up runs for this user's search, executed for real.

    Engram's statements are prepared (asyncpg caches them per connection), so after
    five executions PostgreSQL may switch a connection to one generic plan for all
    users. EXPLAIN EXECUTE of a prepared statement shows either plan.
    """
    connection = await asyncpg.connect(database_url)
    try:
        await _types(connection)
        # EXECUTE takes no bind parameters: the values are spelled out (all our own).
        vector = "[" + ",".join(f"{x:.7g}" for x in query.vector) + "]"
        arguments = f"'{query.user.id}', '{vector}', {int(limit)}, {float(threshold)}"
        setups = {
            f"{SHIPPED} (generic plan)": {"plan_cache_mode": "force_generic_plan"},
            f"{SHIPPED} (custom plan)": {"plan_cache_mode": "force_custom_plan"},
            **EXPERIMENTS,
        }
        plans: dict[str, Any] = {"user_rows": query.user.rows}
        for index, (name, settings) in enumerate(setups.items()):
            await connection.execute(f"PREPARE bench_search_{index} AS {memory_sql._SEARCH}")
            for setting, value in settings.items():
                await connection.execute(f"SET {setting} = '{value}'")
            explain = f"EXPLAIN (ANALYZE, COSTS OFF) EXECUTE bench_search_{index}({arguments})"
            plans[name] = scans([row[0] for row in await connection.fetch(explain)])
            await connection.execute("RESET ALL")
        return plans
    finally:
        await connection.close()


async def _timed(
    searcher: Any,
    qs: list[Query],
    limit: int,
    threshold: float,
    sql: str | None = None,
    text: str | None = None,
) -> list[tuple[float, set[uuid.UUID]]]:
    """Each query through Engram's search (hybrid with `text`), or through `sql`."""
    answers = []
    for query in qs:
        started = time.perf_counter()
        if sql is None:
            hits = await memory_sql.search(
                searcher, query.user.id, query.vector, limit, threshold, text
            )
            found = {hit.id for hit in hits}
        else:
            rows = await searcher.fetch(sql, query.user.id, query.vector, limit, threshold)
            found = {row["id"] for row in rows}
        answers.append(((time.perf_counter() - started) * 1000, found))
    return answers


async def measure_search(
    database_url: str, qs: list[Query], limit: int, threshold: float, warmup: int
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Each query exactly, through Engram's pool, and through the experiments; one at a time."""
    exact = await exact_connection(database_url)
    try:
        await _timed(exact, qs[:warmup], limit, threshold, EXACT_SEARCH)
        truth = await _timed(exact, qs, limit, threshold, EXACT_SEARCH)
    finally:
        await exact.close()
    samples = {EXACT: [_sample(q, ms, got, got) for q, (ms, got) in zip(qs, truth, strict=True)]}
    # (open the pool, hybrid text): Engram's pool twice (vector, hybrid), then experiments.
    runs: dict[str, tuple[Any, str | None]] = {
        SHIPPED: (lambda: create_pool(database_url), None),
        HYBRID: (lambda: create_pool(database_url), HYBRID_TEXT),
        HYBRID_COMMON: (lambda: create_pool(database_url), COMMON_TEXT),
    }
    for name, settings in EXPERIMENTS.items():
        runs[name] = (lambda settings=settings: experiment_pool(database_url, settings), None)
    for name, (open_pool, text) in runs.items():
        pool = await open_pool()
        try:
            # Statements get prepared on each connection, and pages cached.
            await _timed(pool, qs[:warmup], limit, threshold, text=text)
            answers = await _timed(pool, qs, limit, threshold, text=text)
        finally:
            await pool.close()
        samples[name] = [
            _sample(q, ms, got, None if text == COMMON_TEXT else want)
            for q, (ms, got), (_, want) in zip(qs, answers, truth, strict=True)
        ]
    plans: dict[str, Any] = {}
    for group in sorted({q.user.group for q in qs}):
        sample = next(q for q in qs if q.user.group == group)
        plans[group] = await plans_for(database_url, sample, limit, threshold)
    return samples, plans


def _sample(
    query: Query, ms: float, got: set[uuid.UUID], want: set[uuid.UUID] | None
) -> dict[str, Any]:
    """One query's latency; and its recall, unless there is no right answer to check."""
    sample = {
        "group": query.user.group,
        "on_topic": query.on_topic,
        "user_rows": query.user.rows,
        "ms": round(ms, 3),
        "recall": None,
        "short": False,
    }
    if want is not None:
        sample["recall"] = len(got & want) / len(want) if want else 1.0
        sample["short"] = len(got) < len(want)
    return sample


def search_groups(measured: list[dict[str, Any]]) -> dict[str, Any]:
    groups: dict[str, Any] = {}
    kinds = {"all": lambda m: True, "off-topic queries": lambda m: not m["on_topic"]}
    for name in sorted({m["group"] for m in measured}):
        kinds[name] = lambda m, name=name: m["group"] == name
    for name, belongs in kinds.items():
        rows = [m for m in measured if belongs(m)]
        if not rows:
            continue
        recalls = [m["recall"] for m in rows if m["recall"] is not None]  # none: not checked
        groups[name] = {
            "queries": len(rows),
            "user_rows": stats.summary(m["user_rows"] for m in rows),
            "latency_ms": stats.summary(m["ms"] for m in rows),
            "recall_mean": round(sum(recalls) / len(recalls), 4) if recalls else None,
            "recall_min": round(min(recalls), 4) if recalls else None,
            "short_results": sum(m["short"] for m in rows),
        }
    return groups
