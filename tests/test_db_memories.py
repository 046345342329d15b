"""Per-user vector search against the real database: exact, whichever plan PostgreSQL picks."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import numpy as np
import pytest

from proxy.db import memories as memory_sql
from proxy.db.pool import Pool, apply_schema, create_pool
from tests.conftest import scratch_database

pytestmark = pytest.mark.anyio

ROWS = 3000  # most of the test database: every plan must still rank all of the user's rows
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
    # its generic plan: both kinds must rank every row of the user, by its full
    # vector (by its half-precision copy, the last two of the sixth query swap places).
    for query in queries:
        query /= np.linalg.norm(query)
        nearest = np.argsort(-(vectors @ query))[:LIMIT]
        expected = [order[n] for n in nearest]
        hits = await memory_sql.search(pool, user_id, query, LIMIT, 0.0)
        assert [hit.id for hit in hits] == expected
        # The full vectors' cosines: the half-precision copies differ by ~1e-5.
        exact = [float(vectors[n] @ query) for n in nearest]
        assert [hit.score for hit in hits] == pytest.approx(exact, abs=1e-6)
        hybrid = await memory_sql.search(pool, user_id, query, LIMIT, 0.0, "zzyzx")
        assert [hit.id for hit in hybrid] == expected  # no word matches: the vector order


# A table shaped like production's: many users, one of them owning 1 % of the
# rows. The planner reads a user's rows by index only when they are a small part
# of the table, which the session's database (mostly big_user's rows) is not.
CROWD_USERS = 2000
CROWD_ROWS_EACH = 10
BIG_USER_ROWS = 200


@pytest.fixture(scope="module")
async def crowded_database(database_url: str) -> AsyncIterator[tuple[str, dict[str, uuid.UUID]]]:
    """Its URL, and the ids of an ordinary user and of the 1 % user."""
    async with scratch_database(database_url) as url:
        connection = await asyncpg.connect(url)
        try:
            users = await connection.fetch(
                """
                INSERT INTO users (email)
                SELECT 'crowd-' || n || '@example.com' FROM generate_series(1, $1) n
                RETURNING id
                """,
                CROWD_USERS + 1,
            )
            await connection.execute(
                """
                INSERT INTO memories (user_id, content, content_hash, embedding)
                SELECT owner, 'memory ' || n, md5(owner::text || n),
                       array_fill((n % 7 + 1)::real, ARRAY[384])::vector
                FROM unnest($1::uuid[], $2::int[]) AS users(owner, rows),
                     generate_series(1, rows) n
                """,
                [row["id"] for row in users],
                [BIG_USER_ROWS] + [CROWD_ROWS_EACH] * CROWD_USERS,
            )
            await connection.execute("VACUUM (ANALYZE) memories")
        finally:
            await connection.close()
        yield url, {"1%": users[0]["id"], "ordinary": users[1]["id"]}


@pytest.mark.parametrize("who", ["ordinary", "1%"])
@pytest.mark.parametrize("plan", ["force_custom_plan", "force_generic_plan"])
async def test_every_plan_of_the_search_reads_the_users_vectors_by_index_only(
    crowded_database: tuple[str, dict[str, uuid.UUID]], plan: str, who: str
) -> None:
    url, users = crowded_database
    pool = await create_pool(url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as connection, connection.transaction():
            await connection.execute(f"SET LOCAL plan_cache_mode = {plan}")
            await connection.execute(f"PREPARE engram_search AS {memory_sql._SEARCH}")
            literal = "[" + ",".join(["0.5"] * 384) + "]"
            rows = await connection.fetch(
                f"EXPLAIN EXECUTE engram_search('{users[who]}', '{literal}', {LIMIT}, 0)"
            )
            await connection.execute("DEALLOCATE engram_search")
    finally:
        await pool.close()
    scans = [row[0].strip().removeprefix("->  ").split("  (")[0] for row in rows]
    scans = [scan for scan in scans if " on memories" in scan]
    # The user's half-precision vectors from the covering index, not the table;
    # then only the nearest few rows looked up by primary key, for their full
    # vectors, and the LIMIT nearest of those for their content.
    assert scans == [
        "Index Only Scan using memories_user_half_vectors on memories",
        "Index Scan using memories_pkey on memories m_1",
        "Index Scan using memories_pkey on memories m",
    ]


async def _synthetic_database(
    database_url: str, users: int, memories_each: int
) -> AsyncIterator[tuple[str, uuid.UUID]]:
    """A scratch database of `users` users owning `memories_each` memories apiece,
    "synthetic memory <n> of <user>"; its URL and the first user's id."""
    async with scratch_database(database_url) as url:
        connection = await asyncpg.connect(url)
        try:
            owners = await connection.fetch(
                """
                INSERT INTO users (email)
                SELECT 'synthetic-' || n || '@example.com' FROM generate_series(1, $1) n
                RETURNING id
                """,
                users,
            )
            await connection.execute(
                """
                INSERT INTO memories (user_id, content, content_hash, embedding)
                SELECT owner, 'synthetic memory ' || n || ' of ' || owner, md5(owner::text || n),
                       array_fill((n % 7 + 1)::real, ARRAY[384])::vector
                FROM unnest($1::uuid[]) owner, generate_series(1, $2) n
                """,
                [row["id"] for row in owners],
                memories_each,
            )
            await connection.execute("VACUUM (ANALYZE) memories")
        finally:
            await connection.close()
        yield url, owners[0]["id"]


