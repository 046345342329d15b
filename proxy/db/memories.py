"""SQL for memories: nearest-neighbour search and capture with de-duplication."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import numpy as np

from proxy.db.pool import Connection, Pool, Record


@dataclass(frozen=True)
class MemoryHit:
    id: UUID
    content: str
    score: float
    metadata: dict[str, Any]
    occurred_at: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class NewMemory:
    content: str
    content_hash: str
    embedding: np.ndarray[Any, Any]
    metadata: dict[str, Any]
    occurred_at: datetime | None = None
    kind: str = "other"
    confidence: float = 1.0
    source_conversation_id: UUID | None = None


@dataclass(frozen=True)
class CaptureResult:
    id: UUID
    status: str  # "stored" | "merged"
    similarity: float | None = None


# Per-user vector search is exact on purpose: the user's rows come from the
# covering index `memories_user_half_vectors` (one index-only range scan, no
# heap page per row) and are ranked by their true distance. The distance is
# spelled as the function `cosine_distance`, not the operator `<=>`: a vector
# index (schema.sql has none since it dropped the HNSW one) can only serve an
# ORDER BY of the operator, so no plan could turn this into a filtered graph
# walk, which at a million rows returned a big user's nearest rows only about
# half the time (scripts/BENCHMARKS.md section 3).
#
# The scan reads each vector's half-precision copy (half the bytes), and the
# nearest `count + HALF_PRECISION_MARGIN` by it are ranked again by their
# embeddings, so order and scores are those of the full vectors. Half precision
# moves a distance by about 1e-4: only memories that close to the last one
# kept could trade places, and the margin takes them in. The query vector is
# made half once, in a subquery; cast in the ORDER BY, it was cast again for
# every row (a quarter of the scan). It is typed vector before it is made half:
# a parameter takes the type of the first cast PostgreSQL reads, and as halfvec
# every distance in the statement would have been a half-precision one.
#
# Counts are read through subqueries so that no plan is made for their value:
# for a user owning the whole table, plans made for them looked cheaper than
# the generic one, and PostgreSQL planned every call again (600 custom plans of
# 600).
HALF_PRECISION_MARGIN = 10


def _nearest(count: str, also: str = "") -> str:
    """SQL rows (id, distance): the user $1's active memories nearest the vector
    $2, `count` of them (SQL) and HALF_PRECISION_MARGIN more, `also` (SQL) true."""
    # Composed of this module's constants only, never of a value from a request.
    return f"""
    SELECT m.id, cosine_distance(m.embedding, $2) AS distance
    FROM (
        SELECT id FROM memories
        WHERE user_id = $1 AND superseded_by IS NULL{also}
        ORDER BY cosine_distance(embedding_half, (SELECT $2::vector::halfvec(384)))
        LIMIT (SELECT {count} + {HALF_PRECISION_MARGIN})
    ) by_half
    JOIN memories m ON m.id = by_half.id AND m.user_id = $1
