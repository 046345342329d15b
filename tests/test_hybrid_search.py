"""Hybrid search: full-text matches fused with vector neighbours, rare words weighing most."""

from __future__ import annotations

import asyncpg
import pytest

from tests.conftest import Engram, User

pytestmark = pytest.mark.anyio

ANIMALS = ["rabbit", "hamster", "parrot", "goldfish", "tortoise", "ferret", "gecko", "canary"]
NEEDLE = "The user's locker at the Brisbane gym has the code Quetzalcoatl-7."


async def fill(engram: Engram, user: User, db: asyncpg.Connection) -> str:
    """Forty memories sharing the query's common words, and one holding its rare ones."""
    await db.execute("UPDATE users SET dedup_threshold = 1 WHERE id = $1::uuid", user.id)
    for n in range(40):
        engram.capture(user, f"The user's friend number {n} keeps a {ANIMALS[n % 8]} as a pet.")
    return str(engram.capture(user, NEEDLE)["id"])


def search(engram: Engram, user: User, query: str, **options: float) -> list[dict[str, object]]:
    body = {"query": query, "limit": 5, "threshold": 0, **options}
    results: list[dict[str, object]] = engram.post("/memories/search", user, body).json()["results"]
    return results


async def test_common_words_do_not_drown_a_rare_one(engram: Engram, db: asyncpg.Connection) -> None:
    user = engram.create_user()
    needle = await fill(engram, user, db)
    # "pet" and "friend" match forty memories, "Brisbane" and "gym" one: without
    # weighting words by rarity, the forty crowded the best vector match out.
    hits = search(engram, user, "What pet did the friend bring to the Brisbane gym?")
    assert hits[0]["id"] == needle


async def test_the_threshold_still_applies_to_the_cosine_score(
    engram: Engram, db: asyncpg.Connection
) -> None:
    user = engram.create_user()
    needle = await fill(engram, user, db)
    hits = search(engram, user, "Brisbane gym locker code", threshold=0.5)
    assert [hit["id"] for hit in hits] == [needle]
    assert all(float(str(hit["score"])) >= 0.5 for hit in hits)


async def test_a_query_of_stop_words_alone_falls_back_to_vectors(
    engram: Engram, db: asyncpg.Connection
) -> None:
    user = engram.create_user()
    await fill(engram, user, db)
    assert len(search(engram, user, "what is it?")) == 5


async def test_a_common_word_alone_does_not_outrank_the_meaning(
    engram: Engram, db: asyncpg.Connection
) -> None:
    user = engram.create_user()
    await fill(engram, user, db)
    flight = str(engram.capture(user, "Tomorrow morning I fly out to Tokyo for two weeks.")["id"])
    # Only "user's" matches any memory (forty of them); "trip" and "Japan" match
    # none, so they hold nearly all the query's word weight and the forty gain
    # almost nothing. Ranked by places, not scores, the forty came first.
    hits = search(engram, user, "When does the user's trip to Japan start?")
    assert hits[0]["id"] == flight


QUESTION = "How long has Melanie been married to her husband?"


async def capture_exchange(engram: Engram, user: User, db: asyncpg.Connection) -> str:
    """Forty memories closer to the question than its answer, then the exchange that has it."""
    await db.execute("UPDATE users SET dedup_threshold = 1 WHERE id = $1::uuid", user.id)
    for n in range(40):
        engram.capture(user, f"Melanie's friend number {n} keeps a {ANIMALS[n % 8]} as a pet.")
    engram.capture(user, "Caroline asked Melanie how long she and her husband have been married.")
    return str(engram.capture(user, "In June 2019.")["id"])


async def test_the_memory_captured_beside_a_match_shares_its_words(
    engram: Engram, db: asyncpg.Connection
) -> None:
    user = engram.create_user()
    answer = await capture_exchange(engram, user, db)
    # Cosine 0.24 against the pets' 0.43, the last of all 42 by cosine: the words
    # of the turn before it lift it into the five (as they lift the two pets
    # captured just before that turn).
    assert answer in [hit["id"] for hit in search(engram, user, QUESTION)]


async def test_the_answer_two_captures_after_the_question_shares_its_words(
    engram: Engram, db: asyncpg.Connection
) -> None:
    """In a conversation captured turn by turn, the answer often comes after a reply."""
    user = engram.create_user()
    await db.execute("UPDATE users SET dedup_threshold = 1 WHERE id = $1::uuid", user.id)
    pets = (f"The user's friend number {n} keeps a {ANIMALS[n % 8]} as a pet." for n in range(60))
    for _ in range(20):
        engram.capture(user, next(pets))
    # Cosine 0.27 to the question, against the answer's 0.25; no query word
    # within two captures of it.
    apart = str(engram.capture(user, "Back in April 2015.")["id"])
    for _ in range(20):
        engram.capture(user, next(pets))
    engram.capture(user, "Caroline asked Melanie how long she and her husband have been married.")
    engram.capture(user, "Oh, that's a good question!")
    answer = str(engram.capture(user, "In June 2019.")["id"])
    for pet in pets:
        engram.capture(user, pet)
    ids = [hit["id"] for hit in search(engram, user, QUESTION)]
    assert ids.index(answer) < ids.index(apart)


async def test_memories_captured_apart_are_not_context(
    engram: Engram, db: asyncpg.Connection
) -> None:
    user = engram.create_user()
    answer = await capture_exchange(engram, user, db)
    await db.execute(
        "UPDATE memories SET created_at = created_at + interval '1 hour' WHERE id = $1::uuid",
        answer,
    )
    assert answer not in [hit["id"] for hit in search(engram, user, QUESTION)]


async def test_words_side_by_side_as_in_the_query_count_more(
    engram: Engram, db: asyncpg.Connection
) -> None:
    user = engram.create_user()
    await fill(engram, user, db)
    phrase = str(engram.capture(user, "The user is in a support group at the library.")["id"])
    # Between them, so neither gets the other's words as context.
    engram.capture(user, "The user's neighbour plays the cello on Sundays.")
    apart = str(engram.capture(user, "The user is in a group at the library for support.")["id"])
    # Both hold every word of the query; the second is closer by cosine (0.71 vs 0.67).
    ids = [hit["id"] for hit in search(engram, user, "Which support group is the user in?")]
    assert ids.index(phrase) < ids.index(apart)


async def test_among_equal_word_matches_the_newest_are_taken(
    engram: Engram, db: asyncpg.Connection
) -> None:
    """Sixty memories hold the query's one word; thirty are taken as word matches,
    and their neighbours get context: the newest thirty, not thirty by random id."""
    user = engram.create_user()
    await db.execute("UPDATE users SET dedup_threshold = 1 WHERE id = $1::uuid", user.id)
    ids = [
        str(engram.capture(user, f"Zebra sighting number {n} at the lake.")["id"])
        for n in range(60)
    ]
    hits = [hit["id"] for hit in search(engram, user, "zebra?")]
    assert len(hits) == 5
    assert set(hits) <= set(ids[30:])