@pytest.fixture(scope="module")
async def wordy_database(database_url: str) -> AsyncIterator[tuple[str, uuid.UUID]]:
    """50,000 memories of 500 users, each memory with words of its own; and one user's id."""
    async for database in _synthetic_database(database_url, 500, 100):
        yield database


@pytest.fixture(scope="module")
async def lone_user_database(database_url: str) -> AsyncIterator[tuple[str, uuid.UUID]]:
    """A laptop's database: one user owning all of its 1,000 memories; and the user's id."""
    async for database in _synthetic_database(database_url, 1, 1000):
        yield database


async def test_searches_settle_on_a_generic_plan(
    wordy_database: tuple[str, uuid.UUID],
) -> None:
    """Planning the hybrid statement costs more than running it (1.4 ms against 0.5 at
    100,000 memories): after its first five calls PostgreSQL must reuse one plan. It
    does when the generic plan's estimated cost is not above the custom plans'; a
    custom plan's estimate knows the query's words and the candidate count, and
    looked cheaper than the generic one (then every call was planned again)."""
    await _assert_settles_on_a_generic_plan(*wordy_database)


async def test_searches_settle_on_a_generic_plan_for_a_lone_user(
    lone_user_database: tuple[str, uuid.UUID],
) -> None:
    await _assert_settles_on_a_generic_plan(*lone_user_database)


async def _assert_settles_on_a_generic_plan(url: str, user_id: uuid.UUID) -> None:
    query = np.full(384, 0.5, dtype=np.float32)
    pool = await create_pool(url, min_size=1, max_size=1)  # one connection: one plan cache
    try:
        for text in ["a zebra, then?", "which synthetic memory?"] * 6:
            await memory_sql.search(pool, user_id, query, 5, 0.0, text)
            await memory_sql.search(pool, user_id, query, 5, 0.0)  # vector only
        plans = await pool.fetch(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
            " WHERE statement = ANY ($1::text[])",
            [memory_sql._HYBRID_SEARCH, memory_sql._SEARCH],
        )
    finally:
        await pool.close()
    assert len(plans) == 2
    for kinds in plans:
        assert kinds["custom_plans"] <= 5 < kinds["custom_plans"] + kinds["generic_plans"]


async def _explained_hybrid_search(
    url: str, user_id: uuid.UUID, query: str, plan: str
) -> list[dict[str, Any]]:
    """Every node of the executed plan of Engram's hybrid search, under `plan_cache_mode`."""
    literal = "[" + ",".join(["0.5"] * 384) + "]"
    pool = await create_pool(url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as connection, connection.transaction():
            await connection.execute(f"SET LOCAL plan_cache_mode = {plan}")
            await connection.execute(f"PREPARE engram_hybrid AS {memory_sql._HYBRID_SEARCH}")
            explained = await connection.fetchval(
                "EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE engram_hybrid("
                f"'{user_id}', '{literal}', '{query}', 0, 30, 5, "
                f"{memory_sql.WORDS_WEIGHT}, {memory_sql.CONTEXT_SHARE}, "
                f"'{memory_sql.CONTEXT_WINDOW.total_seconds()} seconds', "
                f"{memory_sql.PHRASE_SHARE}, {memory_sql.WORD_READS})"
            )
            await connection.execute("DEALLOCATE engram_hybrid")
    finally:
        await pool.close()
    return _plan_nodes(json.loads(explained)[0]["Plan"])


def _plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node, *(n for child in node.get("Plans", []) for n in _plan_nodes(child))]