"""  # noqa: S608


# The threshold is applied outside, after the ranking.
_SEARCH = f"""
SELECT m.id, m.content, 1 - nearest.distance AS score, m.metadata, m.occurred_at, m.created_at
FROM (
    SELECT id, distance FROM ({_nearest("$3::int")}) near
    ORDER BY distance, id
    LIMIT (SELECT $3::int)
) nearest
JOIN memories m ON m.id = nearest.id AND m.user_id = $1
WHERE 1 - nearest.distance >= $4
ORDER BY nearest.distance, m.id
"""  # noqa: S608


# Hybrid: the user's nearest memories by vector and their best matches by words
# (any of the query's words, each weighted by its rarity among the user's
# memories) are the candidates; each is ranked by its cosine similarity plus
# WORDS_WEIGHT times its word coverage, the share of the query's word weight it
# matches (a word no memory holds weighs most, so a query whose rare words
# match nothing gives a common word that does match little; two of the query's
# words side by side in a memory, as in the query, add PHRASE_SHARE of their
# weight again). Scores, not ranks: reciprocal rank fusion ranked a memory by
# its place in each list, however far apart the scores behind two places were
# (scripts/BENCHMARKS.md, experiments). `score` stays the cosine similarity,
# which the threshold applies to.
#
# Context: a memory captured just before or after one that matches the query's
# words (within CONTEXT_WINDOW, so in the same sitting) gets CONTEXT_SHARE of
# that coverage, and one two captures away CONTEXT_SHARE squared. In a
# conversation captured turn by turn, the turn that holds the answer ("five
# years already!") often shares no word with the question; the turn it answers
# does, and often with the other speaker's reply between them.
_HYBRID_SEARCH = f"""
-- The candidate count $5 is read through a subquery, as the query's words are
-- (see hits), so that no plan is made for its value: one made for it looked
-- cheaper than the generic plan, for a user owning the whole table.
-- Materialized: read twice, for the candidates and for their scores.
WITH semantic AS MATERIALIZED (
    SELECT id, distance FROM ({_nearest("$5::int")}) near  -- exact: see _SEARCH
    ORDER BY distance, id
    LIMIT (SELECT $5::int)
),
-- The query's words, each with a query that matches exactly that word and with
-- the number of the user's active memories that hold it.
terms AS MATERIALIZED (
    SELECT lexeme AS word, positions, lexeme_query(lexeme) AS query,
           coalesce(counts.holders, 0) AS holders
    FROM unnest(to_tsvector('english', $3))
    LEFT JOIN memory_word_counts counts ON counts.user_id = $1 AND counts.word = lexeme
),
total AS MATERIALIZED (
    SELECT coalesce(
        (SELECT holders FROM memory_word_counts WHERE user_id = $1 AND word = ''), 0) AS n
),
-- The words whose memories are read: all of them for a user with at most $11
-- memories; for a bigger one, the rarest first, while their memories add up to
-- at most $11. A word most of a big user's memories hold ("user", in memories
-- an extraction model wrote) would otherwise cost a table read per memory (105
-- ms for 10,000), to rank memories by little more than their age. A word left
-- out still weighs in the coverage of the memories that are read.
searched AS MATERIALIZED (
    SELECT word FROM (
        SELECT word, sum(holders) OVER (ORDER BY holders, word) AS reach FROM terms
    ) cumulated
    WHERE reach <= $11 OR (SELECT n FROM total) <= $11
),
phrases AS MATERIALIZED (
    SELECT a.word AS first, b.word AS second, tsquery_phrase(a.query, b.query) AS query
    FROM terms a, terms b
    WHERE EXISTS (SELECT FROM unnest(a.positions) p, unnest(b.positions) q WHERE q = p + 1)
),
-- The user's memories holding any searched word, through the (user, word) keys
-- of memories_user_words, made by the index's own memory_words: the work grows
-- with the user's matches, not with the user's memories or with the word's
-- count over all users. Materialized so the user test below cannot be planned into another
-- index instead. The keys come from a subquery so that no plan is made for the
-- query's words: one made for rare words looked cheaper than the generic plan,
-- and PostgreSQL then planned every search again (1.4 ms, against 0.5 ms to run
-- it at 100,000 rows).
hits AS MATERIALIZED (
    SELECT id, user_id, created_at, content_tsv FROM memories
    WHERE superseded_by IS NULL
      AND memory_words(user_id, content_tsv)
          && (SELECT memory_words($1, array_to_tsvector(array_agg(word))) FROM searched)
),
-- And the vector half's candidates that are not hits, when a word was left out
-- of the search: they may hold it.
worded AS (
    SELECT id, created_at, content_tsv, true AS hit FROM hits WHERE hits.user_id = $1
    UNION ALL
    SELECT m.id, m.created_at, m.content_tsv, false
    FROM semantic JOIN memories m ON m.id = semantic.id AND m.user_id = $1
    WHERE EXISTS (SELECT FROM terms WHERE word NOT IN (SELECT word FROM searched))
      AND semantic.id NOT IN (SELECT id FROM hits)
),
-- In float8: in numeric, summing the weights of 1,000 hits took a fifth of the
-- query (the same ranking on 1,388 queries).
rarity AS MATERIALIZED (
    SELECT word, query, ln(1 + (total.n - holders + 0.5::float8) / (holders + 0.5::float8)) AS idf
    FROM terms CROSS JOIN total
),
phrase_weights AS MATERIALIZED (
    SELECT phrases.query, $10 * (first.idf + second.idf) AS weight
    FROM phrases
    JOIN rarity first ON first.word = phrases.first
    JOIN rarity second ON second.word = phrases.second
),
-- Each word tested with @@, a binary search of the memory's words: unnesting
-- every hit's words and joining them to the query's took twice as long.
lexical AS (
    SELECT id, created_at, hit,
           (coalesce((SELECT sum(idf) FROM rarity WHERE content_tsv @@ rarity.query), 0)
            + coalesce((SELECT sum(weight) FROM phrase_weights
                        WHERE content_tsv @@ phrase_weights.query), 0))
           / (SELECT sum(idf) FROM rarity) AS coverage
    FROM worded
),
-- Among equal coverages (memories holding the same one word), the newest: a
-- later memory is likelier to be current (the id, random, decided until then).
best_words AS (
    SELECT id, created_at, coverage FROM lexical WHERE hit
    ORDER BY coverage DESC, created_at DESC, id LIMIT (SELECT $5::int)
),
-- Two captures deep on each side of each best match m.
context AS (
    SELECT beside.id, sum(m.coverage * power($8::float8, beside.steps)) AS coverage
    FROM best_words m
    CROSS JOIN LATERAL (
        (SELECT n.id, row_number() OVER (ORDER BY n.created_at DESC, n.id DESC) AS steps
         FROM memories n
         WHERE n.user_id = $1 AND n.superseded_by IS NULL
           AND (n.created_at, n.id) < (m.created_at, m.id)
           AND n.created_at >= m.created_at - $9::interval
         ORDER BY n.created_at DESC, n.id DESC LIMIT 2)
        UNION ALL
        (SELECT n.id, row_number() OVER (ORDER BY n.created_at, n.id) AS steps
         FROM memories n
         WHERE n.user_id = $1 AND n.superseded_by IS NULL
           AND (n.created_at, n.id) > (m.created_at, m.id)
           AND n.created_at <= m.created_at + $9::interval
         ORDER BY n.created_at, n.id LIMIT 2)
    ) beside
    GROUP BY beside.id
),
-- Every candidate with its distance (known for the vector half's) and its word
-- coverage, its own and its neighbours'. Pooled and grouped, not joined: the
-- planner takes lexical for a row or two, and joined to the candidates it became
-- a nested loop over every hit per candidate (50 ms for 10,000 hits). Scored
-- from what is known already: a candidate's table row is read for its vector
-- only when it came from the words alone, and for its content only when it is
-- returned. Reading every candidate's row first cost a quarter to a third of the
-- query for a 1,000-memory user (scripts/BENCHMARKS.md, experiments).
candidates AS (
    SELECT id, min(distance) AS distance, sum(coverage) AS coverage FROM (
        SELECT id, distance, 0 AS coverage, true AS candidate FROM semantic
        UNION ALL SELECT id, NULL, 0, true FROM best_words
        UNION ALL SELECT id, NULL, coverage, true FROM context
        UNION ALL SELECT id, NULL, coverage, false FROM lexical
    ) pooled
    GROUP BY id
    HAVING bool_or(candidate)
),
scored AS (
    SELECT id,
           1 - coalesce(distance, (
               SELECT cosine_distance(m.embedding, $2) FROM memories m
               WHERE m.id = candidates.id AND m.user_id = $1)) AS score,
           coverage
    FROM candidates
),
best AS (
    SELECT id, score, coverage FROM scored WHERE score >= $4
    ORDER BY score + $7 * coverage DESC, id LIMIT $6
)
SELECT m.id, m.content, best.score, m.metadata, m.occurred_at, m.created_at
FROM best JOIN memories m ON m.id = best.id AND m.user_id = $1
ORDER BY best.score + $7 * best.coverage DESC, m.id
"""  # noqa: S608

# Candidates each half brings to the fusion, at least.
_MIN_CANDIDATES = 30
# What matching every word of the query adds to a memory's cosine similarity.
# LoCoMo recall@10: 0.726 / 0.743 / 0.748 at 0.33 / 0.5 / 1 (scripts/BENCHMARKS.md);
# past 0.5 words start to decide alone among memories that hold them.
WORDS_WEIGHT = 0.5
# What two of the query's words side by side in a memory add, as a share of
# their weight, on top of the words themselves ("support group", "New York").
PHRASE_SHARE = 0.5
# The share of a memory's word coverage its neighbours in capture order get,
# raised to the power of their distance (up to two captures away: LoCoMo
# recall@10 0.743 / 0.757 / 0.756 one / two / three deep, scripts/BENCHMARKS.md).
CONTEXT_SHARE = 0.5
CONTEXT_WINDOW = timedelta(minutes=10)
# The most memories the word half reads for a user who has more: see `searched`.
# LoCoMo recall@10 0.758 / 0.759 at 1,000 / 500 (0.728 / 0.727 with every
# conversation in one user); at 1M memories, a query whose words every memory
# holds took 6.1 ms p50 for a 1,000-memory user at 1,000 and 1.4 ms at 500
# (scripts/BENCHMARKS.md, experiments).
WORD_READS = 500


async def search(
    pool: Pool,
    user_id: UUID,
    embedding: np.ndarray[Any, Any],
    limit: int,
    threshold: float,
    query_text: str | None = None,
) -> list[MemoryHit]:
    """This user's active memories most relevant to the query, best first.

    With `query_text`, hybrid (vector and words fused); without, vector only.
    """
    if query_text is None:
        rows = await pool.fetch(_SEARCH, user_id, embedding, limit, threshold)
    else:
        candidates = max(limit * 3, _MIN_CANDIDATES)
        rows = await pool.fetch(
            _HYBRID_SEARCH,
            user_id,
            embedding,
            query_text,
            threshold,
            candidates,
            limit,
            WORDS_WEIGHT,
            CONTEXT_SHARE,
            CONTEXT_WINDOW,
            PHRASE_SHARE,
            WORD_READS,
        )
    return [MemoryHit(**dict(row)) for row in rows]


# The nearest active memory of this user, leaving out `exclude` (a memory the
# new one replaces must not swallow it as a duplicate).
_NEAREST = f"""
SELECT m.id, m.content, m.confidence, 1 - nearest.distance AS score
FROM (
    SELECT id, distance FROM ({_nearest("1", also=" AND id <> ALL($3::uuid[])")}) near
    ORDER BY distance, id
    LIMIT 1
) nearest
JOIN memories m ON m.id = nearest.id AND m.user_id = $1
"""  # noqa: S608


async def capture(
    pool: Pool, user_id: UUID, memory: NewMemory, dedup_threshold: float
) -> CaptureResult:
    """Store `memory`, or merge it into an exact or near duplicate of this user's."""
    async with pool.acquire() as connection, connection.transaction():
        return await write_memory(connection, user_id, memory, dedup_threshold)


async def write_memory(
    connection: Connection,
    user_id: UUID,
    memory: NewMemory,
    dedup_threshold: float,
    updates: UUID | None = None,
) -> CaptureResult:
    """Inside the caller's transaction: merge into a duplicate, or insert.

    With `updates`, the memory it names is superseded by the result and stops
    being retrieved.
    """
    # Serialise writers per user so two near-duplicates cannot both be inserted.
    await connection.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1::uuid::text, 0))", user_id
    )
    result = await _merge_into_duplicate(connection, user_id, memory, dedup_threshold, updates)
    if result is None:
        result = CaptureResult(await _insert(connection, user_id, memory), "stored")
    if updates is not None:
        await connection.execute(
            """
            UPDATE memories SET superseded_by = $3, updated_at = now()
            WHERE user_id = $1 AND id = $2 AND id <> $3 AND superseded_by IS NULL
            """,
            user_id,
            updates,
            result.id,
        )
    return result