@pytest.mark.parametrize("plan", ["force_custom_plan", "force_generic_plan"])
async def test_hybrid_search_reads_only_the_users_memories_that_hold_a_query_word(
    crowded_database: tuple[str, dict[str, uuid.UUID]], plan: str
) -> None:
    """The word half's work follows the user's matches, not the user's memory count."""
    url, users = crowded_database
    # Of the 1 % user's 200 memories ("memory 1" … "memory 200"), one holds "17".
    nodes = await _explained_hybrid_search(url, users["1%"], "what is 17?", plan)
    print(
        [
            (n["Node Type"], n.get("Index Name"), n.get("Actual Rows"))
            for n in nodes
            if n.get("Relation Name") == "memories" or n.get("Index Name")
        ]
    )
    words = [node for node in nodes if node.get("Index Name") == "memories_user_words"]
    assert [node["Actual Rows"] for node in words] == [1]
    # Only the vector half goes through all of the user's rows, and
    # from indexes alone: no table read per memory the user has.
    whole = {
        node["Node Type"]
        for node in nodes
        if node.get("Relation Name") == "memories" and node["Actual Rows"] >= BIG_USER_ROWS
    }
    assert whole == {"Index Only Scan"}


@pytest.mark.parametrize("plan", ["force_custom_plan", "force_generic_plan"])
async def test_a_word_too_many_memories_hold_is_not_searched(
    crowded_database: tuple[str, dict[str, uuid.UUID]], plan: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past WORD_READS memories, only the rarest words' memories are read."""
    monkeypatch.setattr(memory_sql, "WORD_READS", BIG_USER_ROWS // 2)
    url, users = crowded_database
    # All of the 1 % user's memories hold "memory", one holds "17".
    nodes = await _explained_hybrid_search(url, users["1%"], "which memory is 17?", plan)
    words = [node for node in nodes if node.get("Index Name") == "memories_user_words"]
    assert [node["Actual Rows"] for node in words] == [1]


@pytest.fixture
async def users(pool: Pool) -> AsyncIterator[list[uuid.UUID]]:
    """Two new users; deleted with their memories afterwards."""
    ids = [
        await pool.fetchval(
            "INSERT INTO users (email) VALUES ($1) RETURNING id", f"{uuid.uuid4().hex}@example.com"
        )
        for _ in range(2)
    ]
    try:
        yield ids
    finally:
        await pool.execute("DELETE FROM users WHERE id = ANY($1::uuid[])", ids)


async def store(pool: Pool, user_id: uuid.UUID, memories: list[tuple[str, Any]]) -> None:
    """(content, vector) pairs, captured an hour apart so none is another's context."""
    start = datetime.now(UTC)
    records = [
        (
            user_id,
            text,
            hashlib.sha256(text.encode()).hexdigest(),
            vector,
            start + timedelta(hours=n),
        )
        for n, (text, vector) in enumerate(memories)
    ]
    async with pool.acquire() as connection:
        await connection.copy_records_to_table(
            "memories",
            records=records,
            columns=["user_id", "content", "content_hash", "embedding", "created_at"],
        )


def unit(*weights: float) -> Any:
    vector = np.zeros(384, dtype=np.float32)
    vector[: len(weights)] = weights
    return vector / np.linalg.norm(vector)


async def test_word_rarity_counts_only_the_users_own_memories(
    pool: Pool, users: list[uuid.UUID]
) -> None:
    """Another user's memories holding the query's words change nothing in this user's ranking."""
    owner, other = users
    # All of one vector: the words alone order them. "alpha" is the owner's rarer word.
    texts = ["alpha note", "beta note", "beta again"] + [f"filler {n}" for n in range(20)]
    await store(pool, owner, [(text, unit(1)) for text in texts])
    await store(pool, other, [(f"alpha {n}", unit(1)) for n in range(100)])
    hits = await memory_sql.search(pool, owner, unit(1), 3, 0.0, "alpha beta")
    # Counted over both users, "alpha" (101 memories) would weigh less than "beta" (2).
    assert [hit.content for hit in hits][:1] == ["alpha note"]
    assert {hit.content for hit in hits} == {"alpha note", "beta note", "beta again"}


async def test_a_hyphenated_word_matches_the_memories_that_hold_it(
    pool: Pool, users: list[uuid.UUID]
) -> None:
    owner, _ = users
    fillers = [(f"filler {n}", unit(0, 1)) for n in range(20)]
    # Both hold "dairy" and "free" side by side; only the first holds "dairy-free",
    # and the second is the nearer by cosine (1.0 against 0.99).
    hyphenated = ("The user bakes dairy-free cakes.", unit(0.99, 0.141))
    spaced = ("The user bakes dairy free cakes.", unit(1))
    await store(pool, owner, [hyphenated, spaced, *fillers])
    hits = await memory_sql.search(pool, owner, unit(1), 2, 0.0, "Which dairy-free cakes?")
    assert [hit.content for hit in hits] == [hyphenated[0], spaced[0]]


async def test_a_lexeme_query_matches_exactly_its_lexeme(pool: Pool) -> None:
    """Hybrid search tests each query word with lexeme_query: quotes, backslashes,
    hyphens and operators in a lexeme are its own characters, not query syntax."""
    text = r"see http://example.com/o'neil?q=1 or C:\Users\bob\notes.txt, dairy-free:* a&b|c!"
    rows = await pool.fetch(
        """
        SELECT lexeme,
               to_tsvector('english', $1) @@ lexeme_query(lexeme) AS held,
               to_tsvector('english', 'something else') @@ lexeme_query(lexeme) AS elsewhere
        FROM unnest(to_tsvector('english', $1))
        """,
        text,
    )
    lexemes = {row["lexeme"] for row in rows}
    assert {"example.com/o'neil?q=1", "dairy-fre"} <= lexemes
    assert all(row["held"] and not row["elsewhere"] for row in rows)


async def test_query_words_with_quotes_and_backslashes_find_their_memory(
    pool: Pool, users: list[uuid.UUID]
) -> None:
    owner, _ = users
    fillers = [(f"filler {n}", unit(1)) for n in range(20)]
    # Nearer by cosine, the fillers win unless the words match.
    text = r"The report is at http://example.com/o'neil and C:\Users\bob\notes.txt"
    target = (text, unit(0.9, 0.44))
    await store(pool, owner, [*fillers, target])
    query = r"Where is http://example.com/o'neil or C:\Users\bob\notes.txt?"
    hits = await memory_sql.search(pool, owner, unit(1), 1, 0.0, query)
    assert [hit.content for hit in hits] == [target[0]]


async def _word_count_errors(pool: Pool, owners: list[uuid.UUID]) -> list[dict[str, Any]]:
    """memory_word_counts against a count of the owners' active memories, where they differ."""
    rows = await pool.fetch(
        """
        WITH truth AS (
            SELECT user_id, word, count(*)::integer AS holders
            FROM memories, unnest(array_append(tsvector_to_array(content_tsv), '')) word
            WHERE superseded_by IS NULL AND user_id = ANY ($1::uuid[])
            GROUP BY user_id, word
        ),
        kept AS (SELECT * FROM memory_word_counts WHERE user_id = ANY ($1::uuid[]))
        SELECT user_id, word, truth.holders AS truth, kept.holders AS kept
        FROM truth FULL JOIN kept USING (user_id, word)
        WHERE truth.holders IS DISTINCT FROM kept.holders
        """,
        owners,
    )
    return [dict(row) for row in rows]


async def test_word_counts_follow_every_write_to_memories(
    pool: Pool, users: list[uuid.UUID]
) -> None:
    owner, other = users
    await store(pool, owner, [("apple pie", unit(1)), ("apple tart", unit(1))])
    await store(pool, other, [("apple juice", unit(1))])
    inserted = await pool.fetch(
        """
        INSERT INTO memories (user_id, content, content_hash, embedding)
        SELECT $1, text, md5(text), $2 FROM unnest($3::text[]) text RETURNING id, content
        """,
        owner,
        unit(1),
        ["pear pie", "plum jam", "old plum"],
    )
    ids = {row["content"]: row["id"] for row in inserted}
    assert await _word_count_errors(pool, users) == []
    assert (
        await pool.fetchval(
            "SELECT holders FROM memory_word_counts WHERE user_id = $1 AND word = 'appl'", owner
        )
        == 2
    )

    steps = [
        # Rephrased: the old words leave, the new ones come.
        ("UPDATE memories SET content = 'pear crumble' WHERE id = $1", ids["pear pie"]),
        # Superseded: all its words leave the active set.
        ("UPDATE memories SET superseded_by = $1 WHERE content = 'old plum'", ids["plum jam"]),
        # What every answer does: no word changes, and nothing is counted.
        ("UPDATE memories SET access_count = access_count + 1 WHERE id = $1", ids["plum jam"]),
        ("DELETE FROM memories WHERE content = 'old plum' AND superseded_by = $1", ids["plum jam"]),
        ("DELETE FROM memories WHERE id = $1", ids["plum jam"]),
    ]
    for sql, argument in steps:
        await pool.execute(sql, argument)
        assert await _word_count_errors(pool, users) == [], sql
    # "plum" was held by two memories, one superseded and one deleted: its row goes.
    assert not await pool.fetchval(
        "SELECT count(*) FROM memory_word_counts WHERE user_id = $1 AND word = 'plum'", owner
    )
    await pool.execute("DELETE FROM users WHERE id = $1", other)
    assert not await pool.fetchval(
        "SELECT count(*) FROM memory_word_counts WHERE user_id = $1", other
    )
    assert await _word_count_errors(pool, [owner]) == []


async def test_a_word_most_memories_hold_is_weighed_but_not_searched(
    pool: Pool, users: list[uuid.UUID], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past WORD_READS memories, the word half reads only the rarest words' memories;
    a commoner word still adds to the coverage of the vector half's candidates."""
    monkeypatch.setattr(memory_sql, "WORD_READS", 20)
    owner, _ = users
    fillers = [(f"filler {n}", unit(0, 1)) for n in range(34)]
    commons = [(f"common note {n}", unit(0, 1)) for n in range(23)]
    near_and_common = ("a common thing", unit(0.93, 0.37))
    nearest = ("nothing shared", unit(0.97, 0.24))
    rare = ("a zebra", unit(0, 1))
    await store(pool, owner, [*fillers, *commons, near_and_common, nearest, rare])
    # 60 memories, 24 of them holding "common": too many to read; "zebra" is read.
    hits = await memory_sql.search(pool, owner, unit(1), 3, 0.0, "common zebra?")
    # Without "common", the nearest would come first.
    assert [hit.content for hit in hits] == [near_and_common[0], nearest[0], rare[0]]


async def test_word_counts_are_made_for_the_memories_of_an_older_database(
    database_url: str,
) -> None:
    """A database from before memory_word_counts: its memories are counted at upgrade."""
    async with scratch_database(database_url) as url:
        connection = await asyncpg.connect(url)
        try:
            await connection.execute(
                """
                DROP TRIGGER memories_count_inserted_words ON memories;
                DROP TRIGGER memories_count_deleted_words ON memories;
                DROP TRIGGER memories_count_updated_words ON memories;
                DROP TRIGGER memories_forget_word_counts ON memories;
                DROP TABLE memory_word_counts;
                """
            )
            owners = [
                row["id"]
                for row in await connection.fetch(
                    "INSERT INTO users (email) SELECT 'old-' || n || '@example.com'"
                    " FROM generate_series(1, 2) n RETURNING id"
                )
            ]
            await connection.execute(
                """
                INSERT INTO memories (user_id, content, content_hash, embedding)
                SELECT owner, 'old memory ' || n || ' of ' || owner, md5(owner::text || n),
                       array_fill(1::real, ARRAY[384])::vector
                FROM unnest($1::uuid[]) owner, generate_series(1, 30) n
                """,
                owners,
            )
        finally:
            await connection.close()
        await apply_schema(url, force=True)
        pool = await create_pool(url, min_size=1, max_size=1)
        try:
            assert await _word_count_errors(pool, owners) == []
            assert (
                await pool.fetchval(
                    "SELECT holders FROM memory_word_counts WHERE user_id = $1 AND word = ''",
                    owners[0],
                )
                == 30
            )
        finally:
            await pool.close()


async def test_a_memory_of_a_few_sentences_is_kept_whole_in_its_row(
    pool: Pool, users: list[uuid.UUID]
) -> None:
    """Its embedding and its words stay in the row, not in TOAST: a search reading
    the table would otherwise fetch them one by one from there."""
    owner, _ = users
    text = " ".join(f"The user went hiking near lake number {n} last summer." for n in range(12))
    await store(pool, owner, [(text, unit(1))])
    row = await pool.fetchrow(
        """
        SELECT pg_column_size(memories.*) AS size,
               pg_column_toast_chunk_id(embedding) AS embedding_chunk,
               pg_column_toast_chunk_id(content_tsv) AS words_chunk,
               pg_column_compression(content_tsv) AS words_compression
        FROM memories WHERE user_id = $1
        """,
        owner,
    )
    assert row is not None
    assert row["size"] > 2100  # past PostgreSQL's default 2 KB
    assert row["embedding_chunk"] is None
    assert row["words_chunk"] is None
    assert row["words_compression"] is None