async def _merge_into_duplicate(
    connection: Connection,
    user_id: UUID,
    memory: NewMemory,
    dedup_threshold: float,
    updates: UUID | None,
) -> CaptureResult | None:
    exact = await connection.fetchrow(
        "SELECT id, content, confidence FROM memories WHERE user_id = $1 AND content_hash = $2",
        user_id,
        memory.content_hash,
    )
    if exact is not None:
        await _merge(connection, exact, memory)
        return CaptureResult(exact["id"], "merged", 1.0)
    excluded = [updates] if updates is not None else []
    near = await connection.fetchrow(_NEAREST, user_id, memory.embedding, excluded)
    if near is None or near["score"] < dedup_threshold:
        return None
    await _merge(connection, near, memory)
    return CaptureResult(near["id"], "merged", round(float(near["score"]), 6))


async def _insert(connection: Connection, user_id: UUID, memory: NewMemory) -> UUID:
    memory_id: UUID = await connection.fetchval(
        """
        INSERT INTO memories (user_id, content, content_hash, embedding, kind, confidence,
                              metadata, occurred_at, source_conversation_id)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
        RETURNING id
        """,
        user_id,
        memory.content,
        memory.content_hash,
        memory.embedding,
        memory.kind,
        memory.confidence,
        memory.metadata,
        memory.occurred_at,
        memory.source_conversation_id,
    )
    return memory_id


def _better_phrasing(existing: Record, memory: NewMemory) -> bool:
    """The newcomer replaces the wording when it is surer, or as sure and more specific."""
    if memory.confidence != existing["confidence"]:
        return memory.confidence > float(existing["confidence"])
    return len(memory.content) > len(existing["content"])


async def _merge(connection: Connection, existing: Record, memory: NewMemory) -> None:
    """Raise the confidence of a memory said again, and keep the better wording."""
    rephrase = _better_phrasing(existing, memory)
    await connection.execute(
        """
        UPDATE memories
        SET confidence = LEAST(1, GREATEST(confidence, $2) + 0.05),
            metadata = metadata || $3,
            content = CASE WHEN $4 THEN $5 ELSE content END,
            content_hash = CASE WHEN $4 THEN $6 ELSE content_hash END,
            embedding = CASE WHEN $4 THEN $7 ELSE embedding END,
            updated_at = now()
        WHERE id = $1
        """,
        existing["id"],
        memory.confidence,
        memory.metadata,
        rephrase,
        memory.content,
        memory.content_hash,
        memory.embedding,
    )


async def count_memories(pool: Pool, user_id: UUID) -> dict[str, int]:
    row = await pool.fetchrow(
        """
        SELECT count(*) FILTER (WHERE superseded_by IS NULL) AS active,
               count(*) FILTER (WHERE superseded_by IS NOT NULL) AS superseded
        FROM memories WHERE user_id = $1
        """,
        user_id,
    )
    assert row is not None
    return {"active": row["active"], "superseded": row["superseded"]}
